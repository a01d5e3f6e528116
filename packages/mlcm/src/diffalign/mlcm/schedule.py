"""Milestone grid and DDIM segment maps (the noise schedule and prediction types are core's).

Notation follows the paper (arXiv 2406.05768 v6, Sec. 4.1): a latent at integer timestep ``t`` is
``z_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t = sqrt(alphas_cumprod[t])`` and
``sigma_t = sqrt(1 - alphas_cumprod[t])``. Milestones are listed in *descending* order,
``milestones[0] = T - 1`` and ``milestones[M] = 0``; segment ``s`` spans ``(milestones[s+1], milestones[s]]``
and its lower boundary is ``milestones[s+1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from diffalign.core.denoisers import NoiseSchedule, to_x0_eps

# Official TLCM inference timesteps on the 8-segment grid [999, 874, ..., 124, 0] (indices into the grid).
OFFICIAL_STEP_INDICES: dict[int, list[int]] = {
    1: [0],
    2: [0, 4],
    3: [0, 4, 7],
    4: [0, 2, 4, 7],
    5: [0, 2, 4, 6, 7],
    6: [0, 2, 4, 5, 6, 7],
    7: [0, 2, 3, 4, 5, 6, 7],
    8: [0, 1, 2, 3, 4, 5, 6, 7],
}


def milestone_grid(num_segments: int = 8, num_train_timesteps: int = 1000) -> list[int]:
    """``linspace(T-1, 0, M+1)`` cast to int (truncation), descending. M=8 gives [999, 874, ..., 124, 0]."""
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if num_segments >= num_train_timesteps:
        raise ValueError(
            f"num_segments ({num_segments}) must be < num_train_timesteps ({num_train_timesteps})"
        )
    grid = np.linspace(num_train_timesteps - 1, 0, num_segments + 1).astype(np.int64)
    return [int(x) for x in grid]


def sampling_timesteps(num_steps: int, num_segments: int = 8, num_train_timesteps: int = 1000) -> list[int]:
    """Timesteps at which the student is evaluated for an ``num_steps``-step sample.

    On the 8-segment grid this is the official TLCM table (2 steps: [999, 499]; 4: [999, 749, 499, 124]).
    For other grids, ``num_steps`` milestones spread evenly over the segment upper boundaries.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps > num_segments:
        raise ValueError(
            f"num_steps ({num_steps}) exceeds the number of segments ({num_segments}); "
            "the student only has milestones to stop at"
        )
    grid = milestone_grid(num_segments, num_train_timesteps)
    if num_segments == 8:
        idx = OFFICIAL_STEP_INDICES[num_steps]
    else:
        idx = [int(math.floor(i * num_segments / num_steps)) for i in range(num_steps)]
    return [grid[i] for i in idx]


def segment_index(t: torch.Tensor, milestones: Sequence[int]) -> torch.Tensor:
    """Index ``s`` of the segment ``(milestones[s+1], milestones[s]]`` containing each ``t``.

    ``t == 0`` (the final milestone) belongs to the last segment.
    """
    m = torch.as_tensor(list(milestones), device=t.device, dtype=torch.long)
    # number of lower boundaries strictly below t, counted from the top
    lowers = m[1:]
    s = (t.long().unsqueeze(-1) <= lowers).sum(-1)
    return s.clamp(max=len(milestones) - 2)


def segment_boundary(t: torch.Tensor, milestones: Sequence[int]) -> torch.Tensor:
    """Lower boundary ``milestones[s+1]`` of the segment containing each ``t``."""
    m = torch.as_tensor(list(milestones), device=t.device, dtype=torch.long)
    return m[segment_index(t, milestones) + 1]


def ddim_jump(
    x0: torch.Tensor, eps: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM update to timestep ``s``: ``alpha_s x0 + sigma_s eps``."""
    return alpha_s * x0 + sigma_s * eps


def inverse_ddim(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
) -> torch.Tensor:
    """The x0 for which a DDIM jump from ``z_t`` (t) lands exactly on ``z_s`` (s), as in MCM.

    ``x0 = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - alpha_t sigma_s / sigma_t)``.
    """
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - alpha_t * ratio)


def segment_map(
    model_output: torch.Tensor,
    z_t: torch.Tensor,
    t: torch.Tensor,
    boundary: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str,
) -> torch.Tensor:
    """``g(z_t, t, t_s) = DDIM(z_t, f(z_t, t), t -> t_s)``: jump the prediction to the segment boundary."""
    alpha_t, sigma_t = schedule.alpha_sigma(t, z_t)
    x0, eps = to_x0_eps(model_output, z_t, alpha_t, sigma_t, prediction_type)
    alpha_s, sigma_s = schedule.alpha_sigma(boundary, z_t)
    out = ddim_jump(x0, eps, alpha_s, sigma_s)
    # DDIM from t to t is the identity; make it exact (avoids 1/alpha round-off at t == boundary).
    same = (torch.as_tensor(t, device=z_t.device) == torch.as_tensor(boundary, device=z_t.device)).reshape(
        (-1,) + (1,) * (z_t.ndim - 1) if torch.as_tensor(t).ndim else ()
    )
    return torch.where(same, z_t, out)
