"""FID and KID with an injectable feature extractor.

The Fréchet distance between Gaussians ``N(mu1, S1)`` and ``N(mu2, S2)`` is
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``. :func:`frechet_distance` computes the trace of
the matrix square root from the eigenvalues of the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}``
(same eigenvalues as ``S1 S2``), in float64, which avoids the complex round-off of a general
``sqrtm``. KID is the unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``.

The torchmetrics metrics (:func:`make_fid`, :func:`make_kid`) take any callable feature extractor
(the shapes-world verifier's penultimate layer, an Inception network loaded from a local file, ...)
so no weights are downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "FeatureExtractor",
    "FeatureStats",
    "feature_statistics",
    "fid_from_features",
    "fid_from_stats",
    "frechet_distance",
    "kid_from_features",
    "make_fid",
    "make_kid",
]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (covariances PSD)."""
    mu1, mu2 = _as_numpy(mu1).reshape(-1), _as_numpy(mu2).reshape(-1)
    sigma1, sigma2 = np.atleast_2d(_as_numpy(sigma1)), np.atleast_2d(_as_numpy(sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    root1 = _sym_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


@dataclass
class FeatureStats:
    """Mean and covariance (unbiased, ``n - 1``) of a feature set; saved as ``.npz``."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.savez(handle, mu=self.mu, sigma=self.sigma, n=np.array(self.n))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FID reference statistics not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "n"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a FeatureStats file (missing {sorted(missing)})")
            return cls(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]))


def feature_statistics(features) -> FeatureStats:
    """Mean and unbiased covariance of ``features`` ``[N, D]`` (N >= 2)."""
    feats = _as_numpy(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"expected features of shape [N >= 2, D], got {feats.shape}")
    return FeatureStats(
        mu=feats.mean(0), sigma=np.cov(feats, rowvar=False).reshape(feats.shape[1], -1), n=len(feats)
    )


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid_from_features(real_features, fake_features) -> float:
    """FID between two feature sets ``[N, D]`` and ``[M, D]``."""
    return fid_from_stats(feature_statistics(real_features), feature_statistics(fake_features))


def kid_from_features(real_features, fake_features, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with kernel ``(x.y / d + coef)^degree`` over all samples (no subsets)."""
    x, y = _as_numpy(real_features), _as_numpy(fake_features)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ValueError(f"expected features [N >= 2, D] and [M >= 2, D], got {x.shape} and {y.shape}")
    d = x.shape[1]

    def kernel(a, b):
        return (a @ b.T / d + coef) ** degree

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    m, n = len(x), len(y)
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2 * kxy.mean())


class FeatureExtractor(nn.Module):
    """Wraps a callable ``images -> [B, D]`` as the ``nn.Module`` with ``num_features`` torchmetrics wants."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int):
        super().__init__()
        self.fn = fn
        self.num_features = int(num_features)
        if isinstance(fn, nn.Module):
            self.inner = fn  # registered so .to()/.eval() reach it

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.fn(images)
        if feats.ndim != 2 or feats.shape[1] != self.num_features:
            raise ValueError(
                f"feature extractor returned {tuple(feats.shape)}, expected [B, {self.num_features}]"
            )
        return feats


def _module(extractor, num_features: int | None) -> nn.Module:
    if isinstance(extractor, nn.Module) and hasattr(extractor, "num_features"):
        return extractor
    if num_features is None:
        raise ValueError("pass num_features for a feature extractor without a 'num_features' attribute")
    return FeatureExtractor(extractor, num_features)


def make_fid(extractor, num_features: int | None = None, reset_real_features: bool = True):
    """A torchmetrics ``FrechetInceptionDistance`` over ``extractor``'s features.

    ``update(images, real=...)`` passes images unchanged to the extractor (any range it expects).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=_module(extractor, num_features), reset_real_features=reset_real_features, normalize=True
    )


def make_kid(
    extractor,
    num_features: int | None = None,
    subsets: int = 100,
    subset_size: int = 1000,
    reset_real_features: bool = True,
):
    """A torchmetrics ``KernelInceptionDistance`` over ``extractor``'s features."""
    from torchmetrics.image.kid import KernelInceptionDistance

    return KernelInceptionDistance(
        feature=_module(extractor, num_features),
        subsets=subsets,
        subset_size=subset_size,
        reset_real_features=reset_real_features,
        normalize=True,
    )
