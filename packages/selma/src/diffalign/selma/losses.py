"""The expert-training objective (SELMA fine-tunes LoRA with the plain diffusion loss).

SELMA uses diffusers' ``train_text_to_image_lora`` objective unchanged: MSE between the denoiser output
and the target of the scheduler's parameterisation (epsilon or v; ``diffalign.core.denoisers.prediction_target``),
no SNR weighting, no noise offset. ``train.loss_weighting: teacher`` (an extension) weights each
sample as the shapes teachers were trained, with core's own weighting function.
"""

from __future__ import annotations

import torch


def diffusion_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over all elements, computed in float32; with per-sample ``weights`` ``[B]``,
    the mean over samples of ``weights[i] * mse_i`` (as the shapes teachers' loss)."""
    if model_pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(model_pred.shape)} != target shape {tuple(target.shape)}")
    if weights is None:
        return torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per = (model_pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights.shape != per.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != batch shape {tuple(per.shape)}")
    return (weights.to(per) * per).mean()


def loss_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, kind: str = "none", clamp: float = 5.0
) -> torch.Tensor | None:
    """Per-sample loss weights at integer ``timesteps`` of a schedule with ``alphas_cumprod``.

    ``none``: ``None`` (the plain MSE). ``teacher``: core's shapes-teacher weighting
    (:func:`diffalign.core.shapes.teachers.snr_weight`), reused, not re-implemented."""
    if kind == "none":
        return None
    if kind != "teacher":
        raise ValueError(f"unknown loss weighting {kind!r}; expected 'none' or 'teacher'")
    from diffalign.core.shapes.teachers import snr_weight

    a = torch.as_tensor(alphas_cumprod).to("cpu", torch.float64)[timesteps.to("cpu").long()]
    return snr_weight(a, clamp).float()


def drop_captions(prompts: list[str], rate: float, generator: torch.Generator) -> list[str]:
    """Each prompt replaced by ``""`` with probability ``rate`` (independently, from ``generator``)."""
    if not 0 <= rate < 1:
        raise ValueError(f"caption dropout must be in [0, 1), got {rate}")
    if rate == 0:
        return list(prompts)
    u = torch.rand(len(prompts), generator=generator)
    return ["" if float(x) < rate else p for x, p in zip(u, prompts)]
