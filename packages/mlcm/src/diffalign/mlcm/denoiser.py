"""Uniform access to a diffusers pipeline's denoising network for distillation.

Supports ``StableDiffusionPipeline`` (SD1.5-style UNet), ``StableDiffusionXLPipeline`` (UNet with
``text_time`` added conditions) and ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` (PixArt transformer,
learned sigma dropped). The model functions returned here follow ``distill.ModelFn``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .losses import classifier_free_guidance
from .schedule import PREDICTION_TYPES, NoiseSchedule

ARCH_SD, ARCH_SDXL, ARCH_PIXART = "sd", "sdxl", "pixart"

# LoRA targets (the TLCM / LCM-LoRA list for UNets; attention + MLP projections for PixArt).
DEFAULT_LORA_TARGETS = {
    ARCH_SD: [
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
    ],
    ARCH_PIXART: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}  # fmt: skip
DEFAULT_LORA_TARGETS[ARCH_SDXL] = DEFAULT_LORA_TARGETS[ARCH_SD]


def detect_architecture(pipe) -> str:
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return ARCH_SDXL if getattr(unet.config, "addition_embed_type", None) == "text_time" else ARCH_SD
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and type(transformer).__name__ == "PixArtTransformer2DModel":
        return ARCH_PIXART
    raise ValueError(
        f"MLCM supports StableDiffusion, StableDiffusionXL and PixArt pipelines; got {type(pipe).__name__} "
        f"with denoiser {type(unet or transformer).__name__}"
    )


@dataclass
class PromptConditioning:
    """Model keyword arguments for the conditional and the unconditional (negative) branch."""

    cond: dict
    uncond: dict

    def select(self, rows: torch.Tensor) -> PromptConditioning:
        pick = lambda d: {k: (v[rows] if torch.is_tensor(v) else v) for k, v in d.items()}  # noqa: E731
        return PromptConditioning(pick(self.cond), pick(self.uncond))


def _cat_kwargs(a: dict, b: dict) -> dict:
    out = {}
    for k in a:
        if isinstance(a[k], dict):
            out[k] = _cat_kwargs(a[k], b[k])
        elif torch.is_tensor(a[k]):
            out[k] = torch.cat([a[k], b[k]])
        else:
            out[k] = a[k]
    return out


class PipelineDenoiser:
    """Encodes prompts and calls the pipeline's UNet / transformer with per-sample integer timesteps."""

    def __init__(self, pipe, resolution: int | None = None, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.arch = detect_architecture(pipe)
        self.model: nn.Module = pipe.unet if self.arch in (ARCH_SD, ARCH_SDXL) else pipe.transformer
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r}; expected {PREDICTION_TYPES}"
            )
        self.schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
        cfg = self.model.config
        self.latent_channels = cfg.in_channels
        self.vae_scale_factor = pipe.vae_scale_factor
        self.resolution = resolution or int(cfg.sample_size) * self.vae_scale_factor
        if self.resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_scale_factor}"
            )
        self.learned_sigma = self.arch == ARCH_PIXART and cfg.out_channels == 2 * cfg.in_channels
        tok_max = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 120) or 120
        self.max_sequence_length = max_sequence_length or min(120, int(tok_max))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (batch_size, self.latent_channels, side, side)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str = "") -> PromptConditioning:
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        pipe, dev, n = self.pipe, self.device, len(prompts)
        neg = [negative_prompt] * n
        if self.arch == ARCH_SD:
            pe, npe = pipe.encode_prompt(prompts, dev, 1, True, negative_prompt=neg)
            return PromptConditioning({"encoder_hidden_states": pe}, {"encoder_hidden_states": npe})
        if self.arch == ARCH_SDXL:
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=neg if negative_prompt else None,
            )  # fmt: skip
            size = self.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=dev, dtype=pe.dtype).repeat(n, 1)
            return PromptConditioning(
                {
                    "encoder_hidden_states": pe,
                    "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
                },
                {
                    "encoder_hidden_states": npe,
                    "added_cond_kwargs": {"text_embeds": npooled, "time_ids": time_ids},
                },
            )
        pe, mask, npe, nmask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt=negative_prompt, num_images_per_prompt=1,
            device=dev, clean_caption=False, max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return PromptConditioning(
            {"encoder_hidden_states": pe, "encoder_attention_mask": mask},
            {"encoder_hidden_states": npe, "encoder_attention_mask": nmask},
        )

    def _pixart_added(self, batch: int, dtype, device) -> dict:
        if self.model.config.sample_size == 128:  # PixArt-alpha 1024px resolution conditioning
            res = torch.tensor([[self.resolution, self.resolution]], dtype=dtype, device=device).repeat(
                batch, 1
            )
            ar = torch.ones(batch, 1, dtype=dtype, device=device)
            return {"resolution": res, "aspect_ratio": ar}
        return {"resolution": None, "aspect_ratio": None}

    def forward(self, model: nn.Module, z: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        if self.arch == ARCH_PIXART:
            out = model(
                z, timestep=t, added_cond_kwargs=self._pixart_added(z.shape[0], z.dtype, z.device),
                return_dict=False, **kwargs,
            )[0]  # fmt: skip
            if self.learned_sigma:
                out = out.chunk(2, dim=1)[0]
            return out
        return model(z, t, return_dict=False, **kwargs)[0]

    def model_fn(self, model: nn.Module, kwargs: dict):
        """Unguided model function (the student, or the teacher at w = 1)."""
        return lambda z, t: self.forward(model, z, t, kwargs)

    def guided_fn(self, model: nn.Module, cond: PromptConditioning, guidance_scale: float, context=None):
        """Classifier-free-guided model function; ``context`` (e.g. adapters disabled) wraps each call."""

        def fn(z, t):
            t = torch.as_tensor(t, device=z.device)
            t = t.expand(z.shape[0]) if t.ndim == 0 else t
            with context() if context is not None else contextlib.nullcontext():
                if guidance_scale == 1.0:
                    return self.forward(model, z, t, cond.cond)
                out = self.forward(
                    model, torch.cat([z, z]), torch.cat([t, t]), _cat_kwargs(cond.uncond, cond.cond)
                )
            uncond, condi = out.chunk(2)
            return classifier_free_guidance(condi, uncond, guidance_scale)

        return fn

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] through the VAE decoder (differentiable)."""
        vae = self.pipe.vae
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(vae.dtype) / scale + shift, return_dict=False)[0].clamp(-1, 1)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The LoRA student's base model is the teacher: disable every adapter for the duration."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
