"""SELMA benchmark on the shapes world (DESIGN section 6).

``python -m diffalign.selma.bench --out bench/results/selma.json [--quick] [--model shapes/unet]``

On core's held-out prompts of every skill (``diffalign.core.shapes.evaluate``: 25 per skill by default,
one noise generator per prompt), with the same prompts and noise for every model:

- the base teacher;
- one LoRA trained on all skills' data mixed (the experts' total step budget);
- each single-skill expert;
- the merged experts: exact weight-update average (SELMA), TIES and DARE;
- weak-to-strong: experts trained on images from a weaker generator (few-step sampling of the
  same teacher, or ``--weak-model``), merged by averaging.

``--reward-filter T`` runs the same comparison on training images filtered by the shapes-faithfulness
reward (kept if >= T; DreamSync-style, an extension SELMA does not use).

It reports per-skill and mean DSG-style faithfulness and FID (verifier features), the differences to
the base model, and the issue's targets (merged >= base + 3 points mean faithfulness, >= the mixed
LoRA, no skill more than 1 point below base), whether they are met or not.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from diffalign.selma.config import SelmaConfig


def bench_config(args, run_dir: Path, weak: bool = False) -> SelmaConfig:
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
    return SelmaConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": args.seed,
            "model": args.model,
            "skills": [{"name": s, "max_words": 16} for s in args.skills],
            # at Rouge-L 0.8 the grammar has ~29 distinct 'object' prompts: more data comes from images per prompt
            "prompts": {
                "backend": "template",
                "n_per_skill": args.prompts_per_skill or 24,
                "rouge_threshold": 0.8,
            },
            "images": images,
            "train": {
                "rank": 8 if quick else 16,
                "alpha": 8 if quick else 16,
                "lr": 3e-4,
                "batch_size": 16,
                "steps": args.train_steps or (40 if quick else 300),
                "checkpoint_every": 50,
                "random_flip": False,
                "center_crop": True,
                "loss_weighting": "teacher",
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


def _mean_f(res: dict) -> float | None:
    f = res.get("faithfulness")
    return None if f is None else 100 * f["skill_mean"]


def _targets(results: dict, skills: list[str], merged_key: str) -> dict:
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


def main(argv: list[str] | None = None) -> dict:
    from diffalign.core.report import write_json
    from diffalign.core.shapes.evaluate import protocol
    from diffalign.selma.evaluate import shapes_fid_fn
    from diffalign.selma.stages import stage_eval, stage_images, stage_prompts, stage_train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/selma.json")
    ap.add_argument("--quick", action="store_true", help="small budgets (minutes)")
    ap.add_argument("--model", default="shapes/unet", help="base model id or folder")
    ap.add_argument("--run-dir", default="bench/tmp/selma")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skills", nargs="+", default=["object", "count", "color", "spatial"])
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG of the evaluation samples")
    ap.add_argument(
        "--data-guidance", type=float, default=2.0, help="CFG of the self-generated training images"
    )
    ap.add_argument("--weak-steps", type=int, default=4, help="sampling steps of the weak generator")
    ap.add_argument(
        "--weak-model", default=None, help="a weaker model id (else: the teacher at --weak-steps)"
    )
    ap.add_argument("--no-weak", action="store_true", help="skip the weak-to-strong comparison")
    ap.add_argument("--faithfulness", choices=["shapes", "none"], default="shapes")
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--reward", action="append", help="also score with this registered reward")
    ap.add_argument("--prompts-per-skill", type=int, default=None)
    ap.add_argument("--images-per-prompt", type=int, default=None)
    ap.add_argument(
        "--train-steps", type=int, default=None, help="steps per expert (the mixed LoRA gets their sum)"
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

    t0 = time.time()
    run = Path(args.run_dir) / ("quick" if args.quick else "full")
    cfg = bench_config(args, run / "self")
    fid_fn = None if (args.no_fid or args.faithfulness == "none") else shapes_fid_fn()
    log = print
    timings = {}

    t = time.time()
    stage_prompts(cfg, log)
    stage_images(cfg, log=log)
    timings["data_s"] = time.time() - t
    t = time.time()
    stage_train(cfg, mixed=True, log=log)
    timings["train_s"] = time.time() - t
    models = [
        "base",
        "mixed",
        *[f"expert:{s}" for s in args.skills],
        "merged:linear",
        "mixed:matched:linear",
        "merged:ties",
        "merged:dare_linear",
    ]
    t = time.time()
    results = stage_eval(cfg, models=models, fid_fn=fid_fn, log=log)
    timings["eval_s"] = time.time() - t

    weak_results = None
    if not args.no_weak:
        wcfg = bench_config(args, run / "weak", weak=True)
        t = time.time()
        stage_prompts(wcfg, log)
        stage_images(wcfg, log=log)
        stage_train(wcfg, log=log)
        weak_results = stage_eval(wcfg, models=["merged:linear"], fid_fn=fid_fn, log=log)
        timings["weak_to_strong_s"] = time.time() - t

    out = {
        "package": "diffalign-selma",
        "model": args.model,
        "quick": args.quick,
        "seed": args.seed,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor(),
        },
        "settings": cfg.model_dump(mode="json"),
        "evaluation": protocol(
            cfg.eval.n_per_skill, args.skills, prompt_seed=cfg.eval.prompt_seed, noise_seed=cfg.eval.seed
        ),
        "baseline": "base",
        "results": results,
        "mean_faithfulness_points": {k: _mean_f(v) for k, v in results.items()},
        "targets": _targets(results, args.skills, "merged:linear"),
        "targets_ties": _targets(results, args.skills, "merged:ties"),
        "targets_dare": _targets(results, args.skills, "merged:dare_linear"),
        "weak_to_strong": None
        if weak_results is None
        else {
            "generator": args.weak_model or f"{args.model} at {args.weak_steps} sampling steps",
            "merged_linear": weak_results["merged:linear"],
            "mean_faithfulness_points": _mean_f(weak_results["merged:linear"]),
            "self_generated_mean_faithfulness_points": _mean_f(results["merged:linear"]),
        },
        "timings_s": {**timings, "total_s": time.time() - t0},
    }
    write_json(out, args.out)
    print(f"[selma-bench] wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
