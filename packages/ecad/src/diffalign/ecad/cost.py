"""Analytic compute cost of a caching schedule.

One transformer forward is counted with ``torch.utils.flop_counter.FlopCounterMode`` under the math
SDPA backend (the fused CPU/GPU attention kernels are invisible to the counter, so attention would
count as zero otherwise). The counter attributes FLOPs to every module by name, which gives

    flops(call) = overhead + sum_{block, component} flops[block, component]

where ``overhead`` is everything outside the scheduled sub-modules (patch embedding, timestep and
caption embeddings, norms' matmuls, final projection). A reused sub-module costs nothing, so a schedule
costs ``calls_per_step * (steps * overhead + sum(effective_bits * flops))``: :func:`schedule_flops`.
With the step-invariant cache on (the default of :func:`~diffalign.ecad.hooks.apply_schedule`), the
caption-only projections (``invariant_*``: PixArt's caption projection and cross-attention keys/values)
run at step 0 only, so after step 0 each step costs ``overhead - invariant_overhead`` plus, per
recomputed component, ``flops - invariant``. FLOPs here count a multiply-add as 2; the paper reports
MACs (half of this).

A cost model can also hold measured latencies instead of FLOPs (``unit="seconds"``, from
:func:`measure_latency_model`): the same additive formula then predicts the run time of a schedule on
the device it was measured on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .schedule import Schedule, ScheduleError, block_layout, detect_architecture, group_sizes

__all__ = [
    "CostModel",
    "schedule_flops",
    "measure_cost_model",
    "measure_latency_model",
    "cost_model_from_call",
    "count_flops",
    "capture_transformer_call",
]


def schedule_flops(
    effective: torch.Tensor,
    component_flops: torch.Tensor,
    overhead_flops: float,
    calls_per_step: int = 1,
    invariant_component_flops: torch.Tensor | None = None,
    invariant_overhead_flops: float = 0.0,
) -> float:
    """FLOPs of a sampling run that executes the bits of ``effective`` ([steps, blocks, components]).

    ``invariant_*`` are the parts of each component (and of the overhead) computed at step 0 only."""
    if effective.shape[1:] != component_flops.shape:
        raise ScheduleError(
            f"schedule shape {tuple(effective.shape)} does not match the cost table {tuple(component_flops.shape)}"
        )
    steps = effective.shape[0]
    eff = effective.to(torch.float64)
    table = component_flops.to(torch.float64)
    total = steps * overhead_flops + float((eff * table).sum())
    if invariant_component_flops is not None:
        total -= (steps - 1) * invariant_overhead_flops
        total -= float((eff[1:] * invariant_component_flops.to(torch.float64)).sum())
    return float(calls_per_step * total)


@dataclass
class CostModel:
    architecture: str
    group_sizes: tuple[int, ...]
    component_flops: torch.Tensor  # float64 [blocks, components], per transformer call
    overhead_flops: float  # per transformer call
    calls_per_step: int = 1
    # parts computed once per generation by the step-invariant cache (None = not measured)
    invariant_component_flops: torch.Tensor | None = None
    invariant_overhead_flops: float = 0.0
    step_invariant: bool = True  # predict runs with the step-invariant cache on
    unit: str = "flops"  # or "seconds" for a measured latency model

    def scaled(self, factor: float) -> CostModel:
        """The same model with every cost multiplied by ``factor`` (e.g. per image instead of per batch)."""
        inv = None if self.invariant_component_flops is None else self.invariant_component_flops * factor
        return CostModel(
            self.architecture,
            self.group_sizes,
            self.component_flops * factor,
            self.overhead_flops * factor,
            self.calls_per_step,
            inv,
            self.invariant_overhead_flops * factor,
            self.step_invariant,
            self.unit,
        )

    def with_step_invariant(self, on: bool) -> CostModel:
        out = self.scaled(1.0)
        out.step_invariant = on
        return out

    def flops(self, schedule: Schedule) -> float:
        if schedule.architecture != self.architecture or schedule.group_sizes != self.group_sizes:
            raise ScheduleError(
                f"cost model is for {self.architecture} {self.group_sizes}, schedule {schedule.name!r} is for "
                f"{schedule.architecture} {schedule.group_sizes}"
            )
        inv = self.invariant_component_flops if self.step_invariant else None
        return schedule_flops(
            schedule.effective(),
            self.component_flops,
            self.overhead_flops,
            self.calls_per_step,
            inv,
            self.invariant_overhead_flops,
        )

    def no_cache_flops(self, num_steps: int) -> float:
        """Cost of the plain, unhooked run (every projection at every step): the ratio's denominator."""
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
            "invariant_component_flops": None
            if self.invariant_component_flops is None
            else self.invariant_component_flops.tolist(),
            "invariant_overhead_flops": self.invariant_overhead_flops,
            "step_invariant": self.step_invariant,
            "unit": self.unit,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(
            d["architecture"],
            tuple(d["group_sizes"]),
            torch.tensor(d["component_flops"], dtype=torch.float64),
            float(d["overhead_flops"]),
            int(d["calls_per_step"]),
            None
            if d.get("invariant_component_flops") is None
            else torch.tensor(d["invariant_component_flops"], dtype=torch.float64),
            float(d.get("invariant_overhead_flops", 0.0)),
            bool(d.get("step_invariant", True)),
            str(d.get("unit", "flops")),
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
    args, kwargs, calls_per_step = capture_transformer_call(pipe, call_kwargs)
    return cost_model_from_call(transformer, args, kwargs, calls_per_step)


def cost_model_from_call(
    transformer, args: tuple, kwargs: dict[str, Any], calls_per_step: int = 1
) -> CostModel:
    """Per-component FLOPs from one counted ``transformer(*args, **kwargs)`` call."""
    arch = detect_architecture(transformer)
    with torch.no_grad():
        _, total, per_module = count_flops(transformer, *args, **kwargs)
    layout = block_layout(transformer, arch)
    spec_c = max(len(g.components) for g, _ in layout)
    table = torch.zeros(len(layout), spec_c, dtype=torch.float64)
    for b, (group, index) in enumerate(layout):
        for slot, comp in enumerate(group.components):
            table[b, slot] = _module_flops(per_module, f"{group.attr}.{index}.{comp}")
    overhead = float(total - table.sum().item())
    inv_table, inv_overhead = _invariant_costs(
        transformer, arch, table.shape, lambda p: _module_flops(per_module, p)
    )
    return CostModel(
        arch, group_sizes(transformer, arch), table, overhead, calls_per_step, inv_table, inv_overhead
    )


def _invariant_costs(transformer, arch, shape, cost_of) -> tuple[torch.Tensor, float]:
    from .hooks import step_invariant_modules

    inv_table = torch.zeros(shape, dtype=torch.float64)
    inv_overhead = 0.0
    for path, _, b, slot in step_invariant_modules(transformer, arch):
        if b is None:
            inv_overhead += cost_of(path)
        else:
            inv_table[b, slot] += cost_of(path)
    return inv_table, float(inv_overhead)


def latency_clock(device: torch.device):
    """The ``(device_sync, clock)`` pair :func:`measure_latency_model` uses on ``device`` by default.

    CUDA: ``torch.cuda.synchronize`` and ``time.perf_counter`` (kernels run asynchronously, so the clock is
    read after a sync). CPU: no sync and ``time.thread_time`` (this thread's CPU time, robust to other load).
    Any other device: no sync and ``time.perf_counter``.
    """
    import time

    def no_sync() -> None:
        return None

    if device.type == "cuda":
        return torch.cuda.synchronize, time.perf_counter
    if device.type == "cpu":
        return no_sync, time.thread_time
    return no_sync, time.perf_counter


def measure_latency_model(
    pipe, call_kwargs: dict[str, Any], repeats: int = 3, device_sync=None, clock=None
) -> CostModel:
    """Per-component latencies (seconds per transformer call) measured on the pipeline's device.

    The transformer is called ``repeats`` times (after one warm-up) on the captured inputs; a pre/post
    hook pair times every scheduled component and caption-only projection (``device_sync`` is called
    before each clock read: ``torch.cuda.synchronize`` on CUDA, nothing on CPU). The median over repeats
    is kept; the overhead is the whole call minus the components. ``clock`` defaults to
    ``time.thread_time`` on CPU (CPU time of this thread, robust to other load) and
    ``time.perf_counter`` elsewhere. Use it as the search's second objective with
    ``search.cost_model: latency``.
    """
    import statistics

    from .hooks import get_schedule_state, step_invariant_modules

    transformer = pipe.transformer
    if get_schedule_state(pipe) is not None:
        raise ScheduleError("remove the caching schedule before measuring the latency model")
    default_sync, default_clock = latency_clock(next(transformer.parameters()).device)
    device_sync = default_sync if device_sync is None else device_sync
    clock = default_clock if clock is None else clock
    arch = detect_architecture(transformer)
    args, kwargs, calls_per_step = capture_transformer_call(pipe, call_kwargs)
    layout = block_layout(transformer, arch)
    spec_c = max(len(g.components) for g, _ in layout)
    paths: dict[str, torch.nn.Module] = {}
    for group, index in layout:
        block = getattr(transformer, group.attr)[index]
        for comp in group.components:
            paths[f"{group.attr}.{index}.{comp}"] = getattr(block, comp)
    for path, module, _, _ in step_invariant_modules(transformer, arch):
        paths[path] = module
    samples: dict[str, list[float]] = {p: [] for p in paths}
    totals: list[float] = []
    starts: dict[str, float] = {}
    acc: dict[str, float] = {}
    handles = []
    for path, module in paths.items():

        def pre(mod, a, p=path):
            device_sync()
            starts[p] = clock()

        def post(mod, a, o, p=path):
            device_sync()
            acc[p] = acc.get(p, 0.0) + clock() - starts[p]

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            transformer(*args, **kwargs)  # warm-up
            for _ in range(repeats):
                acc.clear()
                device_sync()
                t0 = clock()
                transformer(*args, **kwargs)
                device_sync()
                totals.append(clock() - t0)
                for p in paths:
                    samples[p].append(acc.get(p, 0.0))
    finally:
        for h in handles:
            h.remove()
    med = {p: statistics.median(v) for p, v in samples.items()}
    table = torch.zeros(len(layout), spec_c, dtype=torch.float64)
    for b, (group, index) in enumerate(layout):
        for slot, comp in enumerate(group.components):
            table[b, slot] = med[f"{group.attr}.{index}.{comp}"]
    overhead = max(0.0, statistics.median(totals) - float(table.sum()))
    inv_table, inv_overhead = _invariant_costs(transformer, arch, table.shape, lambda p: med.get(p, 0.0))
    return CostModel(
        arch,
        group_sizes(transformer, arch),
        table,
        overhead,
        calls_per_step,
        inv_table,
        inv_overhead,
        unit="seconds",
    )
