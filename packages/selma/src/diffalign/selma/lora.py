"""LoRA experts as plain tensors, for merging: ``delta = alpha/r * B @ A`` per module.

An adapter is held as ``A`` (``[r, in]``) and ``B`` (``[out, r]``) per target module with the module's
``alpha``, so merges are linear algebra on the updates. Files are read and written by
``diffalign.core.lora`` in diffusers' layout (``pytorch_lora_weights.safetensors``, LoRA config in the
metadata), so ``pipe.load_lora_weights(dir)`` reads every expert and merge; ``selma_adapter.json`` beside
it records the skill, base model and training history.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.core.lora import (
    LORA_WEIGHT_NAME,
    LoraError,
    check_lora_fits,
    lora_layers,
    read_lora,
    write_lora,
)

SELMA_META_NAME = "selma_adapter.json"

AdapterError = LoraError  # an adapter file, or a set of adapters, that cannot be used as asked


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


def adapter_from_model(
    denoiser: torch.nn.Module, config, adapter_name: str = "default", prefix: str = "unet", **kwargs
) -> LoraAdapter:
    """The LoRA factors of an injected adapter, detached to CPU float32."""
    sd = lora_layers(denoiser, adapter_name=adapter_name)
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


def save_adapter(adapter: LoraAdapter, out_dir: str | Path, extra_meta: Mapping | None = None) -> Path:
    """Write the adapter with ``diffalign.core.lora.write_lora`` (diffusers layout, LoRA config as
    metadata) and ``selma_adapter.json`` (base model, ranks, skill, ...). Both are written to temporary
    files and renamed."""
    import os

    out_dir = Path(out_dir)
    config = peft_config_for(adapter)
    state = {}
    for name, (a, b) in adapter.layers.items():
        state[f"{name}.lora_A.weight"] = a.contiguous().float()
        state[f"{name}.lora_B.weight"] = b.contiguous().float()
    target = write_lora(out_dir, adapter.prefix, state, config)
    meta = {
        "format": "diffalign-selma-lora-v1",
        "prefix": adapter.prefix,
        "base_model": adapter.base_model,
        "use_rslora": adapter.use_rslora,
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        **adapter.meta,
        **(dict(extra_meta) if extra_meta else {}),
    }
    tmp_meta = out_dir / (SELMA_META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp_meta, out_dir / SELMA_META_NAME)
    return target


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read an adapter written by :func:`save_adapter` or by diffusers ``save_lora_weights``."""
    prefix, flat, cfg = read_lora(path)
    file = Path(path) / LORA_WEIGHT_NAME if Path(path).is_dir() else Path(path)
    layers = _layers_from_flat(flat, where=str(file))
    meta_file = file.parent / SELMA_META_NAME
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    alphas = {}
    for name, (a, _) in layers.items():
        r = int(a.shape[0])
        # Without metadata diffusers uses alpha = r (scale 1); so do we.
        alpha = cfg.get("alpha_pattern", {}).get(name, cfg.get("lora_alpha", r)) if cfg else r
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


def check_fits(denoiser: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Raise a clear error if any adapter module is missing from the denoiser or has another shape."""
    state = {}
    for name, (a, b) in adapter.layers.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    check_lora_fits(denoiser, state)
