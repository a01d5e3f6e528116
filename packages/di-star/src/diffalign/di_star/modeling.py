"""Glue between the DI* losses and diffusers UNets: noise schedule, prompt conditioning (SD and SDXL),
epsilon predictions from any prediction type, and the one-step generator g_theta(z, c).

The generator follows DMD2 / DI*: it receives *pure* Gaussian latent noise z ~ N(0, I) (not rescaled) at
a fixed timestep t* and returns x0_hat = (z - sigma_t* eps_theta(z, t*, c)) / alpha_t* (or the v / sample
equivalent).  This is exactly what ``LCMScheduler`` with one step, ``timesteps=[t*]`` and guidance 0
computes inside a standard pipeline (up to LCM's boundary scalings, c_skip ~ 1e-8 at t* = 399).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .losses import PredictionType, to_epsilon, to_x0

__all__ = [
    "NoiseSchedule",
    "Conditioning",
    "is_sdxl_unet",
    "encode_prompts",
    "unet_output",
    "predict_epsilon",
    "generate_x0",
    "latent_shape",
    "decode_latents",
]

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class NoiseSchedule:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) for integer DDPM timesteps, from a scheduler."""

    def __init__(self, scheduler: Any):
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            raise ValueError(
                f"scheduler {type(scheduler).__name__} has no alphas_cumprod; DI* needs a DDPM-type "
                "(variance-preserving) noise schedule"
            )
        self.alphas_cumprod = abar.detach().to(torch.float64).cpu()
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.prediction_type: PredictionType = scheduler.config.get("prediction_type", "epsilon")

    def alpha_sigma(self, timesteps: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        t = timesteps.detach().long().cpu()
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got {t.tolist()}")
        abar = self.alphas_cumprod[t]
        device = timesteps.device
        return abar.sqrt().to(device, dtype), (1 - abar).sqrt().to(device, dtype)

    def sample_timesteps(
        self, batch: int, low: int, high: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """Integer timesteps uniform on [low, high] (inclusive)."""
        if not 0 <= low <= high < self.num_train_timesteps:
            raise ValueError(
                f"timestep range [{low}, {high}] must satisfy 0 <= low <= high < {self.num_train_timesteps}"
            )
        return torch.randint(low, high + 1, (batch,), generator=generator).to(device or "cpu")


@dataclass
class Conditioning:
    """Keyword arguments a UNet needs for a batch of prompts (conditional or unconditional)."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            out["added_cond_kwargs"] = self.added_cond_kwargs
        return out

    def to(self, device=None, dtype=None) -> Conditioning:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.to(device=device, dtype=dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.to(device=device, dtype=dtype), added)


def is_sdxl_unet(unet: Any) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def check_pipeline(pipe: Any) -> None:
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES or not hasattr(pipe, "unet"):
        raise ValueError(
            f"DI* trains UNet latent-diffusion pipelines ({', '.join(SUPPORTED_PIPELINES)}); got {name}. "
            "Use a StableDiffusion / StableDiffusionXL model id or folder."
        )


def latent_shape(pipe: Any, resolution: int | None = None) -> tuple[int, int, int]:
    """(channels, h, w) of the latents for a pixel ``resolution`` (default: the UNet's native size)."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = pipe.unet.config.sample_size
    if resolution is not None:
        if resolution % scale:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE scale factor {scale}")
        size = resolution // scale
    return (pipe.unet.config.in_channels, size, size)


@torch.no_grad()
def encode_prompts(
    pipe: Any, prompts: list[str], resolution: int | None = None
) -> tuple[Conditioning, Conditioning]:
    """Encode prompts with the pipeline's own text encoders: returns (conditional, unconditional).

    The unconditional branch is the pipeline's own empty-prompt encoding (SDXL: zeros when
    ``force_zeros_for_empty_prompt``). SDXL UNets also get ``text_embeds`` and ``time_ids`` built as the
    pipeline does: (H, W, 0, 0, H, W) in pixels.
    """
    check_pipeline(pipe)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    device = pipe.unet.device
    if is_sdxl_unet(pipe.unet):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        _, h, w = latent_shape(pipe, resolution)
        scale = pipe.vae_scale_factor
        size = (h * scale, w * scale)
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=cond.dtype, device=device).repeat(
            len(prompts), 1
        )
        return (
            Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids}),
            Conditioning(uncond, {"text_embeds": uncond_pooled, "time_ids": time_ids}),
        )
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
    return Conditioning(cond), Conditioning(uncond)


def unet_output(unet: Any, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    kwargs = cond.to(dtype=x_t.dtype).kwargs()
    out = unet(x_t, timesteps, return_dict=False, **kwargs)[0]
    if out.shape[1] != x_t.shape[1]:  # learned-variance heads: keep the mean channels
        out = out[:, : x_t.shape[1]]
    return out


def predict_epsilon(
    unet: Any,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | None = None,
) -> torch.Tensor:
    """eps_hat(x_t, t, c) from a UNet of any prediction type (differentiable w.r.t. x_t)."""
    alpha, sigma = schedule.alpha_sigma(timesteps, dtype=x_t.dtype)
    out = unet_output(unet, x_t, timesteps, cond)
    return to_epsilon(out, x_t, alpha, sigma, prediction_type or schedule.prediction_type)


def generate_x0(
    generator_unet: Any,
    noise: torch.Tensor,
    cond: Conditioning,
    schedule: NoiseSchedule,
    t_star: int,
    prediction_type: PredictionType | None = None,
) -> torch.Tensor:
    """g_theta(z, c): one network evaluation on pure noise z at t*, converted to a clean latent."""
    timesteps = torch.full((noise.shape[0],), int(t_star), device=noise.device, dtype=torch.long)
    alpha, sigma = schedule.alpha_sigma(timesteps, dtype=noise.dtype)
    out = unet_output(generator_unet, noise, timesteps, cond)
    return to_x0(out, noise, alpha, sigma, prediction_type or schedule.prediction_type)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Differentiable VAE decode to pixels in (about) [-1, 1]."""
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / scaling + shift, return_dict=False)[0]
