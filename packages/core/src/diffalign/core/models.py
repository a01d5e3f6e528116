"""Load pipelines, denoisers and VLMs from hub ids, local directories or the built-in shapes world.

Every loader accepts a hub id (``stabilityai/stable-diffusion-xl-base-1.0``), a local directory, or a
shapes-world id (``shapes/unet``, ``shapes/dit``, ``shapes/unet-web``). Hub ids are looked up, in order, under
``$DIFFALIGN_MODEL_ROOT/<org>/<name>`` and in the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` nothing
is downloaded and a missing model raises ``ModelNotFoundError`` naming the id and how to supply it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: `diffalign --help` must not pay for it
    import torch

__all__ = [
    "ArchitectureSpec",
    "ARCHITECTURES",
    "ModelNotFoundError",
    "WeightLoadingError",
    "check_loading_info",
    "resolve_model_path",
    "load_pipeline",
    "load_unet",
    "load_transformer",
    "load_denoiser",
    "load_vae",
    "load_vlm",
    "SHAPES_IDS",
    "FAMILIES",
    "detect_family",
    "network_of",
]

SHAPES_IDS = ("shapes/unet", "shapes/dit", "shapes/unet-web")


@dataclass(frozen=True)
class ArchitectureSpec:
    """What a recipe needs to know about a model family."""

    name: str
    pipeline_class: str
    denoiser: str  # "unet" or "transformer" (the pipeline attribute holding the trained network)
    default_id: str
    prediction_type: str
    kind: str = "t2i"  # "t2i" or "vlm"
    native_resolution: int = 512
    family: str = ""  # the denoiser family (``diffalign.core.denoisers``); "" for non-diffusion models

    def __post_init__(self) -> None:
        if self.kind == "t2i" and self.family not in FAMILIES:
            raise ValueError(f"architecture {self.name}: family {self.family!r} is not one of {FAMILIES}")


FAMILIES = ("sd", "sdxl", "pixart", "flux")


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        ArchitectureSpec(
            "sd14", "StableDiffusionPipeline", "unet", "CompVis/stable-diffusion-v1-4", "epsilon", family="sd"
        ),
        ArchitectureSpec(
            "sd15",
            "StableDiffusionPipeline",
            "unet",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "epsilon",
            family="sd",
        ),
        ArchitectureSpec(
            "sd2",
            "StableDiffusionPipeline",
            "unet",
            "stabilityai/stable-diffusion-2-1",
            "v_prediction",
            native_resolution=768,
            family="sd",
        ),
        ArchitectureSpec(
            "sdxl",
            "StableDiffusionXLPipeline",
            "unet",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "epsilon",
            native_resolution=1024,
            family="sdxl",
        ),
        ArchitectureSpec(
            "pixart-alpha",
            "PixArtAlphaPipeline",
            "transformer",
            "PixArt-alpha/PixArt-XL-2-1024-MS",
            "epsilon",
            native_resolution=1024,
            family="pixart",
        ),
        ArchitectureSpec(
            "pixart-sigma",
            "PixArtSigmaPipeline",
            "transformer",
            "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
            "epsilon",
            native_resolution=1024,
            family="pixart",
        ),
        ArchitectureSpec(
            "flux",
            "FluxPipeline",
            "transformer",
            "black-forest-labs/FLUX.1-dev",
            "flow",
            native_resolution=1024,
            family="flux",
        ),
        ArchitectureSpec(
            "shapes-unet",
            "StableDiffusionPipeline",
            "unet",
            "shapes/unet",
            "v_prediction",
            native_resolution=32,
            family="sd",
        ),
        ArchitectureSpec(
            "shapes-dit",
            "PixArtAlphaPipeline",
            "transformer",
            "shapes/dit",
            "v_prediction",
            native_resolution=32,
            family="pixart",
        ),
        ArchitectureSpec(
            "qwen2.5-vl",
            "Qwen2_5_VLForConditionalGeneration",
            "model",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "none",
            kind="vlm",
        ),
    )
}


class ModelNotFoundError(FileNotFoundError):
    """A model id or path could not be found locally (and downloading is off or failed)."""


class WeightLoadingError(ValueError):
    """A checkpoint's weights do not match the model built from its config (missing, unexpected or
    mis-shaped tensors): the model would run with freshly initialised weights, so loading stops."""


def check_loading_info(info: Any, what: str) -> None:
    """Raise ``WeightLoadingError`` when a ``from_pretrained(..., output_loading_info=True)`` report lists
    missing, unexpected or mismatched weights (transformers and diffusers use the same keys)."""
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        items = sorted(str(k) for k in (info or {}).get(key) or ())
        if items:
            shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
            problems.append(f"{len(items)} {key.replace('_', ' ')}: {shown}")
    if problems:
        from importlib.metadata import version

        raise WeightLoadingError(
            f"{what}: the checkpoint does not match the model ({'; '.join(problems)}). The model would run "
            f"with newly initialised weights; check the folder, or the installed libraries "
            f"(transformers {version('transformers')}, diffusers {version('diffusers')}) against the "
            "versions diffalign declares"
        )


def _from_pretrained_checked(cls: Any, path: Path, what: str, **kwargs: Any) -> Any:
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    check_loading_info(info, what)
    return model


def _pipeline_models(path: Path, dtype: torch.dtype, skip: Any) -> dict[str, Any]:
    """Every transformers/diffusers model of a pipeline folder, loaded with a checked loading report."""
    import json

    import diffusers
    import transformers

    index = json.loads((path / "model_index.json").read_text())
    models = {}
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if library == "transformers":
            cls = getattr(transformers, str(class_name), None)
            if cls is None or not issubclass(cls, transformers.PreTrainedModel):
                continue
            kwargs = {"dtype": dtype}
        elif library == "diffusers":
            cls = getattr(diffusers, str(class_name), None)
            if cls is None or not issubclass(cls, diffusers.ModelMixin):
                continue
            kwargs = {"torch_dtype": dtype}
        else:
            continue
        if (path / name).is_dir():
            models[name] = _from_pretrained_checked(cls, path / name, f"{path}/{name}", **kwargs)
    return models


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve_model_path(source: str | os.PathLike) -> Path:
    """Map a hub id, local directory or shapes id to a local directory, or raise ``ModelNotFoundError``."""
    text = str(source)
    if text in SHAPES_IDS:
        try:
            from diffalign.core.shapes import model_path
        except ImportError as err:  # pragma: no cover - shapes ships with core
            raise ModelNotFoundError(f"{text}: the shapes world is not importable ({err})") from err
        path = Path(model_path(text.split("/", 1)[1]))
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"{text}: the shapes teacher is not built at {path}. Run `diffalign world build` to build it."
            )
        return path
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{text} is a file; expected a model directory (diffusers or transformers layout)"
            )
        return path
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(f"model directory not found: {text}")
    root = os.environ.get("DIFFALIGN_MODEL_ROOT")
    if root and (Path(root) / text).is_dir():
        return Path(root) / text
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=_offline()))
    except Exception as err:
        raise ModelNotFoundError(
            f"model {text!r} is not available locally ({type(err).__name__}). To use it offline, download it on "
            f"a machine with internet (`hf download {text} --local-dir DIR`) and pass DIR instead of the id, or "
            f"place it at $DIFFALIGN_MODEL_ROOT/{text}, or pre-fill the Hugging Face cache."
        ) from None


def load_pipeline(
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    pipeline_class: Any = None,
    **kwargs: Any,
):
    """Load a diffusers pipeline; progress bar off, safety checker kept as the folder defines it.

    Each model component is loaded with its loading report checked: a checkpoint with missing,
    unexpected or mis-shaped weights raises ``WeightLoadingError`` instead of running half-initialised.

    Every component is cast to ``dtype`` (float32 when not given), whatever precision its weights were
    stored in: transformers text encoders otherwise keep their stored dtype while diffusers models are
    upcast, which mixes precisions inside one pipeline.
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_path(source)
    cls = pipeline_class or DiffusionPipeline
    import torch

    kwargs.setdefault("torch_dtype", dtype if dtype is not None else torch.float32)
    if (path / "model_index.json").is_file():
        kwargs = {**_pipeline_models(path, kwargs["torch_dtype"], skip=set(kwargs)), **kwargs}
    pipe = cls.from_pretrained(path, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_component(source, subfolder, cls, dtype, device):
    path = resolve_model_path(source)
    sub = path / subfolder if subfolder and (path / subfolder).is_dir() else path
    if not (sub / "config.json").exists():
        raise ModelNotFoundError(f"{source}: no {subfolder or 'model'} config.json under {path}")
    import torch

    model = _from_pretrained_checked(cls, sub, str(sub), torch_dtype=dtype or torch.float32)
    return model.to(device) if device is not None else model


def load_unet(source, dtype=None, device=None, subfolder: str = "unet"):
    from diffusers import UNet2DConditionModel

    return _load_component(source, subfolder, UNet2DConditionModel, dtype, device)


def load_transformer(source, dtype=None, device=None, subfolder: str = "transformer"):
    import json

    import diffusers

    path = resolve_model_path(source)
    config_file = path / subfolder / "config.json" if (path / subfolder).is_dir() else path / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(f"{source}: no transformer config.json under {path}")
    class_name = json.loads(config_file.read_text())["_class_name"]
    cls = getattr(diffusers, class_name)
    return _load_component(source, subfolder, cls, dtype, device)


def load_denoiser(source, dtype=None, device=None):
    """The pipeline's trained network: ``unet/`` if present, else ``transformer/``."""
    path = resolve_model_path(source)
    if (path / "unet").is_dir():
        return load_unet(source, dtype, device)
    return load_transformer(source, dtype, device)


def load_vae(source, dtype=None, device=None, subfolder: str = "vae"):
    from diffusers import AutoencoderKL

    return _load_component(source, subfolder, AutoencoderKL, dtype, device)


def load_vlm(
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    processor_kwargs: dict[str, Any] | None = None,
):
    """Load an image-text-to-text model (safetensors weights) and its processor: Qwen2.5-VL and friends
    from a hub id or a local directory, or a saved tiny VLM (``diffalign.core.tiny_vlm``).
    ``processor_kwargs`` go to ``AutoProcessor.from_pretrained`` (e.g. ``min_pixels``/``max_pixels``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from diffalign.core.tiny_vlm import is_tiny_vlm_dir, load_tiny_vlm

    path = resolve_model_path(source)
    if is_tiny_vlm_dir(path):  # the offline tiny models of the shapes world (word-level, no torchvision)
        model, processor = load_tiny_vlm(path, dtype=dtype)
        return (model.to(device) if device is not None else model), processor
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        processor = AutoProcessor.from_pretrained(
            path, trust_remote_code=trust_remote_code, **(processor_kwargs or {})
        )
        model = _from_pretrained_checked(AutoModelForImageTextToText, path, str(path), **kwargs)
    except WeightLoadingError:  # loaded with missing/unexpected weights: not a missing model
        raise
    except (OSError, ValueError) as err:  # missing files / no processor files in the folder
        raise ModelNotFoundError(
            f"could not load VLM {str(path)!r}: {err}. Offline, pass a local directory holding the model "
            f"(download it once with `hf download <id> --local-dir DIR`)."
        ) from err
    if device is not None:
        model = model.to(device)
    return model, processor


def detect_family(pipe_or_model: Any) -> str:
    """The denoiser family (one of ``FAMILIES``) of a pipeline or of its UNet / transformer.

    The one place families are told apart; it reads the network's config, never class names:
    a UNet with ``text_time`` added conditions is SDXL, any other UNet SD 1.x/2.x; a transformer with
    ``caption_channels`` is PixArt, one with ``joint_attention_dim`` and ``pooled_projection_dim`` FLUX.
    """
    model = network_of(pipe_or_model)
    config = getattr(model, "config", None)
    keys = set(config.keys()) if hasattr(config, "keys") else set()
    if "addition_embed_type" in keys and "cross_attention_dim" in keys:
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    if "caption_channels" in keys:
        return "pixart"
    if {"joint_attention_dim", "pooled_projection_dim", "guidance_embeds"} <= keys:
        return "flux"
    raise ValueError(
        f"{type(pipe_or_model).__name__} (network {type(model).__name__}) is not a supported text-to-image "
        f"family; supported: SD 1.x/2.x and SDXL UNets, PixArt and FLUX transformers"
    )


def network_of(pipe_or_model: Any) -> Any:
    """A pipeline's denoising network (its ``unet``, else its ``transformer``); a network is returned as is."""
    for attr in ("unet", "transformer"):
        if getattr(pipe_or_model, attr, None) is not None:
            return getattr(pipe_or_model, attr)
    return pipe_or_model
