"""LoRA adapters on a denoiser: add them with peft, save and load them in diffusers' file layout.

A saved adapter is ``<dir>/pytorch_lora_weights.safetensors`` with keys
``<unet|transformer>.<module>.lora_A.weight`` / ``lora_B.weight`` and the LoRA config in the safetensors
metadata (``lora_adapter_metadata``), exactly what a pipeline's ``save_lora_weights`` writes and
``load_lora_weights`` reads. Pipelines without a LoRA loader (PixArt) read the same file through the
network's own ``load_lora_adapter`` or, failing that, peft injection (:func:`load_lora`).

Target modules per family and preset live in one table, :data:`LORA_TARGETS`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.core.models import ARCHITECTURES, FAMILIES, detect_family

__all__ = [
    "LORA_WEIGHT_NAME",
    "METADATA_KEY",
    "LORA_TARGETS",
    "LoraError",
    "default_targets",
    "component_of",
    "make_lora_config",
    "add_lora",
    "lora_layers",
    "save_lora",
    "write_lora",
    "read_lora",
    "load_lora",
    "inject_lora",
    "check_lora_fits",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # the safetensors metadata entry diffusers reads

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
# Every UNet projection and convolution of a resnet / attention block (the LCM-LoRA / TLCM list).
_UNET_FULL = (
    *_ATTENTION, "proj_in", "proj_out", *_FEED_FORWARD, "conv1", "conv2", "conv_shortcut",
    "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
_FLUX_FULL = (
    *_ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", *_FEED_FORWARD,
    "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip

# preset -> family -> target module names (peft suffix match)
LORA_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {family: _ATTENTION for family in FAMILIES},
    "full": {"sd": _UNET_FULL, "sdxl": _UNET_FULL, "pixart": _ATTENTION + _FEED_FORWARD, "flux": _FLUX_FULL},
}


class LoraError(ValueError):
    """An adapter, or an adapter file, that cannot be used as asked."""


def default_targets(family: str, preset: str = "attention") -> list[str]:
    """Target modules of ``preset`` (``attention``: the attention projections; ``full``: every
    projection and convolution of the blocks) for a family."""
    if preset not in LORA_TARGETS:
        raise LoraError(f"unknown LoRA target preset {preset!r}; expected one of {sorted(LORA_TARGETS)}")
    if family not in LORA_TARGETS[preset]:
        raise LoraError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return list(LORA_TARGETS[preset][family])


def component_of(family: str) -> str:
    """The pipeline attribute (and LoRA key prefix) of a family's network: ``unet`` or ``transformer``."""
    for spec in ARCHITECTURES.values():
        if spec.family == family:
            return spec.denoiser
    raise LoraError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_lora_config(
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = _ATTENTION,
    init: str | bool = "gaussian",
    **kwargs: Any,
):
    """A peft ``LoraConfig``; ``alpha`` defaults to ``rank`` (scale 1); ``init`` is peft's
    ``init_lora_weights`` (``"gaussian"``, ``True``/``"default"``/``"kaiming"`` for peft's default)."""
    from peft import LoraConfig

    if rank < 1:
        raise LoraError(f"LoRA rank must be >= 1, got {rank}")
    if not targets:
        raise LoraError("LoRA needs at least one target module")
    init_value: bool | str = True if init in (True, "default", "kaiming") else init
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(targets),
        init_lora_weights=init_value,
        **kwargs,
    )


def add_lora(model: torch.nn.Module, config, adapter_name: str = "default") -> list[str]:
    """Add a LoRA adapter to ``model`` and make only its parameters trainable; returns the wrapped
    module names. Networks with diffusers' peft mixin use ``add_adapter``; others get peft's injection
    (and a ``peft_config`` attribute, as the mixin keeps)."""
    model.requires_grad_(False)
    try:
        if hasattr(model, "add_adapter"):
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model, adapter_name=adapter_name)
            existing = dict(getattr(model, "peft_config", None) or {})
            existing[adapter_name] = config
            model.peft_config = existing
    except ValueError as err:
        raise LoraError(f"cannot add LoRA to {type(model).__name__}: {err}") from err
    marks = (f"lora_A.{adapter_name}.", f"lora_B.{adapter_name}.")
    wrapped = set()
    for name, param in model.named_parameters():
        mine = any(m in name for m in marks)
        param.requires_grad_(mine)
        if mine:
            wrapped.add(name.split(".lora_", 1)[0])
    if not wrapped:
        raise LoraError(
            f"no module of {type(model).__name__} matches LoRA targets {sorted(config.target_modules)}"
        )
    return sorted(wrapped)


def lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft's key format (``<module>.lora_A.weight``), as diffusers saves them."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not layers:
        raise LoraError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}")
    return layers


def _config_dict(config) -> dict:
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {}
    for key, value in raw.items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def _pipeline_class(family: str):
    import diffusers

    for spec in ARCHITECTURES.values():
        if family in (spec.family, spec.denoiser) and spec.kind == "t2i":
            cls = getattr(diffusers, spec.pipeline_class, None)
            if cls is not None and hasattr(cls, "save_lora_weights"):
                return cls
    return None


def write_lora(out_dir: str | os.PathLike, family: str, layers: Mapping[str, torch.Tensor], config) -> Path:
    """Write ``layers`` (peft keys, no prefix) and ``config`` (a ``LoraConfig`` or its dict) as
    ``out_dir/pytorch_lora_weights.safetensors``: through the family's pipeline ``save_lora_weights``
    where it has one, else through diffusers' generic LoRA writer with the same layout. ``family`` may
    also be the network kind (``unet`` / ``transformer``), which fixes the layout as well. The file is
    written next to its final name and then renamed, so a killed write leaves no half file."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    prefix = family if family in ("unet", "transformer") else component_of(family)
    layers = {k: v.detach().cpu().contiguous() for k, v in layers.items()}
    for key in layers:
        if key.startswith(("unet.", "transformer.")) or ".lora_" not in key:
            raise LoraError(
                f"write_lora takes peft keys without a prefix (<module>.lora_A.weight), got {key!r}"
            )
    meta = _config_dict(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".lora-") as tmp:
        cls = _pipeline_class(family)
        if cls is not None:
            cls.save_lora_weights(
                tmp,
                **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": meta},
                weight_name=LORA_WEIGHT_NAME,
            )
        else:
            LoraBaseMixin.write_lora_layers(
                state_dict={f"{prefix}.{k}": v for k, v in layers.items()},
                save_directory=tmp,
                is_main_process=True,
                weight_name=LORA_WEIGHT_NAME,
                save_function=None,
                safe_serialization=True,
                lora_adapter_metadata={f"{prefix}.{k}": v for k, v in meta.items()},
            )
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, out_dir / LORA_WEIGHT_NAME)
    return out_dir / LORA_WEIGHT_NAME


def save_lora(
    out_dir: str | os.PathLike,
    model: torch.nn.Module,
    family: str | None = None,
    adapter_name: str = "default",
) -> Path:
    """Save ``model``'s adapter ``adapter_name`` (config from ``model.peft_config``) with :func:`write_lora`."""
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise LoraError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}")
    return write_lora(
        out_dir, family or detect_family(model), lora_layers(model, adapter_name), configs[adapter_name]
    )


def weight_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise LoraError(f"no LoRA weights at {path} (expected a directory holding {LORA_WEIGHT_NAME})")
    return path


def read_lora(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor], dict]:
    """``(prefix, layers, config)`` of a LoRA file: the ``unet``/``transformer`` prefix, the tensors with
    peft keys (prefix stripped) and the LoRA config dict (empty when the file has no metadata)."""
    from safetensors import safe_open

    file = weight_file(path)
    try:
        with safe_open(str(file), framework="pt") as fh:
            header = fh.metadata() or {}
            flat = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises several error types for a corrupt file
        raise LoraError(f"cannot read LoRA file {file}: {err}") from err
    prefixes = {k.split(".", 1)[0] for k in flat}
    if len(prefixes) != 1 or not prefixes <= {"unet", "transformer"}:
        raise LoraError(
            f"{file}: expected the LoRA of one network ('unet.*' or 'transformer.*'), got prefixes "
            f"{sorted(prefixes)} (text-encoder LoRAs are not supported)"
        )
    prefix = prefixes.pop()
    layers = {k.split(".", 1)[1]: v for k, v in flat.items()}
    config: dict = {}
    if header.get(METADATA_KEY):
        raw = json.loads(header[METADATA_KEY])
        config = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(prefix + ".")}
    return prefix, layers, config


def load_lora(pipe, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Attach the adapter at ``path`` to ``pipe``'s network and activate it: ``pipe.load_lora_weights``
    where the pipeline has a LoRA loader, else the network's ``load_lora_adapter``, else peft injection
    (the PixArt fallback). Raises :class:`LoraError` if the file is for the other network type."""
    file = weight_file(path)
    family = detect_family(pipe)
    prefix, layers, config = read_lora(file)
    if prefix != component_of(family):
        raise LoraError(
            f"{file} adapts a '{prefix}' but {type(pipe).__name__} has a '{component_of(family)}'"
        )
    check_lora_fits(getattr(pipe, prefix), layers, str(file))
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
        return
    inject_lora(getattr(pipe, prefix), layers, config, adapter_name, where=str(file))


def check_lora_fits(
    model: torch.nn.Module, layers: Mapping[str, torch.Tensor], where: str = "adapter"
) -> None:
    """Raise :class:`LoraError` naming the first module of ``layers`` (peft keys) that ``model`` lacks or
    whose weight has another shape than ``B @ A`` (an adapter built for another architecture)."""
    modules = dict(model.named_modules())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in layers.items():
        module, _, rest = key.partition(".lora_")
        factors.setdefault(module, {})[rest.split(".", 1)[0]] = value
    for name, ab in factors.items():
        mod = modules.get(name)
        if mod is None:
            raise LoraError(
                f"{where}: module {name!r} does not exist in {type(model).__name__}: the adapter was built for "
                "another architecture"
            )
        if "A" not in ab or "B" not in ab:
            raise LoraError(f"{where}: module {name!r} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        want = (int(b.shape[0]), *(int(x) for x in a.shape[1:]))
        weight = getattr(mod, "base_layer", mod).weight
        if tuple(weight.shape) != want:
            raise LoraError(
                f"{where}: module {name!r} has update shape {want} but the model's weight is "
                f"{tuple(weight.shape)}: the adapter was built for another architecture"
            )


def inject_lora(
    model: torch.nn.Module,
    layers: Mapping[str, torch.Tensor],
    config: Mapping | None = None,
    adapter_name: str = "default",
    where: str = "adapter",
) -> None:
    """Add ``layers`` (peft keys) to ``model`` with peft as adapter ``adapter_name`` (frozen, active);
    ``config`` is the LoRA config dict (without one: rank from the tensors, scale 1, as diffusers does)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    check_lora_fits(model, layers, where)
    modules = sorted({k.split(".lora_", 1)[0] for k in layers})
    if config:
        known = set(LoraConfig.__dataclass_fields__)
        peft_config = LoraConfig(**{k: v for k, v in config.items() if k in known})
    else:  # no metadata: scale 1, as diffusers assumes
        rank = int(next(v for k, v in layers.items() if "lora_A" in k).shape[0])
        peft_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules)
    peft_config.target_modules = modules  # exactly the saved modules
    inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, dict(layers), adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise LoraError(f"{where}: adapter keys not found in {type(model).__name__}: {unexpected[:3]}")
    configs = dict(getattr(model, "peft_config", None) or {})
    configs[adapter_name] = peft_config
    model.peft_config = configs
    model.requires_grad_(False)
