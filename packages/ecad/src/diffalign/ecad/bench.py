"""Benchmark: an ECAD search on a model, then held-out comparison against no cache, FORA every-N and
diffusers' built-in caches (FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer).

    python -m diffalign.ecad.bench --out bench/results/ecad.json [--quick] [--model shapes/dit]

Every method is run on the same held-out prompts and seeds (not used in the search). Reported per
method: reward (faithfulness), FID against the no-cache images of the same prompts/seeds (shapes
verifier features when available), FLOP ratio (counted with FlopCounterMode, math SDPA), wall-clock
ratio (median of repeats, batch >= 16), and for every built-in cache the ECAD front schedule with the
best calibration reward at no more FLOPs ("matched FLOPs").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .config import EcadRecipe
from .cost import count_flops
from .hooks import apply_schedule, remove_schedule
from .sampling import generate, pipeline_call_kwargs
from .schedule import Schedule, fora, no_cache
from .search import calibration_set, load_reward, run_search


def _heldout(cfg: EcadRecipe, n_prompts: int, n_seeds: int):
    cal = cfg.calibration.model_copy(
        update={
            "shapes_split": "heldout",
            "num_prompts": n_prompts,
            "num_seeds": n_seeds,
            "seed_offset": 1000,
            "prompt_seed": 1234,
        }
    )
    return calibration_set(cal)


def _fid(images: torch.Tensor, reference: torch.Tensor) -> float | None:
    try:
        from diffalign.core.metrics.fid import fid_from_features
        from diffalign.core.shapes.scoring import features
    except ImportError:
        return None
    try:
        return float(fid_from_features(features(reference), features(images)))
    except Exception:  # verifier asset missing or images of another size
        return None


class _TimestepTracker:
    def __init__(self, transformer):
        self.value = 999
        self.handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        t = kwargs.get("timestep")
        if t is not None:
            value = float(torch.as_tensor(t).flatten()[0].float())
            self.value = int(value * 1000) if value <= 1 else int(value)  # flow-matching passes t / 1000


def _builtin(name: str, transformer, tracker: _TimestepTracker):
    """Apply one of diffusers' cache hooks to ``transformer`` (functional API; PixArt has no CacheMixin)."""
    import diffusers.hooks as H

    cb = lambda: tracker.value  # noqa: E731
    if name.startswith("first_block_cache"):
        thr = float(name.split("@")[1])
        H.apply_first_block_cache(transformer, H.FirstBlockCacheConfig(threshold=thr))
    elif name.startswith("pyramid_attention_broadcast"):
        skip = int(name.split("@")[1])
        H.apply_pyramid_attention_broadcast(
            transformer,
            H.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=skip,
                cross_attention_block_skip_range=skip,
                spatial_attention_timestep_skip_range=(0, 1000),
                cross_attention_timestep_skip_range=(0, 1000),
                current_timestep_callback=cb,
            ),
        )
    elif name.startswith("faster_cache"):
        skip = int(name.split("@")[1])
        H.apply_faster_cache(
            transformer,
            H.FasterCacheConfig(
                spatial_attention_block_skip_range=skip,
                spatial_attention_timestep_skip_range=(-1, 1000),
                current_timestep_callback=cb,
                attention_weight_callback=lambda _: 0.5,
                is_guidance_distilled=True,
            ),
        )
    elif name.startswith("taylorseer"):
        interval = int(name.split("@")[1])
        H.apply_taylorseer_cache(
            transformer,
            H.TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=1, max_order=1),
        )
    else:
        raise ValueError(name)


def _measure(pipe, prompts, seeds, cfg, repeats: int, transformer_name: str, context: bool) -> dict[str, Any]:
    sc = cfg.sampling

    def run():
        scope = contextlib.nullcontext()
        if context:  # diffusers' built-in caches need a cache context around the denoising loop
            from diffusers.models.cache_utils import CacheMixin

            scope = CacheMixin.cache_context(pipe.transformer, "cond")
        with scope:
            return generate(
                pipe,
                prompts,
                seeds,
                sc.num_inference_steps,
                sc.guidance_scale,
                sc.height,
                sc.width,
                batch_size=max(16, sc.batch_size),
            )

    images = run()
    n = min(16, len(prompts))
    kw = pipeline_call_kwargs(
        pipe, prompts[:n], seeds[:n], sc.num_inference_steps, sc.guidance_scale, sc.height, sc.width
    )
    kw["output_type"] = "latent"
    if context:
        from diffusers.models.cache_utils import CacheMixin

        with CacheMixin.cache_context(pipe.transformer, "cond"):
            _, _, per_module = count_flops(pipe, **kw)
    else:
        _, _, per_module = count_flops(pipe, **kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if context:
            from diffusers.models.cache_utils import CacheMixin

            with CacheMixin.cache_context(pipe.transformer, "cond"):
                pipe(**{**kw, "generator": [torch.Generator().manual_seed(s) for s in seeds[:n]]})
        else:
            pipe(**{**kw, "generator": [torch.Generator().manual_seed(s) for s in seeds[:n]]})
        times.append(time.perf_counter() - t0)
    return {
        "images": images,
        "flops": per_module.get(transformer_name, 0),
        "wall_s": statistics.median(times),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="shapes/dit")
    ap.add_argument("--reward", default="shapes-faithfulness")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run-dir", default=None, help="search run dir (resumed if it exists)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--size", type=int, default=None, help="image height/width in pixels")
    ap.add_argument("--population", type=int, default=None, help="NSGA-II population (default 24; quick 8)")
    ap.add_argument("--generations", type=int, default=None, help="NSGA-II generations (default 20; quick 3)")
    ap.add_argument("--calibration-prompts", type=int, default=None, help="default 40; quick 8")
    ap.add_argument("--calibration-seeds", type=int, default=None, help="default 2; quick 1")
    ap.add_argument("--heldout-prompts", type=int, default=None, help="default 100; quick 8")
    ap.add_argument("--heldout-seeds", type=int, default=None, help="default 4; quick 2")
    args = ap.parse_args(argv)

    def pick(value, quick_default, full_default):
        return value if value is not None else (quick_default if args.quick else full_default)

    from diffalign.core.models import load_pipeline
    from diffalign.core.report import write_json

    quick = args.quick
    out = Path(args.out)
    run_dir = Path(args.run_dir or out.with_suffix("").as_posix() + "_search")
    cfg = EcadRecipe.model_validate(
        {
            "run_dir": str(run_dir),
            "model": {"source": args.model},
            "sampling": {
                "num_inference_steps": 8 if quick else args.steps,
                "guidance_scale": args.guidance,
                "height": args.size,
                "width": args.size,
                "batch_size": 16,
            },
            "calibration": {
                "num_prompts": pick(args.calibration_prompts, 8, 40),
                "num_seeds": pick(args.calibration_seeds, 1, 2),
            },
            "quality": {"reward": args.reward},
            "search": {
                "population_size": pick(args.population, 8, 24),
                "generations": pick(args.generations, 3, 20),
                "seed": 0,
            },
        }
    )
    pipe = load_pipeline(args.model)
    pipe.transformer.eval()
    reward = load_reward(args.reward)

    t0 = time.perf_counter()
    result = run_search(cfg, pipe=pipe, reward=reward)
    search_s = time.perf_counter() - t0
    front = result.front_schedules()

    prompts, seeds = _heldout(cfg, pick(args.heldout_prompts, 8, 100), pick(args.heldout_seeds, 2, 4))
    repeats = 2 if quick else 5
    tname = type(pipe.transformer).__name__
    steps = cfg.sampling.num_inference_steps

    def score(images):
        scores = []
        for i in range(0, len(prompts), 32):
            from .search import _score

            scores.append(_score(reward, images[i : i + 32], prompts[i : i + 32]))
        return float(torch.cat(scores).mean())

    base = _measure(pipe, prompts, seeds, cfg, repeats, tname, False)
    rows: list[dict[str, Any]] = []

    def row(name: str, m: dict[str, Any], extra: dict | None = None):
        r = {
            "method": name,
            "reward": score(m["images"]),
            "fid_vs_no_cache": _fid(m["images"], base["images"]),
            "flop_ratio": m["flops"] / base["flops"] if base["flops"] else None,
            "wall_ratio": m["wall_s"] / base["wall_s"],
            **(extra or {}),
        }
        rows.append(r)
        print(json.dumps(r))
        return r

    row("no_cache", base)
    for name, sched in [("ecad_hooks_all_recompute", no_cache(pipe.transformer, steps))] + [
        (f"fora_every_{n}", fora(pipe.transformer, steps, n)) for n in (2, 3, 4)
    ]:
        apply_schedule(pipe, sched)
        try:
            row(name, _measure(pipe, prompts, seeds, cfg, repeats, tname, False))
        finally:
            remove_schedule(pipe)

    def ecad_at(ratio: float) -> Schedule | None:
        ok = [s for s in front if s.metadata["flop_ratio"] <= ratio + 1e-9]
        return max(ok, key=lambda s: s.metadata["reward"]) if ok else None

    targets = {r["method"]: r["flop_ratio"] for r in rows if r["method"].startswith("fora")}
    builtins = [
        "first_block_cache@0.05",
        "first_block_cache@0.2",
        "pyramid_attention_broadcast@2",
        "faster_cache@2",
        "taylorseer@2",
        "taylorseer@4",
    ]
    original = pipe.transformer
    for name in builtins:
        pipe.transformer = copy.deepcopy(original)
        tracker = _TimestepTracker(pipe.transformer)
        try:
            _builtin(name, pipe.transformer, tracker)
            targets[name] = row(name, _measure(pipe, prompts, seeds, cfg, repeats, tname, True))["flop_ratio"]
        except Exception as err:  # report, do not hide, a built-in that cannot run on this model
            rows.append({"method": name, "error": f"{type(err).__name__}: {err}"})
            print(json.dumps(rows[-1]))
        finally:
            pipe.transformer = original
    for base_name, ratio in targets.items():
        if ratio is None:
            continue
        s = ecad_at(ratio)
        if s is None:
            rows.append(
                {"method": f"ecad@{base_name}", "error": f"no front schedule at flop ratio <= {ratio:.3f}"}
            )
            continue
        apply_schedule(pipe, s)
        try:
            row(
                f"ecad@{base_name}",
                _measure(pipe, prompts, seeds, cfg, repeats, tname, False),
                {"matched_to": base_name, "schedule": s.name, "calibration_reward": s.metadata["reward"]},
            )
        finally:
            remove_schedule(pipe)

    report = {
        "package": "diffalign-ecad",
        "model": args.model,
        "reward": args.reward,
        "quick": quick,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "search": {
            "wall_time_s": search_s,
            "evaluations": int(len(result.X)),
            "front_size": len(front),
            "population": cfg.search.population_size,
            "generations": cfg.search.generations,
            "calibration_images": len(calibration_set(cfg.calibration)[0]),
            "run_dir": str(run_dir),
        },
        "heldout": {"prompts": len(set(prompts)), "images": len(prompts), "seed_offset": 1000},
        "steps": steps,
        "rows": rows,
    }
    write_json(report, out)
    return report


if __name__ == "__main__":
    main()
