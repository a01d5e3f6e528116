"""One wrapper per model family around a diffusers pipeline's denoising network.

Every method trains or distils the same thing: a network ``f(z_t, t, c)`` inside a text-to-image
pipeline. :func:`denoiser_for` returns the wrapper for a pipeline's family (read from the network's
config by :func:`diffalign.core.models.detect_family`, the one place families are told apart):

==========  ==========================================  =====================================================
family      pipelines                                   what the wrapper adds to the plain network call
==========  ==========================================  =====================================================
``sd``      SD 1.x / 2.x, the shapes UNet               text embeddings
``sdxl``    SDXL                                        pooled text embeddings and the size ``time_ids``
``pixart``  PixArt-alpha / Sigma, the shapes DiT        attention mask, resolution / aspect conditioning
                                                        where the model uses it; learned sigma dropped
``flux``    FLUX.1                                      2x2 latent packing, image / text ids, guidance
                                                        embedding (guidance-distilled models)
==========  ==========================================  =====================================================

A latent at timestep ``t`` is ``z_t = alpha_t x0 + sigma_t eps``. For DDPM-family schedulers
``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` (:class:`NoiseSchedule`); for flow matching
``alpha_t = 1 - t/T``, ``sigma_t = t/T`` (:class:`FlowSchedule`). :func:`to_x0_eps` and
:func:`prediction_target` convert between a network output of any prediction type and ``(x0, eps)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffalign.core.models import ARCHITECTURES, FAMILIES, detect_family

__all__ = [
    "PREDICTION_TYPES",
    "to_x0_eps",
    "prediction_target",
    "classifier_free_guidance",
    "NoiseSchedule",
    "FlowSchedule",
    "PromptConditioning",
    "cat_conditioning",
    "Denoiser",
    "SDDenoiser",
    "SDXLDenoiser",
    "PixArtDenoiser",
    "FluxDenoiser",
    "DENOISERS",
    "denoiser_for",
    "adapters_disabled",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


# --------------------------------------------------------------------------------------------------
# Prediction types
# --------------------------------------------------------------------------------------------------


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def to_x0_eps(
    model_output: torch.Tensor,
    z: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` from a network output at ``z = alpha x0 + sigma eps``.

    ``alpha``/``sigma`` broadcast against ``z``. Prediction types: ``epsilon`` (eps), ``v_prediction``
    (``alpha eps - sigma x0``, with ``alpha^2 + sigma^2 = 1``), ``sample`` (x0) and ``flow``
    (``eps - x0``, with ``alpha + sigma = 1``).
    """
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (z - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * z - sigma * model_output
        eps = sigma * z + alpha * model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (z - alpha * x0) / sigma
    elif prediction_type == "flow":
        x0 = z - sigma * model_output
        eps = z + alpha * model_output
    else:
        _check_prediction_type(prediction_type)
    return x0, eps


def prediction_target(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What a network of ``prediction_type`` must output at ``z = alpha x0 + sigma eps`` (inverse of
    :func:`to_x0_eps`)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    _check_prediction_type(prediction_type)
    raise AssertionError  # unreachable


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale (cond - uncond)``: scale 1 is the conditional output, 0 the unconditional one."""
    return uncond + scale * (cond - uncond)


# --------------------------------------------------------------------------------------------------
# Noise schedules
# --------------------------------------------------------------------------------------------------


def _as_timesteps(t, device=None) -> torch.Tensor:
    return torch.as_tensor(t, device=device).long()


def _placed(alpha, sigma, t, like, dtype):
    """``(alpha, sigma)`` on ``t``'s device in ``dtype``, or, with ``like``, shaped ``[B, 1, ...]`` to broadcast
    against it on its device and dtype (the common tail of every schedule's ``alpha_sigma``)."""
    if like is None:
        return alpha.to(t.device, dtype), sigma.to(t.device, dtype)
    if alpha.ndim == 1:
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
    return alpha.to(like.device, like.dtype), sigma.to(like.device, like.dtype)


class NoiseSchedule:
    """Discrete variance-preserving schedule: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``
    for integer ``t`` in ``[0, T-1]``."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least two entries")
        self.alphas_cumprod = alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        """``alphas_cumprod`` of any diffusers DDPM-family scheduler (DDPM, DDIM, LCM, PNDM, Euler, ...)."""
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod: a DDPM-family (variance-preserving) "
                "scheduler is needed (DDPM/DDIM/LCM/PNDM/Euler configs all work via from_config)"
            )
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def scaled_linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, 0))

    def _check(self, t: torch.Tensor) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")

    def _alpha_sigma64(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod[t.cpu()]
        return abar.sqrt(), (1.0 - abar).sqrt()

    def alpha_sigma(
        self, t, like: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` for timesteps ``t`` (scalar or ``[B]``).

        With ``like``, shaped to broadcast against it (``[B, 1, ...]``) on its device and dtype; without,
        shaped like ``t`` on ``t``'s device in ``dtype``.
        """
        t = _as_timesteps(t, getattr(t, "device", None))
        self._check(t)
        alpha, sigma = self._alpha_sigma64(t)
        return _placed(alpha, sigma, t, like, dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """``alpha_t x0 + sigma_t eps`` (computed in float32, returned in ``x0``'s dtype)."""
        alpha, sigma = self.alpha_sigma(t, x0.float())
        return (alpha * x0.float() + sigma * eps.float()).to(x0.dtype)

    def sample_timesteps(
        self,
        batch: int,
        low: int = 0,
        high: int | None = None,
        generator: torch.Generator | None = None,
        device=None,
    ) -> torch.Tensor:
        """Integer timesteps uniform on ``[low, high]`` (inclusive; ``high`` defaults to ``T - 1``)."""
        high = self.num_train_timesteps - 1 if high is None else high
        if not 0 <= low <= high < self.num_train_timesteps:
            raise ValueError(
                f"timestep range [{low}, {high}] must satisfy 0 <= low <= high < {self.num_train_timesteps}"
            )
        return torch.randint(low, high + 1, (batch,), generator=generator).to(device or "cpu")


class FlowSchedule(NoiseSchedule):
    """Rectified flow (FLUX, SD3): ``alpha_t = 1 - t/T``, ``sigma_t = t/T`` for ``t`` in ``[0, T]``
    (``t`` may be fractional). The network sees ``t/T`` as its timestep."""

    def __init__(self, num_train_timesteps: int = 1000):
        if num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be >= 2")
        self._n = int(num_train_timesteps)

    @property
    def num_train_timesteps(self) -> int:
        return self._n

    @classmethod
    def from_scheduler(cls, scheduler) -> FlowSchedule:
        return cls(int(scheduler.config.get("num_train_timesteps", 1000)))

    def _check(self, t: torch.Tensor) -> None:
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > self._n):
            raise ValueError(f"flow timesteps must lie in [0, {self._n}], got {t.tolist()}")

    def alpha_sigma(self, t, like=None, dtype=torch.float32):
        t = torch.as_tensor(t, device=getattr(t, "device", None)).double()
        self._check(t)
        sigma = (t / self._n).cpu()
        alpha = 1.0 - sigma
        return _placed(alpha, sigma, t, like, dtype)


# --------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptConditioning:
    """Network keyword arguments for the conditional branch and (when encoded) the unconditional one."""

    cond: dict
    uncond: dict | None = None

    def select(self, rows: torch.Tensor) -> PromptConditioning:
        return PromptConditioning(_map(self.cond, lambda v: v[rows]), _map(self.uncond, lambda v: v[rows]))

    def to(self, device=None, dtype=None) -> PromptConditioning:
        """Move tensors to ``device``; cast floating tensors to ``dtype`` (masks keep theirs)."""

        def move(v):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

        return PromptConditioning(_map(self.cond, move), _map(self.uncond, move))


def _map(kwargs: dict | None, fn: Callable) -> dict | None:
    if kwargs is None:
        return None
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, dict):
            out[k] = _map(v, fn)
        elif torch.is_tensor(v):
            out[k] = fn(v)
        else:
            out[k] = v
    return out


def cat_conditioning(a: dict, b: dict) -> dict:
    """Keyword arguments of two batches stacked along the batch dimension (``a`` first)."""
    out = {}
    for k in a:
        if isinstance(a[k], dict):
            out[k] = cat_conditioning(a[k], b[k])
        elif torch.is_tensor(a[k]) and a[k].ndim and a[k].shape[0] > 0:
            out[k] = torch.cat([a[k], b[k]])
        else:
            out[k] = a[k]
    return out


def _cast_floating(kwargs: dict, dtype: torch.dtype) -> dict:
    return _map(kwargs, lambda v: v.to(dtype) if v.is_floating_point() else v)


def _per_sample_t(t, z: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=z.device)
    return t.expand(z.shape[0]) if t.ndim == 0 else t


# --------------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------------


class Denoiser:
    """A pipeline's denoising network with its text conditioning, schedule and latent space.

    ``resolution`` (pixels, square) defaults to the network's native sample size times the VAE factor.
    Methods that train a copy of the network (a student, a fake score) pass that copy as ``model`` to
    :meth:`forward`, :meth:`model_fn` and :meth:`guided_fn`; the pipeline's own network is ``self.model``.
    """

    family: str = ""
    component: str = "unet"  # the pipeline attribute holding the network
    schedule_class: type[NoiseSchedule] = NoiseSchedule

    def __init__(self, pipe, resolution: int | None = None, max_sequence_length: int | None = None):
        found = detect_family(pipe)
        if found != self.family:
            raise ValueError(f"{type(self).__name__} wraps {self.family} pipelines; this one is {found}")
        self.pipe = pipe
        self.model: nn.Module = getattr(pipe, self.component)
        self.prediction_type = self._prediction_type(pipe.scheduler)
        _check_prediction_type(self.prediction_type)
        self.schedule = self.schedule_class.from_scheduler(pipe.scheduler)
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.latent_channels = self._latent_channels()
        self.resolution = int(resolution or self.native_resolution())
        if self.resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_scale_factor}"
            )
        tokenizer = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
        tok_max = int(getattr(tokenizer, "model_max_length", 0) or 0) or self.default_max_sequence_length
        self.max_sequence_length = max_sequence_length or min(self.default_max_sequence_length, tok_max)

    default_max_sequence_length = 77

    # -- description ---------------------------------------------------------------------------------
    def _prediction_type(self, scheduler) -> str:
        return scheduler.config.get("prediction_type", "epsilon")

    def _latent_channels(self) -> int:
        return int(self.model.config.in_channels)

    def native_resolution(self) -> int:
        return int(self.model.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for n, p in self.model.named_parameters() if "lora_" not in n)

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, int, int, int]:
        res = resolution or self.resolution
        if res % self.vae_scale_factor:
            raise ValueError(f"resolution {res} is not a multiple of the VAE factor {self.vae_scale_factor}")
        side = res // self.vae_scale_factor
        return (batch_size, self.latent_channels, side, side)

    # -- text ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_prompts(prompts) -> list[str]:
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        return prompts

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompt: str = "", guidance: bool = True
    ) -> PromptConditioning:
        """Encode ``prompts`` (and, with ``guidance``, ``negative_prompt`` for the unconditional branch)."""
        raise NotImplementedError

    # -- network -------------------------------------------------------------------------------------
    def _call(self, model: nn.Module, z: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return model(z, t, return_dict=False, **kwargs)[0]

    def forward(self, model: nn.Module | None, z: torch.Tensor, t, kwargs: dict) -> torch.Tensor:
        """The network output (in its prediction type) at latents ``z`` and per-sample timesteps ``t``.

        Floating conditioning tensors are cast to ``z``'s dtype; a learned-variance output (twice the
        latent channels) is cut to its mean half.
        """
        model = self.model if model is None else model
        out = self._call(model, z, _per_sample_t(t, z), _cast_floating(kwargs, z.dtype))
        if out.shape[1] == 2 * z.shape[1]:
            out = out[:, : z.shape[1]]
        return out

    def model_fn(self, model: nn.Module | None, kwargs: dict) -> Callable:
        """Unguided ``(z, t) -> output``."""
        return lambda z, t: self.forward(model, z, t, kwargs)

    def guided_fn(
        self,
        model: nn.Module | None,
        cond: PromptConditioning,
        guidance_scale: float,
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> Callable:
        """Classifier-free-guided ``(z, t) -> output`` (one batched call over both branches);
        ``context`` (e.g. adapters disabled) wraps each call. Scale 1 calls the conditional branch only."""

        def fn(z, t):
            t = _per_sample_t(t, z)
            with context() if context is not None else contextlib.nullcontext():
                if guidance_scale == 1.0:
                    return self.forward(model, z, t, cond.cond)
                if cond.uncond is None:
                    raise ValueError("guidance needs the unconditional branch: encode with guidance=True")
                out = self.forward(
                    model, torch.cat([z, z]), torch.cat([t, t]), cat_conditioning(cond.uncond, cond.cond)
                )
            uncond, conditional = out.chunk(2)
            return classifier_free_guidance(conditional, uncond, guidance_scale)

        return fn

    def predict_x0_eps(
        self, model: nn.Module | None, z: torch.Tensor, t, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` predicted by ``model`` at ``(z, t)``, unguided."""
        alpha, sigma = self.schedule.alpha_sigma(_per_sample_t(t, z), z)
        return to_x0_eps(self.forward(model, z, t, kwargs), z, alpha, sigma, self.prediction_type)

    # -- VAE -----------------------------------------------------------------------------------------
    def _vae_shift_scale(self) -> tuple[float, float]:
        cfg = self.pipe.vae.config
        return float(getattr(cfg, "shift_factor", None) or 0.0), float(cfg.scaling_factor)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents, one draw from the VAE posterior (``generator`` on CPU)."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
        shift, scale = self._vae_shift_scale()
        return (dist.mean + dist.std * eps - shift) * scale

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1] through the VAE decoder (differentiable)."""
        vae = self.pipe.vae
        shift, scale = self._vae_shift_scale()
        out = vae.decode(latents.to(vae.dtype) / scale + shift, return_dict=False)[0]
        return out.clamp(-1, 1) if clamp else out


class SDDenoiser(Denoiser):
    """Stable Diffusion 1.x / 2.x UNets (and the shapes UNet)."""

    family = "sd"

    @torch.no_grad()
    def encode(self, prompts, negative_prompt: str = "", guidance: bool = True) -> PromptConditioning:
        prompts = self._check_prompts(prompts)
        neg = [negative_prompt] * len(prompts) if guidance else None
        pe, npe = self.pipe.encode_prompt(prompts, self.device, 1, guidance, negative_prompt=neg)
        return PromptConditioning(
            {"encoder_hidden_states": pe}, {"encoder_hidden_states": npe} if guidance else None
        )


class SDXLDenoiser(Denoiser):
    """SDXL UNets: two text encoders, pooled ``text_embeds`` and the size ``time_ids``
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""

    family = "sdxl"

    def time_ids(
        self, batch: int, crops: torch.Tensor | None = None, target_size: int | None = None, device=None
    ) -> torch.Tensor:
        """``[B, 6]``: by default ``(H, W, 0, 0, H, W)`` at the wrapper's resolution, as the pipeline
        builds them; ``crops`` ``[B, 4]`` gives per-sample ``(orig_h, orig_w, top, left)`` (training on
        resized/cropped images, as SDXL was trained)."""
        size = float(target_size or self.resolution)
        if crops is None:
            crops = torch.tensor([[size, size, 0.0, 0.0]]).repeat(batch, 1)
        crops = torch.as_tensor(crops, dtype=torch.float32).reshape(batch, 4)
        target = torch.tensor([[size, size]]).repeat(batch, 1)
        return torch.cat([crops, target], dim=1).to(device or self.device)

    @torch.no_grad()
    def encode(
        self,
        prompts,
        negative_prompt: str = "",
        guidance: bool = True,
        crops: torch.Tensor | None = None,
        target_size: int | None = None,
    ) -> PromptConditioning:
        prompts = self._check_prompts(prompts)
        n = len(prompts)
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guidance,
            negative_prompt=[negative_prompt] * n if (guidance and negative_prompt) else None,
        )
        time_ids = self.time_ids(n, crops, target_size).to(pe.dtype)
        cond = {
            "encoder_hidden_states": pe,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }
        if not guidance:
            return PromptConditioning(cond)
        uncond = {
            "encoder_hidden_states": npe,
            "added_cond_kwargs": {"text_embeds": npooled, "time_ids": time_ids},
        }
        return PromptConditioning(cond, uncond)


class PixArtDenoiser(Denoiser):
    """PixArt-alpha / Sigma transformers (and the shapes DiT): T5 embeddings with attention mask, the
    resolution / aspect-ratio conditioning of models that use it (PixArt-alpha 1024), learned sigma
    dropped."""

    family = "pixart"
    component = "transformer"
    default_max_sequence_length = 120

    @torch.no_grad()
    def encode(self, prompts, negative_prompt: str = "", guidance: bool = True) -> PromptConditioning:
        prompts = self._check_prompts(prompts)
        pe, mask, npe, nmask = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt,
            num_images_per_prompt=1,
            device=self.device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"encoder_hidden_states": pe, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": npe, "encoder_attention_mask": nmask} if guidance else None
        return PromptConditioning(cond, uncond)

    def uses_size_conditioning(self) -> bool:
        """PixArt-alpha 1024 embeds (resolution, aspect ratio); diffusers resolves an unset config entry
        to ``sample_size == 128`` and keeps the answer on the model."""
        flag = getattr(self.model, "use_additional_conditions", None)
        if flag is None:
            flag = self.model.config.get("use_additional_conditions")
        if flag is None:
            flag = self.model.config.sample_size == 128
        return bool(flag)

    def added_cond_kwargs(self, z: torch.Tensor) -> dict:
        if not self.uses_size_conditioning():
            return {"resolution": None, "aspect_ratio": None}
        h, w = z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor
        batch = z.shape[0]
        resolution = torch.tensor([[h, w]], dtype=z.dtype, device=z.device).repeat(batch, 1)
        aspect = torch.full((batch, 1), h / w, dtype=z.dtype, device=z.device)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def _call(self, model, z, t, kwargs):
        return model(z, timestep=t, added_cond_kwargs=self.added_cond_kwargs(z), return_dict=False, **kwargs)[
            0
        ]


class FluxDenoiser(Denoiser):
    """FLUX.1 transformers: latents ``[B, C, H, W]`` are packed into 2x2 patches for the call and
    unpacked after; the timestep is ``t/T``; guidance-distilled models (``guidance_embeds``) take the
    guidance scale as an embedding instead of a second, unconditional call. Prediction type ``flow``."""

    family = "flux"
    component = "transformer"
    schedule_class = FlowSchedule
    default_max_sequence_length = 512

    def _prediction_type(self, scheduler) -> str:
        return "flow"

    def _latent_channels(self) -> int:
        return int(self.model.config.in_channels) // 4

    def native_resolution(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.model.config.get("guidance_embeds", False))

    @torch.no_grad()
    def encode(self, prompts, negative_prompt: str = "", guidance: bool = True) -> PromptConditioning:
        prompts = self._check_prompts(prompts)

        def one(texts):
            pe, pooled, text_ids = self.pipe.encode_prompt(
                prompt=texts,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
            return {"encoder_hidden_states": pe, "pooled_projections": pooled, "txt_ids": text_ids}

        cond = one(prompts)
        uncond = one([negative_prompt] * len(prompts)) if guidance and not self.guidance_embedded else None
        return PromptConditioning(cond, uncond)

    def _call(self, model, z, t, kwargs):
        b, c, h, w = z.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
        packed = (
            z.view(b, c, h // 2, 2, w // 2, 2)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, (h // 2) * (w // 2), c * 4)
        )
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
        kwargs = dict(kwargs)
        guidance = kwargs.pop("guidance", None)
        if self.guidance_embedded:
            guidance = torch.full((b,), 1.0 if guidance is None else float(guidance), device=z.device)
            guidance = guidance.to(z.dtype)
        out = model(
            hidden_states=packed,
            timestep=t.to(z.dtype) / self.schedule.num_train_timesteps,
            guidance=guidance,
            img_ids=img_ids,
            return_dict=False,
            **kwargs,
        )[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def guided_fn(self, model, cond, guidance_scale, context=None):
        if not self.guidance_embedded:
            return super().guided_fn(model, cond, guidance_scale, context)
        kwargs = {**cond.cond, "guidance": guidance_scale}

        def fn(z, t):
            with context() if context is not None else contextlib.nullcontext():
                return self.forward(model, z, t, kwargs)

        return fn


DENOISERS: dict[str, type[Denoiser]] = {
    cls.family: cls for cls in (SDDenoiser, SDXLDenoiser, PixArtDenoiser, FluxDenoiser)
}
assert set(DENOISERS) == set(FAMILIES)
assert {spec.family for spec in ARCHITECTURES.values() if spec.kind == "t2i"} <= set(DENOISERS)


def denoiser_for(pipe, resolution: int | None = None, max_sequence_length: int | None = None) -> Denoiser:
    """The wrapper of ``pipe``'s family (see :func:`diffalign.core.models.detect_family`)."""
    return DENOISERS[detect_family(pipe)](pipe, resolution, max_sequence_length)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base network of a LoRA-adapted model: every adapter layer off for the duration."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
