"""The MLCM / TLCM algorithm on abstract denoisers.

A *model function* is ``fn(z, t) -> raw model output`` (conditioning is closed over; the output is in the
model's diffusers ``prediction_type``). The teacher function already applies classifier-free guidance.
Everything here is shared by the real trainer (``train.py``) and the 2-D toy (``toy.py``), so the toy tests
exercise exactly the code that trains real models.

Paper references are to arXiv 2406.05768 v6: Alg. 1 (stage 1, data-free MLCD with the multistep denoising
strategy) and Alg. 2 (stage 2, inter-segment consistency between adjacent milestones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffalign.core.denoisers import NoiseSchedule, to_x0_eps

from .losses import consistency_loss
from .schedule import ddim_jump, segment_map

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SegmentPairs:
    """One stage-1 training pair per sample: ``t_upper`` (t_m) -> ``t_lower`` (t_n), inside ``segment``."""

    segment: torch.Tensor
    t_upper: torch.Tensor
    t_lower: torch.Tensor
    boundary: torch.Tensor


def draw_segment_pairs(
    batch_size: int,
    milestones: Sequence[int],
    skip: int,
    generator: torch.Generator | None = None,
    per_sample: bool = True,
    device: torch.device | str = "cpu",
) -> SegmentPairs:
    """Pick a segment uniformly, ``t_m ~ U{boundary+1 .. upper}``, ``t_n = max(t_m - skip, boundary)``.

    When the skip crosses the boundary the pair ends on the boundary itself, where the segment map is the
    identity (the crossing case; our choice, see the research note).
    """
    if skip < 1:
        raise ValueError(f"skip must be >= 1, got {skip}")
    m = torch.as_tensor(list(milestones), dtype=torch.long)
    num_segments = len(m) - 1
    if per_sample:
        segment = torch.randint(0, num_segments, (batch_size,), generator=generator)
    else:
        segment = torch.randint(0, num_segments, (1,), generator=generator).expand(batch_size).clone()
    upper, boundary = m[segment], m[segment + 1]
    width = (upper - boundary).double()
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    t_upper = boundary + 1 + torch.floor(u * width).long().clamp(max=(upper - boundary - 1))
    t_lower = torch.maximum(t_upper - skip, boundary)
    return SegmentPairs(*(x.to(device) for x in (segment, t_upper, t_lower, boundary)))


def mds_num_steps(
    t: torch.Tensor, num_train_timesteps: int = 1000, reference_segments: int = 8
) -> torch.Tensor:
    """Multistep denoising strategy: teacher steps needed to reach ``t`` from ``T-1``.

    With ``reference_segments = M`` this is the paper's ``L = M - s`` (ascending segment index s), i.e. one step
    for the top segment and M steps for the lowest one. Keeping the reference at 8 while the trained grid
    changes (segment halving, the single-segment baseline) keeps the state distribution comparable.
    """
    width = (num_train_timesteps - 1) / reference_segments
    steps = torch.floor((num_train_timesteps - 1 - t.double()) / width).long() + 1
    return steps.clamp(1, reference_segments)


def ddim_step(
    model_fn: ModelFn,
    z: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str,
) -> torch.Tensor:
    """One deterministic DDIM step ``t -> s`` of ``model_fn`` (exact identity where ``t == s``)."""
    return segment_map(model_fn(z, t), z, t, s, schedule, prediction_type)


def teacher_trajectory(
    teacher_fn: ModelFn,
    noise: torch.Tensor,
    t_target: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str,
    num_steps: torch.Tensor,
) -> torch.Tensor:
    """Run the (guided) teacher's DDIM from ``z_{T-1} = noise`` to ``t_target`` in ``num_steps`` equal steps.

    Per-sample targets and step counts; samples that finish early stay put (identity steps).
    """
    start = schedule.num_train_timesteps - 1
    t_target = t_target.long()
    num_steps = num_steps.long().clamp(min=1)
    span = (start - t_target).double()
    z = noise
    for k in range(int(num_steps.max())):
        kk = torch.full_like(num_steps, k)
        cur = start - torch.round(span * torch.minimum(kk, num_steps).double() / num_steps).long()
        nxt = start - torch.round(span * torch.minimum(kk + 1, num_steps).double() / num_steps).long()
        if bool((cur == nxt).all()):
            continue
        z = ddim_step(teacher_fn, z, cur.to(noise.device), nxt.to(noise.device), schedule, prediction_type)
    return z


def teacher_states(
    teacher_fn: ModelFn,
    noise: torch.Tensor,
    t_target: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str,
    strategy: str = "mds",
    reference_segments: int = 8,
) -> torch.Tensor:
    """Training states ``z_{t_m}`` from the teacher's own CFG trajectories (no real data).

    ``strategy="mds"``: multistep denoising strategy; ``"single"``: one DDIM step from ``T-1`` (v6 ablation).
    """
    if strategy == "mds":
        steps = mds_num_steps(t_target, schedule.num_train_timesteps, reference_segments)
    elif strategy == "single":
        steps = torch.ones_like(t_target)
    else:
        raise ValueError(f"unknown trajectory strategy {strategy!r}; expected 'mds' or 'single'")
    with torch.no_grad():
        return teacher_trajectory(teacher_fn, noise, t_target, schedule, prediction_type, steps.cpu())


@dataclass
class LossOutput:
    loss: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor


def mlcd_loss(
    student_fn: ModelFn,
    teacher_fn: ModelFn,
    z_upper: torch.Tensor,
    pairs: SegmentPairs,
    schedule: NoiseSchedule,
    prediction_type: str,
    loss_kind: str = "l2",
    huber_c: float = 0.001,
    target_fn: ModelFn | None = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_weight: float = 1.0,
    teacher_prediction_type: str | None = None,
) -> LossOutput:
    """Stage-1 loss (Eq. 8): ``|| g_theta(z_tm, t_m, t_s) - sg g_target(z_tn, t_n, t_s) ||``.

    ``z_tn`` is one guided teacher DDIM step over the skip; ``target_fn`` defaults to the online student
    (the paper drops EMA) and is always evaluated without gradients.
    """
    dev = z_upper.device
    t_up, t_lo, bnd = pairs.t_upper.to(dev), pairs.t_lower.to(dev), pairs.boundary.to(dev)
    with torch.no_grad():
        z_lower = ddim_step(
            teacher_fn, z_upper, t_up, t_lo, schedule, teacher_prediction_type or prediction_type
        )
        target = segment_map(
            (target_fn or student_fn)(z_lower, t_lo), z_lower, t_lo, bnd, schedule, prediction_type
        )
    prediction = segment_map(student_fn(z_upper, t_up), z_upper, t_up, bnd, schedule, prediction_type)
    loss = consistency_loss(prediction, target, loss_kind, huber_c, features, feature_weight)
    return LossOutput(loss, prediction, target)


def student_sample(
    student_fn: ModelFn,
    noise: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    prediction_type: str,
    sampler: str = "renoise",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multistep student sampling on a milestone subset; returns the final x0 prediction.

    ``deterministic``: DDIM segment jumps with the predicted eps (the training-time map).
    ``renoise``: the official TLCM / LCM sampler, fresh noise at every intermediate milestone.
    """
    if sampler not in ("deterministic", "renoise"):
        raise ValueError(f"unknown sampler {sampler!r}; expected 'deterministic' or 'renoise'")
    z = noise
    x0 = noise
    for i, t in enumerate(timesteps):
        tt = torch.full((z.shape[0],), int(t), dtype=torch.long, device=z.device)
        alpha_t, sigma_t = schedule.alpha_sigma(tt, z)
        x0, eps = to_x0_eps(student_fn(z, tt), z, alpha_t, sigma_t, prediction_type)
        if i == len(timesteps) - 1:
            break
        alpha_s, sigma_s = schedule.alpha_sigma(torch.full_like(tt, int(timesteps[i + 1])), z)
        if sampler == "renoise":
            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        z = ddim_jump(x0, eps, alpha_s, sigma_s)
    return x0


def inter_segment_loss(
    student_fn: ModelFn,
    teacher_fn: ModelFn,
    x0_hat: torch.Tensor,
    milestones: Sequence[int],
    schedule: NoiseSchedule,
    prediction_type: str,
    teacher_substeps: int = 3,
    loss_kind: str = "l2",
    huber_c: float = 0.001,
    generator: torch.Generator | None = None,
    teacher_prediction_type: str | None = None,
) -> LossOutput:
    """Stage 2 (Alg. 2): re-noise a detached student sample to a random milestone ``t_m``, run ``p`` guided
    teacher DDIM sub-steps to the next milestone ``t_n``, and match ``f_theta(z_tm)`` to ``sg f_theta(z_tn)``
    in x0 space."""
    if teacher_substeps < 1:
        raise ValueError(f"teacher_substeps must be >= 1, got {teacher_substeps}")
    dev = x0_hat.device
    bsz = x0_hat.shape[0]
    m = torch.as_tensor(list(milestones), dtype=torch.long)
    seg = torch.randint(0, len(m) - 1, (bsz,), generator=generator)
    t_m, t_n = m[seg].to(dev), m[seg + 1].to(dev)
    noise = torch.randn(x0_hat.shape, generator=generator, dtype=x0_hat.dtype).to(dev)
    alpha_m, sigma_m = schedule.alpha_sigma(t_m, x0_hat)
    z_m = alpha_m * x0_hat.detach() + sigma_m * noise
    tpt = teacher_prediction_type or prediction_type
    with torch.no_grad():
        z_n = z_m
        span = (t_m - t_n).double()
        for k in range(teacher_substeps):
            cur = t_m - torch.round(span * k / teacher_substeps).long()
            nxt = t_m - torch.round(span * (k + 1) / teacher_substeps).long()
            z_n = ddim_step(teacher_fn, z_n, cur, nxt, schedule, tpt)
        alpha_n, sigma_n = schedule.alpha_sigma(t_n, z_n)
        target, _ = to_x0_eps(student_fn(z_n, t_n), z_n, alpha_n, sigma_n, prediction_type)
    prediction, _ = to_x0_eps(student_fn(z_m, t_m), z_m, alpha_m, sigma_m, prediction_type)
    loss = consistency_loss(prediction, target, loss_kind, huber_c)
    return LossOutput(loss, prediction, target)


def renoised_x0_prediction(
    student_fn: ModelFn,
    x0_hat: torch.Tensor,
    milestones: Sequence[int],
    schedule: NoiseSchedule,
    prediction_type: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Student x0 prediction (with gradients) from a detached sample re-noised to a random milestone;
    the input of the reward losses."""
    dev = x0_hat.device
    m = torch.as_tensor(list(milestones)[:-1], dtype=torch.long)
    t = m[torch.randint(0, len(m), (x0_hat.shape[0],), generator=generator)].to(dev)
    noise = torch.randn(x0_hat.shape, generator=generator, dtype=x0_hat.dtype).to(dev)
    alpha, sigma = schedule.alpha_sigma(t, x0_hat)
    z = alpha * x0_hat.detach() + sigma * noise
    x0, _ = to_x0_eps(student_fn(z, t), z, alpha, sigma, prediction_type)
    return x0
