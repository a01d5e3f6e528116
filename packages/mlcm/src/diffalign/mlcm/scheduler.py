"""A diffusers scheduler for MLCM students: ``pipe.scheduler = MLCMScheduler.from_config(pipe.scheduler.config)``.

Timesteps are subsets of the milestone grid ``linspace(T-1, 0, M+1)`` (the official TLCM table for M = 8).
Two samplers:

* ``renoise`` (default, the official TLCM inference loop): x0 from the model, then fresh noise at the next
  milestone (``add_noise(x0, noise, t_next)``), like LCM's multistep sampler.
* ``deterministic``: a DDIM jump of the model's x0 and implied eps to the next milestone, the map the
  student is trained with (MCM / PCM style).

``num_segments`` is the grid the student was trained on (an exported student records it with its
sampler). A single-segment student (LCM: every timestep maps straight to x0) has no intermediate milestone;
it samples on the 8-segment table, the same timesteps as the MLCM students it is compared with.

The final step returns the x0 prediction. Run the pipeline with ``guidance_scale`` at or below 1 (CFG is
distilled into the student).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffalign.core.denoisers import to_x0_eps

from .schedule import milestone_grid, sampling_timesteps

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # the DDPM-family types

SAMPLERS = ("renoise", "deterministic")

SINGLE_SEGMENT_SAMPLING_GRID = 8  # the official TLCM table's grid


@dataclass
class MLCMSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent for the next model call (x0 after the last step); ``denoised``: x0."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas):
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), 0.999)
            for i in range(num_train_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not supported by MLCMScheduler")


class MLCMScheduler(SchedulerMixin, ConfigMixin):
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        num_segments: int = 8,
        sampler: str = "renoise",
        rescale_betas_zero_snr: bool = False,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        milestone_grid(num_segments, num_train_timesteps)  # validates num_segments
        self.betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor(
            milestone_grid(self._sampling_segments(num_segments), num_train_timesteps)[:-1],
            dtype=torch.long,
        )
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @staticmethod
    def _sampling_segments(num_segments: int) -> int:
        return SINGLE_SEGMENT_SAMPLING_GRID if num_segments == 1 else num_segments

    @property
    def sampling_segments(self) -> int:
        """Grid the sampling timesteps are taken from: the trained one, or 8 for a single segment."""
        return self._sampling_segments(self.config.num_segments)

    @property
    def milestones(self) -> list[int]:
        """The grid timesteps may be picked from (``sampling_segments`` segments)."""
        return milestone_grid(self.sampling_segments, self.config.num_train_timesteps)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Pick ``num_inference_steps`` milestones, or use explicit ``timesteps`` (each must be a milestone)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            grid = set(self.milestones[:-1])
            bad = [t for t in timesteps if int(t) not in grid]
            if bad:
                raise ValueError(
                    f"timesteps {bad} are not milestones of the {self.sampling_segments}-segment grid"
                )
            ts = sorted({int(t) for t in timesteps}, reverse=True)
        else:
            ts = sampling_timesteps(
                num_inference_steps, self.sampling_segments, self.config.num_train_timesteps
            )
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self._step_index = None
        self._begin_index = None

    def _index_for(self, timestep) -> int:
        t = int(timestep.item() if torch.is_tensor(timestep) else timestep)
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not in the current schedule {self.timesteps.tolist()}")
        return int(hits[0])

    def _alpha_sigma(self, t: int, like: torch.Tensor):
        abar = self.alphas_cumprod[int(t)].to(device=like.device, dtype=like.dtype)
        return abar.sqrt(), (1 - abar).sqrt()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> MLCMSchedulerOutput | tuple:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = (
                self._begin_index if self._begin_index is not None else self._index_for(timestep)
            )
        t = int(self.timesteps[self._step_index])
        alpha_t, sigma_t = self._alpha_sigma(t, sample)
        x0, eps = to_x0_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)
        if self._step_index + 1 < len(self.timesteps):
            alpha_s, sigma_s = self._alpha_sigma(int(self.timesteps[self._step_index + 1]), sample)
            if self.config.sampler == "renoise":
                eps = randn_tensor(
                    model_output.shape, generator=generator, device=sample.device, dtype=sample.dtype
                )
            prev = alpha_s * x0 + sigma_s * eps
        else:
            prev = x0
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return MLCMSchedulerOutput(prev_sample=prev, denoised=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        abar = self.alphas_cumprod.to(original_samples.device)[timesteps.long().to(original_samples.device)]
        abar = abar.to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
