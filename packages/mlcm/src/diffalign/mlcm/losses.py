"""Pure loss functions of MLCM / TLCM (arXiv 2406.05768 v6, Sec. 4).

Each function takes tensors and returns a scalar (or per-sample) loss; no model is called here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOSS_KINDS = ("l2", "pseudo_huber")


def classifier_free_guidance(
    cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: float
) -> torch.Tensor:
    """``uncond + w (cond - uncond)`` (the diffusers / paper convention; w = 1 is the conditional model).

    Applied to raw model outputs; every diffusers prediction type is affine in the output at fixed ``z_t``,
    so guiding raw outputs equals guiding eps (or x0).
    """
    return uncond_output + scale * (cond_output - uncond_output)


def consistency_distance(
    prediction: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.001
) -> torch.Tensor:
    """Per-sample distance, averaged over all non-batch dimensions.

    ``l2``: mean squared error (the paper's choice). ``pseudo_huber``: ``sqrt(d^2 + c^2) - c`` elementwise
    (the LCM training scripts' Huber option).
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    diff = prediction.float() - target.float()
    if kind == "l2":
        per_elem = diff.pow(2)
    elif kind == "pseudo_huber":
        if huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {huber_c}")
        per_elem = torch.sqrt(diff.pow(2) + huber_c**2) - huber_c
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
    return per_elem.flatten(1).mean(1)


def consistency_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    kind: str = "l2",
    huber_c: float = 0.001,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_weight: float = 1.0,
) -> torch.Tensor:
    """Consistency loss ``d(g_theta, sg(g_target))`` (Eq. 8). The target is always detached here.

    ``features`` is the optional latent perceptual hook (TLCM's latent LPIPS): a callable mapping latents
    ``[B, C, h, w]`` to features; its distance is added with ``feature_weight``.
    """
    target = target.detach()
    loss = consistency_distance(prediction, target, kind, huber_c)
    if features is not None:
        fp, ft = features(prediction), features(target).detach()
        loss = loss + feature_weight * consistency_distance(fp, ft, "l2")
    return loss.mean()


def hinge_reward_loss(
    score_positive: torch.Tensor, margin: float, score_negative: torch.Tensor | None = None
) -> torch.Tensor:
    """TLCM's MPS hinge: ``max(s0 - s(x0, c_pos), 0) + max(s(x0, c_neg), 0)`` averaged over the batch.

    Zero once the image scores at least ``margin`` for its prompt and at most 0 for an irrelevant prompt.
    """
    loss = torch.relu(margin - score_positive)
    if score_negative is not None:
        loss = loss + torch.relu(score_negative)
    return loss.mean()


def direct_reward_loss(score: torch.Tensor) -> torch.Tensor:
    """ReFL-style direct reward maximisation: ``-mean(score)``."""
    return -score.mean()
