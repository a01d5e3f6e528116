"""The expert-training objective (SELMA fine-tunes LoRA with the plain diffusion loss).

SELMA uses diffusers' ``train_text_to_image_lora`` objective unchanged: MSE between the denoiser output
and the target of the scheduler's parameterisation (epsilon or v), no SNR weighting, no noise offset.
"""

from __future__ import annotations

import torch


def noisy_latents(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (DDPM forward process)."""
    abar = _per_sample(alphas_cumprod.to(x0.device, torch.float32)[t], x0)
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


def diffusion_target(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the denoiser must predict: ``noise`` (epsilon), ``sqrt(abar) noise - sqrt(1-abar) x0`` (v), or
    ``x0`` (sample)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = _per_sample(alphas_cumprod.to(x0.device, torch.float32)[t], x0)
        return (abar.sqrt() * noise.float() - (1 - abar).sqrt() * x0.float()).to(x0.dtype)
    if prediction_type == "sample":
        return x0
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r} (expected epsilon, v_prediction or sample)"
    )


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, computed in float32."""
    if model_pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(model_pred.shape)} != target shape {tuple(target.shape)}")
    return torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))
