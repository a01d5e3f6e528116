"""Tiny models built from configs, for tests and architecture coverage. Nothing is downloaded.

Models are returned in eval mode (no dropout), so sampling is deterministic; call ``.train()`` to train.

Every factory is seeded, so two calls return identical weights. Pipelines sample 16x16 RGB images from
8x8x4 latents in a fraction of a second on a CPU.
"""

from __future__ import annotations

from .models import (
    TINY_WORDS,
    tiny_clip_text_encoder,
    tiny_clip_text_encoder_with_projection,
    tiny_dit_transformer,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_flux_vae,
    tiny_pixart_pipeline,
    tiny_pixart_sized_pipeline,
    tiny_pixart_transformer,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_sdxl_unet,
    tiny_t5_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)


def tiny_qwen2_5_vl(*args, **kwargs):
    """A tiny Qwen2.5-VL model and processor (see ``diffalign.core.tiny_vlm``)."""
    from diffalign.core.tiny_vlm import tiny_qwen2_5_vl as factory

    return factory(*args, **kwargs)


__all__ = [
    "TINY_WORDS",
    "tiny_tokenizer",
    "tiny_clip_text_encoder",
    "tiny_clip_text_encoder_with_projection",
    "tiny_t5_encoder",
    "tiny_vae",
    "tiny_flux_vae",
    "tiny_unet",
    "tiny_sdxl_unet",
    "tiny_pixart_transformer",
    "tiny_dit_transformer",
    "tiny_flux_transformer",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_pixart_pipeline",
    "tiny_pixart_sized_pipeline",
    "tiny_flux_pipeline",
    "tiny_qwen2_5_vl",
]
