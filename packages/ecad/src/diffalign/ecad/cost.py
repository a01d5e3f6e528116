"""Analytic compute cost of a caching schedule.

One transformer forward is counted with ``torch.utils.flop_counter.FlopCounterMode`` under the math
SDPA backend (the fused CPU/GPU attention kernels are invisible to the counter, so attention would
count as zero otherwise). The counter attributes FLOPs to every module by name, which gives

    flops(call) = overhead + sum_{block, component} flops[block, component]

where ``overhead`` is everything outside the scheduled sub-modules (patch embedding, timestep and
caption embeddings, norms' matmuls, final projection). A reused sub-module costs nothing, so a schedule
costs ``calls_per_step * (steps * overhead + sum(effective_bits * flops))``: :func:`schedule_flops`.
FLOPs here count a multiply-add as 2; the paper reports MACs (half of this).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .schedule import Schedule, ScheduleError, block_layout, detect_architecture, group_sizes

__all__ = ["CostModel", "schedule_flops", "measure_cost_model", "count_flops", "capture_transformer_call"]


def schedule_flops(
    effective: torch.Tensor, component_flops: torch.Tensor, overhead_flops: float, calls_per_step: int = 1
) -> float:
    """FLOPs of a sampling run that executes the bits of ``effective`` ([steps, blocks, components])."""
    if effective.shape[1:] != component_flops.shape:
        raise ScheduleError(
            f"schedule shape {tuple(effective.shape)} does not match the cost table {tuple(component_flops.shape)}"
        )
    steps = effective.shape[0]
    per_step = (effective.to(torch.float64) * component_flops.to(torch.float64)).sum()
    return float(calls_per_step * (steps * overhead_flops + per_step))


@dataclass
class CostModel:
    architecture: str
    group_sizes: tuple[int, ...]
    component_flops: torch.Tensor  # float64 [blocks, components], per transformer call
    overhead_flops: float  # per transformer call
    calls_per_step: int = 1

    def flops(self, schedule: Schedule) -> float:
        if schedule.architecture != self.architecture or schedule.group_sizes != self.group_sizes:
            raise ScheduleError(
                f"cost model is for {self.architecture} {self.group_sizes}, schedule {schedule.name!r} is for "
                f"{schedule.architecture} {schedule.group_sizes}"
            )
        return schedule_flops(
            schedule.effective(), self.component_flops, self.overhead_flops, self.calls_per_step
        )

    def no_cache_flops(self, num_steps: int) -> float:
        return float(self.calls_per_step * num_steps * (self.overhead_flops + self.component_flops.sum()))

    def flop_ratio(self, schedule: Schedule) -> float:
        return self.flops(schedule) / self.no_cache_flops(schedule.num_steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "group_sizes": list(self.group_sizes),
            "component_flops": self.component_flops.tolist(),
            "overhead_flops": self.overhead_flops,
            "calls_per_step": self.calls_per_step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(
            d["architecture"],
            tuple(d["group_sizes"]),
            torch.tensor(d["component_flops"], dtype=torch.float64),
            float(d["overhead_flops"]),
            int(d["calls_per_step"]),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path


def count_flops(fn, *args, **kwargs) -> tuple[Any, int, dict[str, int]]:
    """Run ``fn`` under FlopCounterMode with the math SDPA backend; return (output, total, per-module)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    per_module = {name: int(sum(v.values())) for name, v in counter.get_flop_counts().items()}
    return out, int(counter.get_total_flops()), per_module


class _Abort(Exception):
    pass


def capture_transformer_call(pipe, call_kwargs: dict[str, Any]) -> tuple[tuple, dict, int]:
    """Run ``pipe(**call_kwargs)`` with 2 inference steps; return the first transformer call's
    (args, kwargs) and the number of transformer calls per denoising step."""
    transformer = pipe.transformer
    captured: list = []

    def pre_hook(module, args, kwargs):
        captured.append((args, dict(kwargs)))

    kw = dict(call_kwargs)
    kw["num_inference_steps"] = 2
    kw["output_type"] = "latent"
    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**kw)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the pipeline never called its transformer")
    if len(captured) % 2:
        raise RuntimeError(f"{len(captured)} transformer calls for 2 steps; cannot infer calls per step")
    args, kwargs = captured[0]
    return args, kwargs, len(captured) // 2


def _module_flops(per_module: dict[str, int], path: str) -> int:
    """FLOPs of the module whose counter name ends with ``.<path>`` (counter names start with the class)."""
    hits = [v for k, v in per_module.items() if k.endswith("." + path) or k == path]
    if len(hits) > 1:
        raise RuntimeError(f"ambiguous FLOP counter entries for {path}")
    return hits[0] if hits else 0


def measure_cost_model(pipe, call_kwargs: dict[str, Any]) -> CostModel:
    """Per-component FLOPs of ``pipe.transformer`` from one counted forward with the inputs the
    pipeline produces for ``call_kwargs`` (batch size, resolution, guidance as in the real run)."""
    from .hooks import get_schedule_state

    transformer = pipe.transformer
    if get_schedule_state(pipe) is not None:
        raise ScheduleError("remove the caching schedule before measuring the cost model")
    arch = detect_architecture(transformer)
    args, kwargs, calls_per_step = capture_transformer_call(pipe, call_kwargs)
    with torch.no_grad():
        _, total, per_module = count_flops(transformer, *args, **kwargs)
    layout = block_layout(transformer, arch)
    spec_c = max(len(g.components) for g, _ in layout)
    table = torch.zeros(len(layout), spec_c, dtype=torch.float64)
    for b, (group, index) in enumerate(layout):
        for slot, comp in enumerate(group.components):
            table[b, slot] = _module_flops(per_module, f"{group.attr}.{index}.{comp}")
    overhead = float(total - table.sum().item())
    return CostModel(arch, group_sizes(transformer, arch), table, overhead, calls_per_step)
