"""Load a distilled student into a standard diffusers pipeline and sample it in 2-8 steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .scheduler import MLCMScheduler

STUDENT_FILE = "mlcm_student.json"


def read_student_meta(student_dir: str | Path) -> dict:
    path = Path(student_dir) / STUDENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{student_dir} is not an MLCM student folder (no {STUDENT_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def apply_student(pipe, student_dir: str | Path, sampler: str | None = None):
    """Put the student into ``pipe`` (LoRA weights or a full denoiser) and swap in ``MLCMScheduler``
    (its exported segments and sampler; ``sampler`` overrides the sampler)."""
    student_dir = Path(student_dir)
    meta = read_student_meta(student_dir)
    if meta["mode"] == "lora":
        from diffalign.core.lora import load_lora

        load_lora(pipe, student_dir)
    else:
        if (student_dir / "unet").is_dir():
            pipe.unet = type(pipe.unet).from_pretrained(student_dir / "unet").to(pipe.device, pipe.unet.dtype)
        else:
            cls = type(pipe.transformer)
            pipe.transformer = cls.from_pretrained(student_dir / "transformer").to(
                pipe.device, pipe.transformer.dtype
            )
    overrides = {} if sampler is None else {"sampler": sampler}
    pipe.scheduler = MLCMScheduler.from_pretrained(student_dir, subfolder="scheduler", **overrides)
    return pipe


def load_student(
    student_dir: str | Path, base: str | None = None, sampler: str | None = None, dtype=None, device=None
):
    """Base pipeline (``base`` or the one recorded at export) with the student applied."""
    from diffalign.core.models import load_pipeline

    meta = read_student_meta(student_dir)
    pipe = load_pipeline(base or meta["base"], dtype=dtype, device=device)
    return apply_student(pipe, student_dir, sampler)


def pipeline_kwargs(pipe) -> dict:
    """Extra call arguments some pipelines need at small, non-standard resolutions."""
    from diffalign.core.models import detect_family

    if detect_family(pipe) == "pixart":
        return {"use_resolution_binning": False, "clean_caption": False}
    return {}


@torch.no_grad()
def sample_images(
    pipe,
    prompts: list[str],
    num_inference_steps: int,
    guidance_scale: float = 0.0,
    seed: int = 0,
    batch_size: int = 50,
    resolution: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Images in [-1, 1], [B, 3, H, W], sampled with whatever scheduler ``pipe`` holds."""
    out = []
    extra = {**pipeline_kwargs(pipe), **kwargs}
    if resolution is not None:
        extra.update(height=resolution, width=resolution)
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator().manual_seed(seed + i)
        images = pipe(
            prompt=prompts[i : i + batch_size],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="pt",
            **extra,
        ).images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)
