"""Generate images with any supported diffusers transformer pipeline, one seeded generator per image."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .hooks import reset_schedule_state

__all__ = ["pipeline_call_kwargs", "generate"]


def _accepts(pipe, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def _class_labels(pipe, prompts: Sequence[str]) -> list[int]:
    labels = []
    for p in prompts:
        p = str(p).strip()
        if p.lstrip("-").isdigit():
            labels.append(int(p))
        elif getattr(pipe, "labels", None):
            labels.extend(pipe.get_label_ids([p]))
        else:
            raise ValueError(
                f"class-conditional pipeline {type(pipe).__name__} needs integer class labels, got {p!r}"
            )
    return labels


def pipeline_call_kwargs(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device = "cpu",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``pipe(...)`` for one batch (``prompts[i]`` sampled with ``seeds[i]``)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    kw: dict[str, Any] = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": [torch.Generator(device).manual_seed(int(s)) for s in seeds],
    }
    if _accepts(pipe, "class_labels"):
        kw["class_labels"] = _class_labels(pipe, prompts)
    else:
        kw["prompt"] = list(prompts)
    for key, value in (("height", height), ("width", width)):
        if value is not None and _accepts(pipe, key):
            kw[key] = value
    if _accepts(pipe, "use_resolution_binning"):
        kw["use_resolution_binning"] = False
    if _accepts(pipe, "clean_caption"):
        kw["clean_caption"] = False
    kw.update(extra or {})
    return kw


def _to_minus1_1(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"unexpected pipeline output type {type(images).__name__}")
    return images.float().clamp(0, 1) * 2 - 1


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1]; image i uses ``prompts[i]`` and noise from ``seeds[i]``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        kw = pipeline_call_kwargs(
            pipe,
            prompts[i : i + batch_size],
            seeds[i : i + batch_size],
            num_inference_steps,
            guidance_scale,
            height,
            width,
            device,
            extra,
        )
        kw["output_type"] = "pt" if not _accepts(pipe, "class_labels") else "np"
        reset_schedule_state(pipe)
        result = pipe(**kw)
        out.append(_to_minus1_1(result.images).cpu())
    return torch.cat(out, 0)
