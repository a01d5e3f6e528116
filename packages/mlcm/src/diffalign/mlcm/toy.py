"""2-D Gaussian-mixture toy with an analytic teacher (research note Sec. 5).

Eight modes on a ring of radius 2 (std 0.15); class 0 is the left half, class 1 the right half, class 2 is
the null condition. The teacher is the exact posterior mean E[x0 | z_t, c] under SD's ``scaled_linear``
schedule, used in eps form with classifier-free guidance. The student is the teacher's conditional eps plus
a residual MLP whose last layer starts at zero (like LoRA's zero-init B). Training calls the same
``distill.py`` functions as the real trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffalign.core.denoisers import NoiseSchedule

from .distill import (
    draw_segment_pairs,
    inter_segment_loss,
    mlcd_loss,
    student_sample,
    teacher_states,
)
from .schedule import milestone_grid, sampling_timesteps, segment_map

NULL_CLASS = 2


class GaussianMixtureTeacher:
    def __init__(self, radius: float = 2.0, std: float = 0.15, num_modes: int = 8):
        angles = (
            torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes) + math.pi / num_modes
        )
        self.means = radius * torch.stack([angles.cos(), angles.sin()], 1)
        self.std = std
        left = self.means[:, 0] < 0
        # class-conditional mode masks: 0 = left half, 1 = right half, 2 = all (null condition)
        self.masks = torch.stack([left, ~left, torch.ones_like(left)])

    def posterior_mean(self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, cls: torch.Tensor):
        z64, a, s = z, alpha, sigma
        mu = self.means.to(device=z.device, dtype=z.dtype)
        var = a**2 * self.std**2 + s**2  # [B,1]
        d2 = ((z64[:, None, :] - a[:, None] * mu[None]) ** 2).sum(-1)  # [B,K]
        logw = -0.5 * d2 / var
        logw = logw.masked_fill(~self.masks.to(z.device)[cls], float("-inf"))
        w = torch.softmax(logw, -1)
        gain = a * self.std**2 / var
        x0_k = mu[None] + gain[:, None] * (z64[:, None, :] - a[:, None] * mu[None])
        return (w[..., None] * x0_k).sum(1).to(z.dtype)

    def eps(self, z, t, cls, schedule: NoiseSchedule):
        alpha, sigma = schedule.alpha_sigma(t, z)
        x0 = self.posterior_mean(z, alpha, sigma, cls)
        return (z - alpha * x0) / sigma

    def guided_eps(self, z, t, cls, schedule: NoiseSchedule, guidance: float):
        e_c = self.eps(z, t, cls, schedule)
        e_u = self.eps(z, t, torch.full_like(cls, NULL_CLASS), schedule)
        return e_u + guidance * (e_c - e_u)


def timestep_embedding(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], -1)


class ResidualStudent(nn.Module):
    """eps_student(z, t, c) = eps_teacher(z, t, c; w=1) + MLP(z, t, c), last layer zero-initialised."""

    def __init__(
        self, teacher: GaussianMixtureTeacher, schedule: NoiseSchedule, hidden: int = 128, seed: int = 0
    ):
        super().__init__()
        self.teacher, self.schedule = teacher, schedule
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = self._build(hidden)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @staticmethod
    def _build(hidden: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(2 + 32 + 3, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, z, t, cls):
        base = self.teacher.eps(z, t, cls, self.schedule)
        feats = torch.cat([z, timestep_embedding(t), nn.functional.one_hot(cls, 3).float()], -1)
        return base + self.net(feats)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistic)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sample_classes(n: int) -> torch.Tensor:
    """Class of each of ``n`` toy samples (``sample_student``, ``reference_samples``, ``teacher_samples``)."""
    return torch.arange(n) % 2


def per_class_energy_distance(
    x: torch.Tensor, y: torch.Tensor, x_cls: torch.Tensor | None = None, y_cls: torch.Tensor | None = None
) -> dict[int, float]:
    """Energy distance between the class-``c`` samples of ``x`` and of ``y``, for each class of ``y``.

    The pooled :func:`energy_distance` compares the mixture of both classes and cannot see a student
    that draws class 0's modes for class 1 and the reverse; this one can. Classes default to
    :func:`sample_classes`.
    """
    x_cls = sample_classes(len(x)) if x_cls is None else x_cls
    y_cls = sample_classes(len(y)) if y_cls is None else y_cls
    return {int(c): energy_distance(x[x_cls == c], y[y_cls == c]) for c in torch.unique(y_cls).tolist()}


@dataclass
class ToySetup:
    teacher: GaussianMixtureTeacher
    schedule: NoiseSchedule
    guidance: float = 3.0

    def teacher_fn(self, cls):
        return lambda z, t: self.teacher.guided_eps(z, t, cls, self.schedule, self.guidance)

    def teacher_ddim(self, noise, cls, steps: int) -> torch.Tensor:
        ts = torch.linspace(999, 0, steps + 1).round().long().tolist()
        z = noise
        fn = self.teacher_fn(cls)
        for t, s in zip(ts[:-1], ts[1:]):
            tt, ss = torch.full_like(cls, t), torch.full_like(cls, s)
            z = segment_map(fn(z, tt), z, tt, ss, self.schedule, "epsilon")
        return z


def make_toy(guidance: float = 3.0) -> ToySetup:
    return ToySetup(GaussianMixtureTeacher(), NoiseSchedule.scaled_linear(), guidance)


def train_stage1(
    setup: ToySetup,
    student: ResidualStudent,
    num_segments: int = 4,
    iterations: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-4,
    skip: int = 20,
    seed: int = 0,
    boundary_offset: int = 0,
) -> list[float]:
    """Stage-1 MLCD on the toy. ``boundary_offset=1`` is the negative control: the segment map jumps one
    milestone too far (to the next segment's lower boundary)."""
    gen = torch.Generator().manual_seed(seed)
    milestones = milestone_grid(num_segments)
    m = torch.as_tensor(milestones)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    losses = []
    for _ in range(iterations):
        cls = torch.randint(0, 2, (batch_size,), generator=gen)
        pairs = draw_segment_pairs(batch_size, milestones, skip, gen)
        if boundary_offset:
            pairs.boundary = m[(pairs.segment + 1 + boundary_offset).clamp(max=num_segments)]
        noise = torch.randn(batch_size, 2, generator=gen)
        z_up = teacher_states(
            setup.teacher_fn(cls), noise, pairs.t_upper, setup.schedule, "epsilon", "mds", num_segments
        )
        out = mlcd_loss(
            lambda z, t, c=cls: student(z, t, c),
            setup.teacher_fn(cls),
            z_up,
            pairs,
            setup.schedule,
            "epsilon",
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def train_stage2(
    setup: ToySetup,
    student: ResidualStudent,
    num_segments: int = 4,
    iterations: int = 500,
    batch_size: int = 256,
    lr: float = 2e-4,  # toy choice: 1e-4 leaves the 2-step bound marginal at 500 iterations
    sample_steps: int = 4,
    teacher_substeps: int = 3,
    seed: int = 1,
) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    milestones = milestone_grid(num_segments)
    q_steps = sampling_timesteps(min(sample_steps, num_segments), num_segments)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    losses = []
    for _ in range(iterations):
        cls = torch.randint(0, 2, (batch_size,), generator=gen)
        fn = lambda z, t, c=cls: student(z, t, c)  # noqa: E731
        with torch.no_grad():
            x0_hat = student_sample(
                fn,
                torch.randn(batch_size, 2, generator=gen),
                q_steps,
                setup.schedule,
                "epsilon",
                "renoise",
                gen,
            )
        out = inter_segment_loss(
            fn,
            setup.teacher_fn(cls),
            x0_hat,
            milestones,
            setup.schedule,
            "epsilon",
            teacher_substeps,
            generator=gen,
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def sample_student(
    setup: ToySetup, student: ResidualStudent, timesteps: Sequence[int], sampler: str, n: int, seed: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cls = sample_classes(n)
    noise = torch.randn(n, 2, generator=gen)
    with torch.no_grad():
        return student_sample(
            lambda z, t: student(z, t, cls), noise, timesteps, setup.schedule, "epsilon", sampler, gen
        )


def reference_samples(setup: ToySetup, n: int = 2000, steps: int = 100, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cls = sample_classes(n)
    return setup.teacher_ddim(torch.randn(n, 2, generator=gen), cls, steps)


def teacher_samples(setup: ToySetup, steps: int, n: int = 2000, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cls = sample_classes(n)
    return setup.teacher_ddim(torch.randn(n, 2, generator=gen), cls, steps)
