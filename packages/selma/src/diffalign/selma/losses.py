"""The expert-training objective (SELMA fine-tunes LoRA with the plain diffusion loss).

SELMA uses diffusers' ``train_text_to_image_lora`` objective unchanged: MSE between the denoiser output
and the target of the scheduler's parameterisation (epsilon or v; ``diffalign.core.denoisers.prediction_target``),
no SNR weighting, no noise offset.
"""

from __future__ import annotations

import torch


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, computed in float32."""
    if model_pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(model_pred.shape)} != target shape {tuple(target.shape)}")
    return torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
