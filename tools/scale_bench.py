#!/usr/bin/env python3
"""Wall time beside FLOP ratio of each method's sampling regime on a compute-bound transformer.

The shapes-world teachers are so small that Python and hook overhead dominate their wall time, so a FLOP
saving there says little about wall time on a real model. This benchmark builds a diffusers
``PixArtTransformer2DModel`` from the PixArt-alpha 256 px configuration (28 blocks, width 1152 = 16 heads x 72,
patch 2 on a 32x32x4 latent -> 256 image tokens, 120 caption tokens of width 4096), randomly initialised
(timing does not depend on the weights), and times the denoising loop of each regime:

- teacher, 50 and 25 DDIM-like steps with classifier-free guidance (batch 2 per call)
- the 25-step teacher with ECAD's hooks: an all-recompute schedule (hook overhead only) and FORA-style
  every-2 / every-3 schedules (``diffalign.ecad.schedule.fora`` applied with ``diffalign.ecad.hooks``)
- a one-step generator (di-star: one call, guidance distilled into the generator, batch 1)
- a 2 / 4 / 8-step consistency student (mlcm: guidance distilled, batch 1 per call)

Timing rules: torch runs with a fixed thread count (recorded); every row is warmed up (two untimed calls,
with its hooks when it has any); the rows are
interleaved over the repeats (repeat r runs every row, in an order rotated by r), so a change in machine
load hits every row alike; each row reports the median and the spread (min, max) of wall and CPU
(``time.process_time``) seconds; ECAD hooks are removed after their row and the transformer is checked to
carry no hook before every row. FLOPs are counted once per regime with ``diffalign.ecad.cost.count_flops``
(FlopCounterMode, multiply-add = 2); a cached row's FLOPs are its schedule's executed sub-modules, and the
hooks' own count of reused sub-modules is checked against the schedule.

    python tools/scale_bench.py --out bench/results/scale.json                  # PixArt-alpha size
    python tools/scale_bench.py --layers 28 --width 576 --heads 8 --repeats 3  # smaller, same shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# diffusers' PixArtTransformer2DModel config of PixArt-alpha/PixArt-XL-2-256x256 (transformer/config.json).
PIXART_ALPHA_256 = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "use_additional_conditions": False,
}
CAPTION_TOKENS = 120  # PixArt-alpha's T5 max length


@dataclass(frozen=True)
class Regime:
    name: str
    method: str
    steps: int
    batch: int  # 2 = a guided call (conditional + unconditional in one batch)
    schedule: str = ""  # "", "no_cache" (hooks, all recompute) or "fora_N"


REGIMES = (
    Regime("teacher 50 steps (CFG)", "teacher", 50, 2),
    Regime("teacher 25 steps (CFG)", "teacher", 25, 2),
    Regime("teacher 25 + ECAD hooks, all recompute", "ecad", 25, 2, "no_cache"),
    Regime("teacher 25 + FORA every 2 (ECAD hooks)", "ecad", 25, 2, "fora_2"),
    Regime("teacher 25 + FORA every 3 (ECAD hooks)", "ecad", 25, 2, "fora_3"),
    Regime("one-step generator (di-star)", "di-star", 1, 1),
    Regime("student 2 steps (mlcm)", "mlcm", 2, 1),
    Regime("student 4 steps (mlcm)", "mlcm", 4, 1),
    Regime("student 8 steps (mlcm)", "mlcm", 8, 1),
)
BASELINE = "teacher 50 steps (CFG)"


def build_config(layers: int, width: int | None, heads: int | None) -> dict[str, Any]:
    cfg = dict(PIXART_ALPHA_256, num_layers=layers)
    if width is not None or heads is not None:
        heads = heads or cfg["num_attention_heads"]
        width = width or cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if width % heads:
            raise SystemExit(f"error: --width {width} is not divisible by --heads {heads}")
        cfg.update(num_attention_heads=heads, attention_head_dim=width // heads, cross_attention_dim=width)
    return cfg


def build_transformer(cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**cfg).eval().requires_grad_(False)


def inputs(cfg: dict[str, Any], batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = cfg["sample_size"]
    latents = torch.randn(batch, cfg["in_channels"], side, side, generator=g)
    captions = torch.randn(batch, CAPTION_TOKENS, cfg["caption_channels"], generator=g)
    return latents, captions


def call(transformer, latents: torch.Tensor, captions: torch.Tensor, t: float) -> torch.Tensor:
    timestep = torch.full((latents.shape[0],), t)
    return transformer(
        latents,
        encoder_hidden_states=captions,
        timestep=timestep,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]


def timesteps(steps: int) -> list[float]:
    """Evenly spaced, decreasing (as every diffusers scheduler does; ECAD's step counter relies on it)."""
    return [999.0 - i * (1000.0 / steps) for i in range(steps)]


def denoise(transformer, regime: Regime, cfg: dict[str, Any]) -> torch.Tensor:
    """The sampling loop of a regime; the update is a cheap Euler-like step (its cost is not the model's)."""
    latents, captions = inputs(cfg, regime.batch)
    with torch.no_grad():
        for t in timesteps(regime.steps):
            out = call(transformer, latents, captions, t)
            eps = out[:, : cfg["in_channels"]]
            if regime.batch == 2:  # guidance: both halves from one call, combined as CFG does
                cond, uncond = eps.chunk(2)
                eps = torch.cat([uncond + 4.5 * (cond - uncond)] * 2)
            latents = latents - 0.02 * eps
    return latents


# ---------------------------------------------------------------------------------------------- hooks


def schedule_for(regime: Regime, transformer):
    from diffalign.ecad.schedule import fora, no_cache

    if regime.schedule == "no_cache":
        return no_cache(transformer, regime.steps)
    every = int(regime.schedule.split("_")[1])
    return fora(transformer, regime.steps, every)


def hook_count(transformer) -> int:
    """Every diffusers hook left on the transformer or its sub-modules (0 means a plain model)."""
    n = 0
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            n += len(registry.hooks)
    return n


def assert_plain(transformer) -> None:
    from diffalign.ecad.hooks import get_schedule_state

    if hook_count(transformer) or get_schedule_state(transformer) is not None:
        raise RuntimeError("a caching hook is still attached to the transformer before a row")


def run_row(transformer, regime: Regime, cfg: dict[str, Any]) -> tuple[float, float, dict[str, int]]:
    """One timed run of a regime: (wall s, CPU s, hook counters); hooks attached and removed around it."""
    from diffalign.ecad.hooks import apply_schedule, remove_schedule

    assert_plain(transformer)
    state = (
        apply_schedule(transformer, schedule_for(regime, transformer), step_invariant=False)
        if regime.schedule
        else None
    )
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        denoise(transformer, regime, cfg)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        counters = {"computed": state.computed, "reused": state.reused} if state is not None else {}
    finally:
        if state is not None:
            remove_schedule(transformer)
    assert_plain(transformer)
    return wall, cpu, counters


def warm_up(transformer, regimes: list[Regime], cfg: dict[str, Any], calls: int = 2) -> None:
    """Untimed: ``calls`` plain calls at every batch size, and ``calls`` calls of every hooked regime with its
    hooks attached (then removed), so no timed row pays for first-call allocation or hook set-up."""
    from diffalign.ecad.hooks import apply_schedule, remove_schedule

    for regime in regimes:
        print(f"warm-up: {regime.name}", flush=True)
        latents, captions = inputs(cfg, regime.batch)
        assert_plain(transformer)
        if regime.schedule:
            apply_schedule(transformer, schedule_for(regime, transformer), step_invariant=False)
        try:
            with torch.no_grad():
                for t in timesteps(regime.steps)[:calls]:
                    call(transformer, latents, captions, t)
        finally:
            if regime.schedule:
                remove_schedule(transformer)
        assert_plain(transformer)


# ---------------------------------------------------------------------------------------------- FLOPs


def forward_cost(transformer, cfg: dict[str, Any], batch: int) -> tuple[int, torch.Tensor, float]:
    """(FLOPs of one call, per-component FLOPs [blocks, components], overhead FLOPs) at ``batch``."""
    from diffalign.ecad.cost import count_flops
    from diffalign.ecad.schedule import block_layout

    latents, captions = inputs(cfg, batch)
    with torch.no_grad():
        _, total, per_module = count_flops(call, transformer, latents, captions, 500.0)
    layout = block_layout(transformer)
    table = torch.zeros(len(layout), max(len(g.components) for g, _ in layout), dtype=torch.float64)
    for b, (group, index) in enumerate(layout):
        for slot, comp in enumerate(group.components):
            suffix = f"{group.attr}.{index}.{comp}"
            hits = [v for k, v in per_module.items() if k == suffix or k.endswith("." + suffix)]
            table[b, slot] = hits[0] if hits else 0
    return total, table, float(total - table.sum().item())


def regime_flops(regime: Regime, transformer, costs: dict[int, tuple[int, torch.Tensor, float]]) -> float:
    from diffalign.ecad.cost import schedule_flops

    total, table, overhead = costs[regime.batch]
    if not regime.schedule:
        return float(regime.steps * total)
    return schedule_flops(schedule_for(regime, transformer).effective(), table, overhead)


def expected_reuse(regime: Regime, transformer) -> int:
    if not regime.schedule:
        return 0
    return int((~schedule_for(regime, transformer).effective()).sum())


# ---------------------------------------------------------------------------------------------- main


def hardware(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in load],
    }


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/scale.json")
    parser.add_argument("--layers", type=int, default=PIXART_ALPHA_256["num_layers"])
    parser.add_argument("--width", type=int, default=None, help="hidden width (default 1152, PixArt-alpha)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every row (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for all rows")
    parser.add_argument("--rows", nargs="*", default=None, help="only these regimes (names as printed)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit("error: --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cfg = build_config(args.layers, args.width, args.heads)
    regimes = [r for r in REGIMES if args.rows is None or r.name in args.rows]
    if not regimes:
        raise SystemExit(f"error: no regime matches --rows; known: {[r.name for r in REGIMES]}")
    out = Path(args.out)
    transformer = build_transformer(cfg)
    params = sum(p.numel() for p in transformer.parameters())
    print(
        f"transformer: {cfg['num_layers']} blocks, width {cfg['cross_attention_dim']}, {params / 1e6:.0f} M params"
    )
    costs = {b: forward_cost(transformer, cfg, b) for b in sorted({r.batch for r in regimes})}
    for b, (total, _, _) in costs.items():
        print(f"one call at batch {b}: {total / 1e9:.1f} GFLOP")

    warm_up(transformer, regimes, cfg)
    walls: dict[str, list[float]] = {r.name: [] for r in regimes}
    cpus: dict[str, list[float]] = {r.name: [] for r in regimes}
    for rep in range(args.repeats):
        order = regimes[rep % len(regimes) :] + regimes[: rep % len(regimes)]
        for regime in order:
            wall, cpu, counters = run_row(transformer, regime, cfg)
            if counters and counters["reused"] != expected_reuse(regime, transformer):
                raise RuntimeError(
                    f"{regime.name}: hooks reused {counters['reused']} sub-module calls, the schedule says "
                    f"{expected_reuse(regime, transformer)}"
                )
            walls[regime.name].append(wall)
            cpus[regime.name].append(cpu)
            print(
                f"repeat {rep + 1}/{args.repeats} {regime.name}: {wall:.2f} s wall, {cpu:.2f} s CPU",
                flush=True,
            )

    base = next((r for r in regimes if r.name == BASELINE), regimes[0])
    base_flops = regime_flops(base, transformer, costs)
    base_wall = statistics.median(walls[base.name])
    base_cpu = statistics.median(cpus[base.name])
    rows = []
    for regime in regimes:
        flops = regime_flops(regime, transformer, costs)
        wall, cpu = statistics.median(walls[regime.name]), statistics.median(cpus[regime.name])
        rows.append(
            {
                "regime": regime.name,
                "method": regime.method,
                "calls": regime.steps,
                "batch": regime.batch,
                "GFLOP": round(flops / 1e9, 1),
                "FLOP ratio": round(flops / base_flops, 4),
                "wall s (median)": round(wall, 3),
                "wall s (min-max)": f"{min(walls[regime.name]):.3f}-{max(walls[regime.name]):.3f}",
                "wall ratio": round(wall / base_wall, 4),
                "CPU s (median)": round(cpu, 3),
                "CPU ratio": round(cpu / base_cpu, 4),
                "wall/FLOP ratio": round((wall / base_wall) / (flops / base_flops), 3),
            }
        )
    result = {
        "package": "scale",
        "what": "sampling-loop wall and CPU time vs FLOP ratio on a PixArt-alpha-shaped transformer (random init)",
        "baseline": base.name,
        "config": cfg,
        "caption_tokens": CAPTION_TOKENS,
        "image_tokens": (cfg["sample_size"] // cfg["patch_size"]) ** 2,
        "params_millions": round(params / 1e6, 1),
        "gflop_per_call": {f"batch {b}": round(c[0] / 1e9, 2) for b, c in costs.items()},
        "repeats": args.repeats,
        "hardware": hardware(args.threads),
        "timing": "two untimed warm-up calls per row (hooks attached for hooked rows), then rows interleaved "
        "over repeats (order rotated each repeat); "
        "medians with min-max; hooks removed and checked removed around every row",
        "command": "python tools/scale_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
        "raw": {"wall_s": walls, "cpu_s": cpus},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    from diffalign.core.report import markdown_table

    print(markdown_table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
