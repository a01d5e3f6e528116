"""LoRA adapters of a diffusion denoiser: injection for training, the diffusers file format, loading.

An adapter is held as plain tensors per target module (``A`` of shape ``[r, in]``, ``B`` of shape
``[out, r]``, and the module's ``alpha``) so that merging is linear algebra on ``delta = alpha/r * B @ A``.
Files are written in the format diffusers writes (``pytorch_lora_weights.safetensors`` with keys
``unet.<module>.lora_A.weight`` and the LoRA config as ``lora_adapter_metadata``), so
``pipe.load_lora_weights(dir)`` reads them for pipelines that have a LoRA loader (SD, SDXL); for the
others (PixArt) :func:`load_into_pipeline` injects the adapter with peft directly.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SELMA_META_NAME = "selma_adapter.json"
METADATA_KEY = "lora_adapter_metadata"  # the safetensors metadata key diffusers reads
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class AdapterError(ValueError):
    """An adapter file, or a set of adapters, that cannot be used as asked."""


@dataclass
class LoraAdapter:
    """LoRA factors per module of one denoiser (``prefix`` is ``unet`` or ``transformer``)."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alphas: dict[str, float]
    prefix: str = "unet"
    use_rslora: bool = False
    base_model: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (a, b) in self.layers.items():
            if a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"module {name}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}"
                )
            if name not in self.alphas:
                raise AdapterError(f"module {name}: no alpha")

    def rank(self, name: str) -> int:
        return int(self.layers[name][0].shape[0])

    def ranks(self) -> dict[str, int]:
        return {name: self.rank(name) for name in self.layers}

    def scale(self, name: str) -> float:
        r = self.rank(name)
        return self.alphas[name] / (r**0.5 if self.use_rslora else r)

    def delta(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in the module weight's shape (conv kernels are reshaped)."""
        a, b = self.layers[name]
        d = b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()
        d = d * self.scale(name)
        if a.dim() == 4:  # conv: A [r, in, kh, kw], B [out, r, 1, 1]
            d = d.reshape(b.shape[0], *a.shape[1:])
        return d

    def delta_shape(self, name: str) -> tuple[int, ...]:
        a, b = self.layers[name]
        return (int(b.shape[0]), *(int(x) for x in a.shape[1:]))

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.delta(name) for name in self.layers}


# --------------------------------------------------------------------------------------------------
# Pipelines and denoisers
# --------------------------------------------------------------------------------------------------


def denoiser_prefix(pipe) -> str:
    if getattr(pipe, "unet", None) is not None:
        return "unet"
    if getattr(pipe, "transformer", None) is not None:
        return "transformer"
    raise AdapterError(f"{type(pipe).__name__} has neither a unet nor a transformer to put LoRA layers on")


def get_denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, denoiser_prefix(pipe))


def make_lora_config(
    rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, init: str = "gaussian"
):
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    init_value: bool | str = True if init in ("default", "kaiming") else init
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init_value)


def add_lora(denoiser: torch.nn.Module, config, adapter_name: str = "default") -> list[str]:
    """Inject LoRA layers (peft) into the denoiser and make *only* LoRA parameters trainable.

    Returns the names of the wrapped modules. Raises if no target matches (an adapter for another
    architecture).
    """
    if hasattr(denoiser, "add_adapter"):
        try:
            denoiser.add_adapter(config, adapter_name=adapter_name)
        except ValueError as err:
            raise AdapterError(f"cannot add LoRA to {type(denoiser).__name__}: {err}") from err
    else:
        from peft import inject_adapter_in_model

        try:
            inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
        except ValueError as err:
            raise AdapterError(f"cannot add LoRA to {type(denoiser).__name__}: {err}") from err
    for name, param in denoiser.named_parameters():
        param.requires_grad_(f"lora_A.{adapter_name}" in name or f"lora_B.{adapter_name}" in name)
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in denoiser.named_parameters() if ".lora_A." in n})
    if not wrapped:
        raise AdapterError(
            f"no module of {type(denoiser).__name__} matches LoRA targets {sorted(config.target_modules)}"
        )
    return wrapped


def adapter_from_model(
    denoiser: torch.nn.Module, config, adapter_name: str = "default", prefix: str = "unet", **kwargs
) -> LoraAdapter:
    """The LoRA factors of an injected adapter, detached to CPU float32."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    layers = _layers_from_flat(sd, where=f"{type(denoiser).__name__} adapter {adapter_name!r}")
    alphas = {name: float(config.alpha_pattern.get(name, config.lora_alpha)) for name in layers}
    return LoraAdapter(layers, alphas, prefix=prefix, use_rslora=bool(config.use_rslora), **kwargs)


def _layers_from_flat(
    sd: Mapping[str, torch.Tensor], where: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(".lora_A.weight"):
            a_parts[key[: -len(".lora_A.weight")]] = value
        elif key.endswith(".lora_B.weight"):
            b_parts[key[: -len(".lora_B.weight")]] = value
        else:
            raise AdapterError(
                f"{where}: unsupported key {key!r} (only plain LoRA lora_A/lora_B weights are supported: "
                "no DoRA magnitudes, LoRA biases, or kohya/other formats; convert the file with diffusers first)"
            )
    if set(a_parts) != set(b_parts):
        missing = sorted(set(a_parts) ^ set(b_parts))
        raise AdapterError(f"{where}: modules without both lora_A and lora_B: {missing[:5]}")
    if not a_parts:
        raise AdapterError(f"{where}: no LoRA weights found")
    return {
        n: (a_parts[n].detach().float().cpu(), b_parts[n].detach().float().cpu()) for n in sorted(a_parts)
    }


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _weight_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.exists():
        raise AdapterError(f"no LoRA weights at {path} (expected a directory holding {LORA_WEIGHT_NAME})")
    return path


def save_adapter(adapter: LoraAdapter, out_dir: str | Path, extra_meta: Mapping | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers layout + LoRA config metadata) and
    ``selma_adapter.json`` (base model, ranks, skill, ...). Writes to temp files, then renames."""
    import os

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = adapter.ranks()
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(adapter.alphas.values()).most_common(1)[0][0]
    targets = sorted(
        {name.split(".")[-1] if not name.endswith(".0") else ".".join(name.split(".")[-2:]) for name in ranks}
    )
    lora_cfg = {
        "r": int(r_default),
        "lora_alpha": float(alpha_default),
        "target_modules": targets,
        "use_rslora": adapter.use_rslora,
        "rank_pattern": {n: int(r) for n, r in ranks.items() if r != r_default},
        "alpha_pattern": {n: float(a) for n, a in adapter.alphas.items() if a != alpha_default},
    }
    metadata = {
        METADATA_KEY: json.dumps({f"{adapter.prefix}.{k}": v for k, v in lora_cfg.items()}, sort_keys=True)
    }
    tensors = {}
    for name, (a, b) in adapter.layers.items():
        tensors[f"{adapter.prefix}.{name}.lora_A.weight"] = a.contiguous().float()
        tensors[f"{adapter.prefix}.{name}.lora_B.weight"] = b.contiguous().float()
    target = out_dir / LORA_WEIGHT_NAME
    tmp = out_dir / (LORA_WEIGHT_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, target)
    meta = {
        "format": "diffalign-selma-lora-v1",
        "prefix": adapter.prefix,
        "base_model": adapter.base_model,
        "use_rslora": adapter.use_rslora,
        "rank": int(r_default),
        "alpha": float(alpha_default),
        **adapter.meta,
        **(dict(extra_meta) if extra_meta else {}),
    }
    tmp_meta = out_dir / (SELMA_META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp_meta, out_dir / SELMA_META_NAME)
    return target


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read an adapter written by :func:`save_adapter` or by diffusers ``save_lora_weights`` (peft layout)."""
    from safetensors import safe_open

    file = _weight_file(path)
    try:
        with safe_open(str(file), framework="pt") as fh:
            header = fh.metadata() or {}
            flat = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises several error types for corrupt files
        raise AdapterError(f"cannot read LoRA file {file}: {err}") from err
    prefixes = {k.split(".", 1)[0] for k in flat}
    if len(prefixes) != 1 or not prefixes <= {"unet", "transformer"}:
        raise AdapterError(
            f"{file}: expected LoRA keys of one denoiser ('unet.*' or 'transformer.*'), got prefixes {sorted(prefixes)}"
            " (text-encoder LoRAs are not supported by SELMA merging)"
        )
    prefix = prefixes.pop()
    layers = _layers_from_flat({k.split(".", 1)[1]: v for k, v in flat.items()}, where=str(file))
    cfg: dict = {}
    if header.get(METADATA_KEY):
        raw = json.loads(header[METADATA_KEY])
        cfg = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(prefix + ".")}
    meta_file = file.parent / SELMA_META_NAME
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    alphas = {}
    for name, (a, _) in layers.items():
        r = int(a.shape[0])
        # Without metadata diffusers uses alpha = r (scale 1); so do we.
        alpha = cfg.get("alpha_pattern", {}).get(name, cfg.get("lora_alpha", r))
        if not cfg:
            alpha = r
        alphas[name] = float(alpha)
    return LoraAdapter(
        layers,
        alphas,
        prefix=prefix,
        use_rslora=bool(cfg.get("use_rslora", False)),
        base_model=meta.get("base_model"),
        meta={
            k: v for k, v in meta.items() if k not in ("prefix", "base_model", "use_rslora", "rank", "alpha")
        },
    )


def peft_config_for(adapter: LoraAdapter):
    """A ``LoraConfig`` whose layers have the adapter's shapes and scales."""
    from peft import LoraConfig

    ranks = adapter.ranks()
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(adapter.alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r_default,
        lora_alpha=alpha_default,
        target_modules=sorted(ranks),
        use_rslora=adapter.use_rslora,
        rank_pattern={n: r for n, r in ranks.items() if r != r_default},
        alpha_pattern={n: a for n, a in adapter.alphas.items() if a != alpha_default},
    )


def load_into_pipeline(pipe, adapter_or_path, adapter_name: str = "default") -> None:
    """Attach an adapter to a pipeline's denoiser: ``pipe.load_lora_weights`` where the pipeline has a
    LoRA loader, else peft injection (PixArt). The adapter becomes active."""
    prefix = denoiser_prefix(pipe)
    if isinstance(adapter_or_path, LoraAdapter):
        adapter = adapter_or_path
    else:
        adapter = load_adapter(adapter_or_path)
    if adapter.prefix != prefix:
        raise AdapterError(f"adapter is for a '{adapter.prefix}' but {type(pipe).__name__} has a '{prefix}'")
    check_fits(get_denoiser(pipe), adapter)
    if hasattr(pipe, "load_lora_weights") and not isinstance(adapter_or_path, LoraAdapter):
        pipe.load_lora_weights(
            str(_weight_file(adapter_or_path).parent), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name
        )
        return
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    denoiser = get_denoiser(pipe)
    inject_adapter_in_model(peft_config_for(adapter), denoiser, adapter_name=adapter_name)
    sd = {}
    for name, (a, b) in adapter.layers.items():
        sd[f"{name}.lora_A.weight"] = a
        sd[f"{name}.lora_B.weight"] = b
    result = set_peft_model_state_dict(denoiser, sd, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise AdapterError(f"adapter keys not found in {type(denoiser).__name__}: {unexpected[:5]}")
    denoiser.requires_grad_(False)


def check_fits(denoiser: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Raise a clear error if any adapter module is missing from the denoiser or has another shape."""
    modules = dict(denoiser.named_modules())
    for name in adapter.layers:
        mod = modules.get(name)
        if mod is None:
            raise AdapterError(
                f"adapter module {name!r} does not exist in {type(denoiser).__name__}: the adapter was built for "
                "another architecture"
            )
        weight = getattr(mod, "base_layer", mod).weight
        want = adapter.delta_shape(name)
        if tuple(weight.shape) != want:
            raise AdapterError(
                f"adapter module {name!r} has update shape {want} but the model's weight is {tuple(weight.shape)}: "
                "the adapter was built for another architecture"
            )
