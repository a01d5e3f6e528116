"""Analytic 2-D Gaussian fixtures for the loss tests (float64)."""

from __future__ import annotations

import torch

A_T, SIGMA_T = 0.8, 0.6  # x_t = a * x0 + sigma * eps  (a^2 + sigma^2 = 1)
REF_MEAN = torch.tensor([0.5, -0.3], dtype=torch.float64)
REF_COV = torch.tensor([[1.0, 0.3], [0.3, 0.6]], dtype=torch.float64)
GEN_MEAN0 = torch.tensor([0.0, 0.2], dtype=torch.float64)
GEN_MAT0 = torch.tensor([[0.8, 0.1], [-0.2, 1.1]], dtype=torch.float64)


def gaussian_score(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """grad_x log N(x; mean, cov) for rows of x."""
    return -torch.linalg.solve(cov, (x - mean).T).T


def diffused(mean: torch.Tensor, cov: torch.Tensor, a: float = A_T, sigma: float = SIGMA_T):
    """Mean and covariance of a*x0 + sigma*eps for x0 ~ N(mean, cov)."""
    return a * mean, a**2 * cov + sigma**2 * torch.eye(cov.shape[0], dtype=cov.dtype)


def gen_params(mean=GEN_MEAN0, mat=GEN_MAT0):
    return mean.clone().requires_grad_(True), mat.clone().requires_grad_(True)


def common_noise(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return z, eps
