"""Benchmark: MLCM student vs teacher DDIM vs a single-segment LCM student trained with the same budget.

``python -m diffalign.mlcm.bench --out bench/results/mlcm.json [--quick] [--model shapes/unet]``

On core's held-out shapes prompts and noise (``diffalign.core.shapes.evaluate``) it reports, for every sampler configuration, faithfulness (DSG-style, from
``diffalign.core.shapes.faithfulness``), FID on the verifier's features, seconds per image, and the
training wall time of each student. It also reports the 2-D Gaussian-mixture toy (energy distances).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from .config import MLCMRecipe

TEACHER_STEPS = (2, 4, 8, 25, 50)
STUDENT_STEPS = (2, 4, 8)


def shapes_recipe(
    model: str,
    run_dir: Path,
    quick: bool,
    single_segment: bool = False,
    iterations: tuple[int | None, int | None] = (None, None),
) -> MLCMRecipe:
    """The shapes recipe (recipes/shapes_unet.yaml) without reward learning, so both students get the same
    budget. ``single_segment`` turns it into the LCM baseline: one segment (any t -> x0), all iterations
    in stage 1."""
    s1, s2 = (60, 20) if quick else (600, 150)
    s1, s2 = iterations[0] or s1, iterations[1] if iterations[1] is not None else s2
    data = {
        "run_dir": str(run_dir),
        "seed": 0,
        "model": {"source": model},
        "student": {"mode": "lora", "lora_rank": 16},
        "data": {"shapes_prompts_per_skill": 50 if quick else 500},
        "distill": {"guidance_scale": 4.0, "batch_size": 8 if quick else 16},
        "stage1": {"iterations": s1, "num_segments": 8},
        "stage2": {"iterations": s2},
        "checkpoint": {"every": 100},
        "log_every": 10,
    }
    if single_segment:
        data["stage1"] = {"iterations": s1 + s2, "num_segments": 1}
        data["stage2"] = {"iterations": 0}
    return MLCMRecipe.model_validate(data)


def evaluate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, resolution: int) -> dict:
    """One row on core's evaluation path (``diffalign.core.shapes.evaluate``): one noise generator per
    prompt, DSG faithfulness and verifier-feature FID."""
    from diffalign.core.shapes.evaluate import evaluate_sampler, pipeline_sampler

    sampler = pipeline_sampler(pipe, steps, guidance, height=resolution, width=resolution)
    row, _ = evaluate_sampler(sampler, prompts, seed=seed)
    return {
        "steps": steps,
        "faithfulness": float(row["overall"]),
        "per_skill": {k: float(v) for k, v in row["per_skill"].items()},
        "fid": float(row["fid"]),
        "seconds_per_image": row["seconds_per_image"],
        "cpu_seconds": row["cpu_seconds"],
    }


def toy_benchmark(quick: bool) -> dict:
    from . import toy
    from .schedule import sampling_timesteps

    setup = toy.make_toy()
    ref = toy.reference_samples(setup)
    out = {"teacher_ddim": {k: toy.energy_distance(toy.teacher_samples(setup, k), ref) for k in (2, 4, 8)}}
    student = toy.ResidualStudent(setup.teacher, setup.schedule)
    it1, it2 = (300, 150) if quick else (1000, 500)
    toy.train_stage1(setup, student, num_segments=4, iterations=it1)

    def ed(k, sampler):
        return toy.energy_distance(
            toy.sample_student(setup, student, sampling_timesteps(k, 4), sampler, 2000, 5), ref
        )

    def ed_per_class(k, sampler):
        return toy.per_class_energy_distance(
            toy.sample_student(setup, student, sampling_timesteps(k, 4), sampler, 2000, 5), ref
        )

    runs = [(s, k) for s in ("deterministic", "renoise") for k in (2, 4)]
    out["stage1"] = {f"{s}_{k}": ed(k, s) for s, k in runs}
    out["stage1_per_class"] = {f"{s}_{k}": ed_per_class(k, s) for s, k in runs}
    toy.train_stage2(setup, student, num_segments=4, iterations=it2)
    out["stage2"] = {f"{s}_{k}": ed(k, s) for s, k in runs}
    out["stage2_per_class"] = {f"{s}_{k}": ed_per_class(k, s) for s, k in runs}
    out["iterations"] = {"stage1": it1, "stage2": it2}
    return out


def run(args) -> dict:
    from diffusers import DDIMScheduler

    from diffalign.core.models import load_pipeline
    from diffalign.core.report import write_json
    from diffalign.core.shapes.evaluate import heldout_prompts, protocol

    from .inference import apply_student
    from .train import train

    torch.manual_seed(args.seed)
    work = Path(args.run_dir)
    n = 5 if args.quick else args.prompts_per_skill
    prompts = heldout_prompts(n)
    report: dict = {
        "package": "diffalign-mlcm",
        "model": args.model,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "seed": args.seed,
        "quick": args.quick,
        "n_prompts": len(prompts),
        "prompt_split": "heldout",
        "evaluation": protocol(n, noise_seed=args.seed),
        "results": [],
        "training": {},
    }
    base = load_pipeline(args.model)
    resolution = base.vae_scale_factor * int(
        (getattr(base, "unet", None) or base.transformer).config.sample_size
    )
    guidance = 4.0

    # teacher DDIM baselines
    teacher = load_pipeline(args.model)
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    for steps in TEACHER_STEPS:
        row = evaluate(teacher, prompts, steps, guidance, args.seed, resolution)
        report["results"].append({"method": "teacher-ddim", "sampler": "ddim", "guidance": guidance, **row})
        print(report["results"][-1])

    students = {}
    for name, single in (("mlcm", False), ("lcm-single-segment", True)):
        cfg = shapes_recipe(
            args.model,
            work / name,
            args.quick,
            single_segment=single,
            iterations=(args.stage1_iterations, args.stage2_iterations),
        )
        result = train(cfg, pipe=load_pipeline(args.model))
        students[name] = result.student_dir
        report["training"][name] = {
            "iterations": result.steps,
            "wall_time_s": result.wall_time_s,
            "num_segments": cfg.stage1.num_segments,
            "final_loss": result.losses[-1]["loss"] if result.losses else None,
        }
    for name, student_dir in students.items():
        for sampler in ("renoise", "deterministic"):
            pipe = apply_student(load_pipeline(args.model), student_dir, sampler=sampler)
            for steps in STUDENT_STEPS:
                row = evaluate(pipe, prompts, steps, 0.0, args.seed, resolution)
                report["results"].append({"method": name, "sampler": sampler, "guidance": 0.0, **row})
                print(report["results"][-1])

    def get(method, steps, sampler):
        for r in report["results"]:
            if r["method"] == method and r["steps"] == steps and r["sampler"] == sampler:
                return r["faithfulness"]
        return None

    t50 = get("teacher-ddim", 50, "ddim")
    best = {k: max(get("mlcm", k, s) for s in ("renoise", "deterministic")) for k in STUDENT_STEPS}
    lcm = {
        k: max(get("lcm-single-segment", k, s) for s in ("renoise", "deterministic")) for k in STUDENT_STEPS
    }
    report["targets"] = {
        "student4_over_teacher50": best[4] / t50 if t50 else None,
        "student4_target": 0.95,
        "student2_over_teacher50": best[2] / t50 if t50 else None,
        "student2_target": 0.85,
        "beats_lcm_at_2": best[2] > lcm[2],
        "beats_lcm_at_4": best[4] > lcm[4],
    }
    if not args.skip_toy:
        report["toy_gmm_energy_distance"] = toy_benchmark(args.quick)
    write_json(report, args.out)
    return report


def main(argv=None) -> None:
    from diffalign.core.shapes.evaluate import EVAL_PROMPTS_PER_SKILL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/mlcm.json")
    parser.add_argument(
        "--model", default="shapes/unet", help="Teacher id or folder (shapes/unet, shapes/dit, ...)"
    )
    parser.add_argument("--quick", action="store_true", help="Few iterations and prompts (a smoke run)")
    parser.add_argument(
        "--prompts-per-skill", type=int, default=EVAL_PROMPTS_PER_SKILL, help="held-out prompts per skill"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="bench/tmp/mlcm")
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--stage1-iterations", type=int, default=None, help="default 600 (quick 60)")
    parser.add_argument("--stage2-iterations", type=int, default=None, help="default 150 (quick 20)")
    args = parser.parse_args(argv)
    report = run(args)
    print({k: v for k, v in report.items() if k in ("training", "targets")})


if __name__ == "__main__":
    main()
