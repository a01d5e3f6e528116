"""SELMA benchmark on the shapes world (DESIGN section 6).

``python -m diffalign.selma.bench --out bench/results/selma.json --model shapes/unet-web --seeds 0 1 2`` (the defaults)

On core's held-out prompts of every skill (``diffalign.core.shapes.evaluate``: 25 per skill by default,
one noise generator per prompt), with the same prompts and noise for every model, for each training seed:

- the base model (evaluated once: it does not depend on the training seed);
- each single-skill expert, trained on the base's own images (the shapes recipes' settings: images at
  CFG 2, the teacher's loss weighting, 10% caption dropout);
- the merged experts: exact weight-update average (SELMA), optionally TIES and DARE (``--merges``);
- one LoRA trained on all skills' data mixed (the experts' total step budget), at full strength and at
  the merge's update norm (``mixed:matched:<method>``, the fair comparison);
- weak-to-strong (``--weak-seeds``): the base's experts trained on images from a weaker generator
  (``--weak-model``, else the base itself at ``--weak-steps`` sampling steps), merged by averaging.

A seed changes the training: the prompts drawn, the images' noise, the batches, the timesteps and the
LoRA initialisation. The evaluation prompts and noise stay fixed.

It writes per-seed rows, the differences to the base (mean and per skill) and to the mixed LoRA per seed
with their mean, standard deviation and range over seeds, and the issue's targets (merged >= base + 3
mean points, >= the mixed LoRA at matched size, no skill more than 1 point below base), met or not.
Every stage resumes: images, checkpoints and each evaluated model are kept under ``--run-dir``, and the
JSON is rewritten (``"complete": false``) after every model.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

from diffalign.selma.config import SelmaConfig

MERGES = ("linear", "ties", "dare_linear")


def training_seeds(seeds: list[int] | None, seed: int | None, quick: bool) -> list[int]:
    """``--seeds`` (repeats dropped), else ``--seed``, else 0 1 2 (quick: 0)."""
    if seeds:
        return list(dict.fromkeys(seeds))
    if seed is not None:
        return [seed]
    return [0] if quick else [0, 1, 2]


def bench_config(
    args, run_dir: Path, seed: int | None = None, weak: bool = False, model: str | None = None
) -> SelmaConfig:
    from diffalign.core.shapes.evaluate import EVAL_PROMPTS_PER_SKILL

    quick = args.quick
    images = {
        "num_inference_steps": args.weak_steps if weak else args.sample_steps,
        "guidance_scale": getattr(args, "data_guidance", 2.0),
        "batch_size": 32,
        "images_per_prompt": args.images_per_prompt or (2 if quick else 8),
    }
    if weak and args.weak_model:
        images = {**images, "generator": args.weak_model, "num_inference_steps": args.sample_steps}
    if getattr(args, "reward_filter", None) is not None:
        # DreamSync-style extension (not in SELMA): keep only generated images the reward accepts
        images["reward_filter"] = {
            "enabled": True,
            "reward": "shapes-faithfulness",
            "threshold": args.reward_filter,
        }
    rank = args.rank or (8 if quick else 16)
    return SelmaConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": (args.seed or 0) if seed is None else seed,
            "model": model or args.model,
            "skills": [{"name": s, "max_words": 16} for s in args.skills],
            # at Rouge-L 0.8 the grammar has ~29 distinct 'object' prompts: more data comes from images per prompt
            "prompts": {
                "backend": "template",
                "n_per_skill": args.prompts_per_skill or 24,
                "rouge_threshold": 0.8,
            },
            "images": images,
            "train": {
                "rank": rank,
                "alpha": rank,
                "lr": 3e-4,
                "batch_size": 16,
                "steps": args.train_steps or (40 if quick else 300),
                "checkpoint_every": 50,
                "random_flip": False,
                "center_crop": True,
                "loss_weighting": getattr(args, "loss_weighting", "teacher"),
                "caption_dropout": 0.1,
            },
            "merge": {"method": "linear", "density": 0.5, "export": "lora"},
            "eval": {
                "n_per_skill": args.eval_per_skill or (12 if quick else EVAL_PROMPTS_PER_SKILL),
                "faithfulness": args.faithfulness,
                "rewards": list(args.reward or []),
                "num_inference_steps": args.sample_steps,
                "guidance_scale": args.guidance,
                "batch_size": 50,
                "save_grids": True,
            },
        }
    )


def _mean_f(res: dict | None) -> float | None:
    f = None if res is None else res.get("faithfulness")
    return None if f is None else 100 * f["skill_mean"]


def _targets(results: dict, skills: list[str], merged_key: str) -> dict:
    """The issue's targets on one seed's results (``base``, ``merged:<m>``, ``mixed``, ``mixed:matched:<m>``)."""
    base, merged, mixed = results.get("base"), results.get(merged_key), results.get("mixed")
    method = merged_key.split(":", 1)[1] if ":" in merged_key else "linear"
    matched = results.get(f"mixed:matched:{method}")
    if not base or not merged or "faithfulness" not in base:
        return {"available": False}
    drops = {
        s: 100 * (merged["faithfulness"]["per_skill"][s] - base["faithfulness"]["per_skill"][s])
        for s in skills
    }
    out = {
        "available": True,
        "merged": merged_key,
        "merged_minus_base_mean_points": _mean_f(merged) - _mean_f(base),
        "merged_ge_base_plus_3": _mean_f(merged) >= _mean_f(base) + 3,
        "per_skill_change_points": drops,
        "no_skill_more_than_1_below_base": min(drops.values()) >= -1,
    }
    if mixed:
        out["merged_minus_mixed_mean_points"] = _mean_f(merged) - _mean_f(mixed)
        out["merged_ge_mixed"] = _mean_f(merged) >= _mean_f(mixed)
    if matched:
        # the fair comparison: the mixed LoRA's update scaled to the merge's Frobenius norm (global scale)
        out["mixed_matched"] = f"mixed:matched:{method}"
        out["merged_minus_mixed_matched_mean_points"] = _mean_f(merged) - _mean_f(matched)
        out["merged_ge_mixed_matched"] = _mean_f(merged) >= _mean_f(matched)
    return out


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n_seeds": len(values),
    }


def _points(res: dict | None, skill: str | None) -> float | None:
    if res is None or "faithfulness" not in res:
        return None
    f = res["faithfulness"]
    return 100 * (f["skill_mean"] if skill is None else f["per_skill"][skill])


def seed_differences(
    base: dict, per_seed: dict[int, dict], skills: list[str], merged_key: str = "merged:linear"
) -> dict:
    """Differences in faithfulness points, one row each: ``<merged> - base`` on the mean and on every skill,
    and ``<merged> - <mixed>`` for the mixed LoRA at full strength and at matched size; each row holds
    the per-seed values (``seed_<s>``) and their :func:`spread`. Seeds missing a model are left out."""
    method = merged_key.split(":", 1)[1]
    pairs = [(f"{merged_key} - base (mean)", merged_key, "base", None)]
    pairs += [(f"{merged_key} - base ({s})", merged_key, "base", s) for s in skills]
    pairs += [
        (f"{merged_key} - mixed:matched:{method} (mean)", merged_key, f"mixed:matched:{method}", None),
        (f"{merged_key} - mixed (mean)", merged_key, "mixed", None),
    ]
    out = {}
    for name, a, b, skill in pairs:
        values = {}
        for seed, res in sorted(per_seed.items()):
            pa = _points(res.get(a), skill)
            pb = _points(base if b == "base" else res.get(b), skill)
            if pa is not None and pb is not None:
                values[seed] = pa - pb
        if values:
            out[name] = {**spread(list(values.values())), **{f"seed_{s}": v for s, v in values.items()}}
    return out


def aggregate_targets(base: dict, per_seed: dict[int, dict], skills: list[str], merged_key: str) -> dict:
    """The issue's targets judged on the mean over seeds, and whether every seed meets them."""
    per = {s: _targets({"base": base, **res}, skills, merged_key) for s, res in sorted(per_seed.items())}
    per = {s: t for s, t in per.items() if t.get("available")}
    if not per:
        return {"available": False}
    mean = statistics.fmean
    gain = mean(t["merged_minus_base_mean_points"] for t in per.values())
    skill_change = {k: mean(t["per_skill_change_points"][k] for t in per.values()) for k in skills}
    out = {
        "available": True,
        "merged": merged_key,
        "seeds": ",".join(str(s) for s in per),
        "merged_minus_base_mean_points": gain,
        "merged_ge_base_plus_3": gain >= 3,
        "merged_ge_base_plus_3_every_seed": all(t["merged_ge_base_plus_3"] for t in per.values()),
        "worst_skill_change_points": min(skill_change.values()),
        "no_skill_more_than_1_below_base": min(skill_change.values()) >= -1,
        "no_skill_more_than_1_below_base_every_seed": all(
            t["no_skill_more_than_1_below_base"] for t in per.values()
        ),
        **{f"change_points_{k}": v for k, v in skill_change.items()},
    }
    matched = [t for t in per.values() if "merged_minus_mixed_matched_mean_points" in t]
    if matched:
        d = mean(t["merged_minus_mixed_matched_mean_points"] for t in matched)
        out["merged_minus_mixed_matched_mean_points"] = d
        out["merged_ge_mixed_matched"] = d >= 0
        out["merged_ge_mixed_matched_every_seed"] = all(t["merged_ge_mixed_matched"] for t in matched)
    full = [t for t in per.values() if "merged_minus_mixed_mean_points" in t]
    if full:
        out["merged_minus_mixed_mean_points"] = mean(t["merged_minus_mixed_mean_points"] for t in full)
    return out


def result_rows(base: dict | None, per_seed: dict[int, dict], skills: list[str], prefix: str = "") -> list:
    """One row per (model, seed): mean and per-skill faithfulness points, and FID when measured."""
    rows = []

    def row(model, seed, res):
        r = {"model": prefix + model, "seed": seed}
        if "faithfulness" in res:
            r["mean"] = _points(res, None)
            r.update({s: _points(res, s) for s in skills})
        if "fid" in res:
            r["fid"] = res["fid"]
        for name, rew in res.get("rewards", {}).items():
            r[name] = rew.get("mean")
        return r

    if base is not None:
        rows.append(row("base", "-", base))
    models = []
    for res in per_seed.values():
        models += [m for m in res if m not in models]
    for m in models:
        for seed, res in sorted(per_seed.items()):
            if m in res:
                rows.append(row(m, seed, res[m]))
    return rows


class Cache:
    """Evaluated models of one run directory, kept with the settings they were made with; a change of
    settings starts the cache afresh (the model files themselves resume or refuse in their stages)."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings
        self.data = {"settings": settings, "results": {}, "timings": {}}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("settings") == settings:
                self.data = old

    @property
    def results(self) -> dict:
        return self.data["results"]

    def put(self, name: str, res: dict) -> None:
        self.results[name] = res
        self.save()

    def add_time(self, phase: str, wall: float, cpu: float) -> None:
        t = self.data["timings"].setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0})
        t["wall_s"] += wall
        t["cpu_s"] += cpu
        self.save()

    def save(self) -> None:
        from diffalign.core.report import write_json

        write_json(self.data, self.path)


class _Clock:
    def __init__(self, cache: Cache, phase: str):
        self.cache, self.phase = cache, phase

    def __enter__(self):
        self.w, self.c = time.time(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.cache.add_time(self.phase, time.time() - self.w, time.process_time() - self.c)


def _slug(model: str) -> str:
    """A folder name for a model: a local folder's own name, else the id with '/' as '-'."""
    name = Path(model).name if Path(model).is_dir() else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def training_data_points(folder: Path, skills: list[str], faithfulness_fn) -> dict:
    """Faithfulness points of the generated training images per skill and their mean over skills: what an
    expert trained on them can learn at best, beside the base's score on the held-out prompts."""
    from PIL import Image

    from diffalign.selma.images import read_imagefolder, to_pixels

    out = {}
    for skill in skills:
        recs = read_imagefolder(folder, [skill])
        images = to_pixels([Image.open(r["path"]) for r in recs])
        out[skill] = 100 * float(faithfulness_fn(images, [r["text"] for r in recs]).overall)
    out["mean"] = statistics.fmean(out[s] for s in skills)
    return out


def _data_quality(cfg, cache: Cache, faithfulness_fn) -> None:
    if faithfulness_fn is None or "training_data_points" in cache.data:
        return
    skills = [s.name for s in cfg.skills]
    cache.data["training_data_points"] = training_data_points(cfg.path("images"), skills, faithfulness_fn)
    cache.save()


def _eval_missing(cfg, cache: Cache, models: list[str], fid_fn, log) -> None:
    from diffalign.selma.stages import stage_eval

    for m in models:
        if m in cache.results:
            continue
        with _Clock(cache, "eval"):
            res = stage_eval(cfg, models=[m], fid_fn=fid_fn, log=log)[m]
        cache.put(m, res)


def _train_seed(cfg, cache: Cache, mixed: bool, log) -> None:
    from diffalign.selma.stages import stage_images, stage_prompts, stage_train

    with _Clock(cache, "data"):
        stage_prompts(cfg, log)
        stage_images(cfg, log=log)
    with _Clock(cache, "train"):
        stage_train(cfg, mixed=mixed, log=log)


def main(argv: list[str] | None = None) -> dict:
    from diffalign.core.report import write_json
    from diffalign.core.shapes.evaluate import protocol
    from diffalign.selma.evaluate import shapes_faithfulness_fn, shapes_fid_fn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/selma.json")
    ap.add_argument("--quick", action="store_true", help="small budgets (minutes)")
    ap.add_argument("--model", default="shapes/unet-web", help="base model id or folder")
    ap.add_argument("--run-dir", default="bench/tmp/selma")
    ap.add_argument("--seed", type=int, default=None, help="one training seed (same as --seeds N)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; quick: 0)"
    )
    ap.add_argument("--skills", nargs="+", default=["object", "count", "color", "spatial"])
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG of the evaluation samples")
    ap.add_argument(
        "--data-guidance", type=float, default=2.0, help="CFG of the self-generated training images"
    )
    ap.add_argument(
        "--merges", nargs="+", choices=MERGES, default=["linear"], help="merge methods to evaluate"
    )
    ap.add_argument("--no-mixed", action="store_true", help="skip the mixed-data LoRA (4x an expert's cost)")
    ap.add_argument("--weak-steps", type=int, default=4, help="sampling steps of the weak generator")
    ap.add_argument("--weak-model", default=None, help="a weaker model id (else: the base at --weak-steps)")
    ap.add_argument(
        "--weak-seeds",
        type=int,
        nargs="*",
        default=None,
        help="weak-to-strong seeds (default: the first seed)",
    )
    ap.add_argument("--no-weak", action="store_true", help="skip the weak-to-strong comparison")
    ap.add_argument("--faithfulness", choices=["shapes", "none"], default="shapes")
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--reward", action="append", help="also score with this registered reward")
    ap.add_argument("--prompts-per-skill", type=int, default=None)
    ap.add_argument("--images-per-prompt", type=int, default=None)
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (alpha = rank); default 16, quick 8")
    ap.add_argument(
        "--train-steps", type=int, default=None, help="steps per expert (the mixed LoRA gets their sum)"
    )
    ap.add_argument(
        "--loss-weighting",
        choices=["teacher", "none"],
        default="teacher",
        help="the shapes teachers' weighting (v-prediction models) or the paper's plain MSE",
    )
    ap.add_argument("--eval-per-skill", type=int, default=None, help="default 25 (core's count); quick 12")
    ap.add_argument(
        "--reward-filter",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="keep only generated training images whose shapes-faithfulness is >= THRESHOLD (an extension)",
    )
    args = ap.parse_args(argv)
    seeds = training_seeds(args.seeds, args.seed, args.quick)
    weak_seeds = [] if args.no_weak else (seeds[:1] if args.weak_seeds is None else args.weak_seeds)

    t0, c0 = time.time(), time.process_time()
    run = Path(args.run_dir) / _slug(args.model) / ("quick" if args.quick else "full")
    fid_fn = None if (args.no_fid or args.faithfulness == "none") else shapes_fid_fn()
    faith_fn = shapes_faithfulness_fn() if args.faithfulness == "shapes" else None
    log = print
    method0 = args.merges[0]
    models = [f"expert:{s}" for s in args.skills] + [f"merged:{m}" for m in args.merges]
    if not args.no_mixed:
        models += ["mixed"] + [f"mixed:matched:{m}" for m in args.merges]

    cfgs = {s: bench_config(args, run / f"self-s{s}", seed=s) for s in seeds}
    wcfgs = {s: bench_config(args, run / f"weak-s{s}", seed=s, weak=True) for s in weak_seeds}
    first = cfgs[seeds[0]]
    base_cache = Cache(
        run / "base-eval.json", {"model": args.model, "eval": first.eval.model_dump(mode="json")}
    )
    caches = {
        s: Cache(cfg.path("bench-results.json"), cfg.model_dump(mode="json")) for s, cfg in cfgs.items()
    }
    wcaches = {
        s: Cache(cfg.path("bench-results.json"), cfg.model_dump(mode="json")) for s, cfg in wcfgs.items()
    }

    def report(complete: bool) -> dict:
        base = base_cache.results.get("base")
        per_seed = {s: c.results for s, c in caches.items()}
        weak = {s: c.results for s, c in wcaches.items()}
        rows = result_rows(base, per_seed, args.skills)
        rows += result_rows(None, weak, args.skills, prefix="weak-to-strong ")
        timings: dict = {}
        for c in [base_cache, *caches.values(), *wcaches.values()]:
            for phase, t in c.data["timings"].items():
                acc = timings.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0})
                acc["wall_s"] += t["wall_s"]
                acc["cpu_s"] += t["cpu_s"]
        out = {
            "package": "diffalign-selma",
            "model": args.model,
            "complete": complete,
            "quick": args.quick,
            "seeds": ",".join(map(str, seeds)),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "processor": platform.processor(),
            },
            "settings": first.model_dump(mode="json"),
            "evaluation": protocol(
                first.eval.n_per_skill,
                args.skills,
                prompt_seed=first.eval.prompt_seed,
                noise_seed=first.eval.seed,
            ),
            "baseline": "base",
            "rows": rows,
            "differences_points": seed_differences(base, per_seed, args.skills, f"merged:{method0}")
            if base
            else {},
            "targets": aggregate_targets(base, per_seed, args.skills, f"merged:{method0}")
            if base
            else {"available": False},
            "targets_per_seed": {
                f"seed_{s}": _flat_targets(_targets({"base": base, **res}, args.skills, f"merged:{method0}"))
                for s, res in per_seed.items()
                if base
            },
            "training_data_points": {
                **{
                    f"seed_{s}": c.data["training_data_points"]
                    for s, c in caches.items()
                    if "training_data_points" in c.data
                },
                **{
                    f"weak seed_{s}": c.data["training_data_points"]
                    for s, c in wcaches.items()
                    if "training_data_points" in c.data
                },
            },
            "weak_to_strong": _weak_summary(args, base, per_seed, weak, method0),
            "timings_s": {
                **timings,
                "note": "summed over the resumed invocations that ran each phase; wall time on a shared machine",
            },
        }
        for m in args.merges[1:]:
            out[f"targets_{m}"] = (
                aggregate_targets(base, per_seed, args.skills, f"merged:{m}") if base else {}
            )
        write_json(out, args.out)
        return out

    # the headline first: base, then each seed's experts, merge and mixed LoRA; weak-to-strong last
    _eval_missing(first, base_cache, ["base"], fid_fn, log)
    for s in seeds:
        _train_seed(cfgs[s], caches[s], mixed=not args.no_mixed, log=log)
        _data_quality(cfgs[s], caches[s], faith_fn)
        _eval_missing(cfgs[s], caches[s], models, fid_fn, log)
        report(complete=False)
    for s in weak_seeds:
        _train_seed(wcfgs[s], wcaches[s], mixed=False, log=log)
        _data_quality(wcfgs[s], wcaches[s], faith_fn)
        _eval_missing(wcfgs[s], wcaches[s], [f"merged:{method0}"], fid_fn, log)
        report(complete=False)
    out = report(complete=True)
    out["timings_s"]["this_invocation"] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    write_json(out, args.out)
    print(f"[selma-bench] wrote {args.out}")
    return out


def _flat_targets(t: dict) -> dict:
    """Per-seed targets with the per-skill changes as ``change_points_<skill>`` columns."""
    out = {k: v for k, v in t.items() if k != "per_skill_change_points"}
    out.update({f"change_points_{k}": v for k, v in t.get("per_skill_change_points", {}).items()})
    return out


def _weak_summary(args, base, per_seed, weak, method) -> dict | None:
    if not weak:
        return None
    key = f"merged:{method}"
    out = {
        "generator": args.weak_model or f"{args.model} at {args.weak_steps} sampling steps",
        "trains": f"{args.model}'s experts, merged by {method}",
    }
    for s, res in sorted(weak.items()):
        w, own, b = _mean_f(res.get(key)), _mean_f(per_seed.get(s, {}).get(key)), _mean_f(base)
        out[f"seed_{s}_weak_merged_mean_points"] = w
        if own is not None:
            out[f"seed_{s}_self_merged_mean_points"] = own
        if w is not None and b is not None:
            out[f"seed_{s}_weak_minus_base_points"] = w - b
        if w is not None and own is not None:
            out[f"seed_{s}_weak_minus_self_points"] = w - own
    return out


if __name__ == "__main__":
    main()
