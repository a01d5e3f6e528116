"""Inference: a DI* generator is a standard diffusers pipeline sampled with ``LCMScheduler``, one step,
``timesteps=[t*]`` and guidance 0. Nothing custom runs at sampling time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["METADATA_FILE", "to_one_step_pipeline", "sample_one_step", "read_metadata", "write_metadata"]

METADATA_FILE = "di_star.json"


def to_one_step_pipeline(pipe: Any, generator_unet: Any | None = None) -> Any:
    """Swap in ``LCMScheduler`` (built from the pipeline's own scheduler config, so the noise schedule and
    prediction type are kept) and, optionally, the trained generator UNet. Returns the same pipeline."""
    from diffusers import LCMScheduler

    if generator_unet is not None:
        pipe.unet = generator_unet
    if not isinstance(pipe.scheduler, LCMScheduler):
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def sample_one_step(
    pipe: Any,
    prompts: list[str],
    t_star: int,
    *,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    resolution: int | None = None,
    output_type: str = "pt",
) -> Any:
    """One-step sampling through the pipeline's own ``__call__``. Returns ``pipe(...).images``.

    ``output_type="pt"`` gives tensors in [0, 1]; ``"latent"`` gives the generator's clean latents.
    """
    from diffusers import LCMScheduler

    if not isinstance(pipe.scheduler, LCMScheduler):
        raise ValueError("call to_one_step_pipeline(pipe) first: DI* samples with LCMScheduler")
    if not prompts:
        raise ValueError("sample_one_step needs at least one prompt")
    num_train = pipe.scheduler.config.num_train_timesteps
    if not 0 <= int(t_star) < num_train:
        raise ValueError(f"t_star={t_star} must lie in [0, {num_train})")
    kwargs: dict[str, Any] = {}
    if resolution is not None:
        kwargs.update(height=resolution, width=resolution)
    return pipe(
        prompt=list(prompts),
        timesteps=[int(t_star)],
        guidance_scale=0.0,
        latents=latents,
        generator=generator,
        output_type=output_type,
        **kwargs,
    ).images


def write_metadata(directory: str | Path, t_star: int, **extra: Any) -> Path:
    path = Path(directory) / METADATA_FILE
    path.write_text(
        json.dumps({"method": "di-star", "t_star": int(t_star), **extra}, indent=2), encoding="utf-8"
    )
    return path


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Read ``di_star.json`` from an exported generator folder (gives ``t_star``)."""
    path = Path(directory) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a DI* generator export (pass --t-star for other one-step models)"
        )
    return json.loads(path.read_text(encoding="utf-8"))
