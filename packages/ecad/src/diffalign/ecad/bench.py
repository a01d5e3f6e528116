"""Benchmark: an ECAD search on a model, then a held-out comparison against no cache, FORA every-N and
diffusers' built-in caches (FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer).

    python -m diffalign.ecad.bench --out bench/results/ecad.json            # everything, resumable
    python -m diffalign.ecad.bench --out ... --stage search                  # only the schedule search
    python -m diffalign.ecad.bench --out ... --stage quality                 # held-out quality rows
    python -m diffalign.ecad.bench --out ... --timing-only [--scale-row]     # only the timing rows
    python -m diffalign.ecad.bench --out ... --stage scale                   # only the PixArt-alpha-size row

Quality rows (held-out prompts of core's split, ``diffalign.core.shapes.eval_prompts``, one seed per
image): faithfulness (the shapes verifier), paired distance to the no-cache image (median, 90th
percentile, share above 0.1), FID against the no-cache images (verifier features), and the FLOP ratio
counted with FlopCounterMode (math SDPA) over a whole generation, against the plain pipeline. Each
built-in cache is applied to a fresh copy of the transformer, its state is reset and a cache context
opened before every batch, and a row whose counted FLOP ratio is not below 1 is flagged
(``hooked_and_cached: false``). ECAD rows are chosen from the searched front on *validation* scores
only: for each baseline, the front schedule with the best validation fidelity at no more FLOPs.

Timing rows (``--timing-only``): one torch thread, every row run once per repeat in interleaved order,
CPU time of the thread (``time.thread_time``) and wall time per generation of one batch, medians and
inter-quartile ranges, ratios against the plain no-cache row of the same repeat. ``--scale-row`` (or ``--stage scale`` alone) adds a
compute-bound check: a PixArt-alpha-sized transformer built from a config (random weights) driven by
the same scheduler loop, reporting the time speedup beside ``1 / FLOP ratio``.

Rows are written to the JSON as they finish; a rerun skips rows already present with the same settings.
The command line of every stage is recorded under ``commands``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import EcadRecipe
from .search import calibration_set, run_search, validation_section

__all__ = ["bench_recipe", "main"]


def bench_recipe(args) -> EcadRecipe:
    """The search recipe of the benchmark (shapes world defaults; quick = a smoke-sized run)."""
    quick = args.quick

    def pick(value, quick_default, full_default):
        return value if value is not None else (quick_default if quick else full_default)

    out = Path(args.out)
    run_dir = Path(args.run_dir or out.with_suffix("").as_posix() + "_search")
    return EcadRecipe.model_validate(
        {
            "run_dir": str(run_dir),
            "model": {"source": args.model},
            "sampling": {
                "num_inference_steps": pick(args.steps, 8, 20),
                "guidance_scale": args.guidance,
                "height": args.size,
                "width": args.size,
                "batch_size": 16,
            },
            "calibration": {
                "shapes_split": "train",
                "num_prompts": pick(args.calibration_prompts, 8, 32),
                "num_seeds": pick(args.calibration_seeds, 1, 2),
            },
            "validation": {
                "shapes_split": "train",
                "num_prompts": pick(args.validation_prompts, 8, 32),
                "num_seeds": 2,
                "seed_offset": 1000,
                "prompt_seed": 1,
            },
            "quality": {"reward": args.reward},
            "search": {
                "population_size": pick(args.population, 8, 24),
                "offspring": pick(args.offspring, 8, 16),
                "generations": pick(args.generations, 2, 3),
                "seed": args.search_seed,
                "num_threads": 1,
                "seed_builtin_recordings": not quick,
                **({} if args.reward_tolerance is None else {"reward_tolerance": args.reward_tolerance}),
            },
        }
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="shapes/dit")
    ap.add_argument("--reward", default="shapes-faithfulness")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--stage", choices=["all", "search", "quality", "timing", "scale", "table"], default="all"
    )
    ap.add_argument("--timing-only", action="store_true", help="same as --stage timing")
    ap.add_argument("--scale-row", action="store_true", help="timing: add the PixArt-alpha-size row")
    ap.add_argument(
        "--scale-width",
        type=int,
        default=1152,
        help="scale row: transformer width, heads of 72 channels (PixArt-alpha: 1152)",
    )
    ap.add_argument("--scale-steps", type=int, default=10, help="scale row: denoising steps (default 10)")
    ap.add_argument("--run-dir", default=None, help="search run dir (resumed if it exists)")
    ap.add_argument("--steps", type=int, default=None, help="default 20; quick 8")
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--size", type=int, default=None, help="image height/width in pixels")
    ap.add_argument("--population", type=int, default=None, help="minimum NSGA-II population (24; quick 8)")
    ap.add_argument("--offspring", type=int, default=None, help="children per generation (16; quick 8)")
    ap.add_argument("--generations", type=int, default=None, help="NSGA-II generations (3; quick 2)")
    ap.add_argument("--calibration-prompts", type=int, default=None, help="default 32 (x2 seeds); quick 8")
    ap.add_argument("--calibration-seeds", type=int, default=None, help="default 2; quick 1")
    ap.add_argument("--validation-prompts", type=int, default=None, help="default 32 (x2 seeds); quick 8")
    ap.add_argument("--heldout-per-skill", type=int, default=None, help="core eval_prompts(n); 24; quick 2")
    ap.add_argument("--search-seed", type=int, default=0, help="seed of the NSGA-II search (default 0)")
    ap.add_argument(
        "--reward-tolerance",
        type=float,
        default=None,
        help="search constraint: calibration reward >= no cache - this (default: the recipe's 0.02)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (default 7; quick 2)")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.timing_only:
        args.stage = "timing"
    torch.set_num_threads(1)
    from diffalign.core.models import load_pipeline

    cfg = bench_recipe(args)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    if args.stage == "table":
        print(table(report))
        return report
    report.setdefault("commands", {})[args.stage] = "python -m diffalign.ecad.bench " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    _write(report, out, ("commands",))
    if args.stage == "scale":
        from .bench_rows import scale_row

        report.setdefault("timing", {})["scale"] = scale_row(
            repeats=args.repeats or 3, steps=args.scale_steps, width=args.scale_width
        )
        _write(report, out, ("timing",))
        return report
    pipe = load_pipeline(args.model)
    pipe.transformer.eval()
    if args.stage in ("all", "search"):
        t0 = time.process_time()
        w0 = time.perf_counter()
        result = run_search(cfg, pipe=pipe, show_progress=False)
        report["search"] = {
            "cpu_time_s_this_call": time.process_time() - t0,
            "wall_time_s_this_call_under_load": time.perf_counter() - w0,
            "search_wall_time_s_total": result.wall_time_s,
            "evaluations": int(len(result.X)),
            "front_size": len(result.front),
            "initial_population": int((result.generation == 0).sum()),
            "offspring_per_generation": cfg.search.offspring,
            "generations": int(result.generation.max()) + 1,
            "calibration_images": cfg.calibration.num_prompts * cfg.calibration.num_seeds,
            "validation_images": len(calibration_set(validation_section(cfg))[0]),
            "run_dir": cfg.run_dir,
        }
        _write(report, out, ("search",))
    if args.stage in ("all", "quality"):
        from .bench_rows import quality_rows

        quality_rows(pipe, cfg, args, report, out)
    if args.stage in ("all", "timing"):
        from .bench_rows import timing_rows

        timing_rows(pipe, cfg, args, report, out)
    return report


def table(report: dict[str, Any]) -> str:
    """Markdown table of the quality rows with the timing ratios beside them (``--stage table``)."""
    rows = report.get("quality", {}).get("rows", {})
    timing = report.get("timing", {}).get("rows", {})

    def f(v, nd=3):
        return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    lines = [
        "| method | faithfulness | p90 distance | changed | FID vs no cache | FLOP ratio | CPU-time ratio | wall ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1].get("flop_ratio", 0)):
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |||||||")
            continue
        t = timing.get(name, {})
        flag = "" if r.get("hooked_and_cached", True) else " (cached nothing)"
        lines.append(
            f"| {name}{flag} | {f(r.get('faithfulness'))} | {f(r.get('distance_p90'))} | {f(r.get('changed_share'), 2)} | "
            f"{f(r.get('fid_vs_no_cache'), 1)} | {f(r.get('flop_ratio'))} | "
            f"{f(t.get('cpu_ratio', {}).get('median'))} | {f(t.get('wall_ratio', {}).get('median'))} |"
        )
    comparison = report.get("quality", {}).get("comparison", [])
    if comparison:
        lines += [
            "",
            "| baseline | FLOP ratio | faithfulness | ECAD validation pick | FLOP ratio | faithfulness | "
            "best ECAD row at no more FLOPs | faithfulness |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in sorted(comparison, key=lambda c: -c["baseline_flop_ratio"]):
            lines.append(
                f"| {c['baseline']} | {f(c['baseline_flop_ratio'])} | {f(c['baseline_faithfulness'])} | "
                f"{c.get('validation_pick') or 'none'} | {f(c.get('validation_pick_flop_ratio'))} | "
                f"{f(c.get('validation_pick_faithfulness'))} | {c['ecad'] or 'none'} | {f(c['ecad_faithfulness'])} |"
            )
    return "\n".join(lines)


def _write(report: dict[str, Any], out: Path, keys: tuple[str, ...] = ()) -> None:
    """Write ``report``'s ``keys`` merged over what is on disk (stages may run in separate processes)."""
    from diffalign.core.report import write_json

    if out.is_file():  # keep what other stages wrote meanwhile; this process owns only what it produced
        on_disk = json.loads(out.read_text())
        for key in keys:
            if key in report:
                on_disk[key] = report[key]
        report.clear()
        report.update(on_disk)
    report.setdefault("package", "diffalign-ecad")
    report["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, out)


if __name__ == "__main__":
    main()
