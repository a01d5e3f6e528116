"""What holds the 2-step MLCM student back on the shapes world: one measured row per hypothesis.

``python -m diffalign.mlcm.study --out bench/results/mlcm-hypotheses.json --run-dir bench/tmp/mlcm-study``

Every student starts from one shared stage-1 run (the benchmark's MLCM recipe, seed 0) and differs from
the benchmark's MLCM student in one thing; students that continue another are resumed from its last
checkpoint, which retraces an uninterrupted run (per-iteration generators are seeded by the step). Each is
evaluated on core's held-out prompts and noise at 2 and 4 steps with both samplers, next to the
single-segment LCM student of the same budget. The hypotheses:

* ``a`` which timesteps the 2 steps land on (sampler only: ``[999, t]`` for every milestone ``t``), and a
  stage 2 run on the 2-segment grid [999, 499, 0] that the 2-step sampler uses;
* ``b`` stage-2 length and learning rate (0, 60, 150, 300 iterations at lr 1e-5; 60 and 150 at 1e-4),
  and the 2-segment stage 2 at lr 1e-4 (60, 150 iterations);
* ``c`` the reward phase (the recipe's ``shapes-reward`` hinge) after the 2-segment stage 2;
* ``d`` the guidance the student bakes in: sampling the students with extra CFG, and the 2-segment stage 2
  with the teacher at w = 2 instead of 4 (stage 1 and the LCM baseline use 4).

Rows are written after every student, so an interrupted study resumes where it stopped (students already
trained are reused from ``--run-dir``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bench import evaluate, shapes_recipe

STAGE1_ITERATIONS = 200  # the benchmark's stage-1 budget


@dataclass
class Variant:
    name: str
    hypothesis: str
    what: str
    stage2: int  # stage-2 iterations (stage 1 is always STAGE1_ITERATIONS)
    parent: str | None = None  # resumed from this variant's final checkpoint
    overrides: dict = field(default_factory=dict)
    single_segment: bool = False


REWARD = {
    "name": "shapes-reward",
    "iterations": 50,
    "lr": 1e-5,
    "loss": "hinge",
    "margin": 1.0,
    "consistency_weight": 1.0,
}

VARIANTS = [
    Variant("stage1-only", "b", "stage 1 only (200), no stage 2", 0),
    Variant(
        "s2-60",
        "base",
        "stage 2 60 it at lr 1e-5 (the benchmark's MLCM before this study)",
        60,
        "stage1-only",
    ),
    Variant("s2-150", "b", "stage 2 150 it at lr 1e-5", 150, "s2-60"),
    Variant("s2-300", "b", "stage 2 300 it at lr 1e-5", 300, "s2-150"),
    Variant("s2-60-lr1e-4", "b", "stage 2 60 it at lr 1e-4", 60, "stage1-only", {"stage2": {"lr": 1e-4}}),
    Variant("s2-150-lr1e-4", "b", "stage 2 150 it at lr 1e-4", 150, "s2-60-lr1e-4", {"stage2": {"lr": 1e-4}}),
    Variant(
        "s2-60-2seg",
        "a",
        "stage 2 60 it on the 2-segment grid [999, 499, 0] (q=2)",
        60,
        "stage1-only",
        {"stage2": {"num_segments": 2, "sample_steps": 2}},
    ),
    Variant(
        "s2-60-2seg-lr1e-4",
        "a",
        "stage 2 60 it on the 2-segment grid at lr 1e-4",
        60,
        "stage1-only",
        {"stage2": {"num_segments": 2, "sample_steps": 2, "lr": 1e-4}},
    ),
    Variant(
        "s2-150-2seg-lr1e-4",
        "a",
        "stage 2 150 it on the 2-segment grid at lr 1e-4",
        150,
        "s2-60-2seg-lr1e-4",
        {"stage2": {"num_segments": 2, "sample_steps": 2, "lr": 1e-4}},
    ),
    Variant(
        "s2-60-2seg-lr1e-4+reward-50",
        "c",
        "the 2-segment lr 1e-4 stage 2, then the recipe's reward phase (50 it, shapes-reward hinge, q=2)",
        60,
        "s2-60-2seg-lr1e-4",
        {
            "stage2": {"num_segments": 2, "sample_steps": 2, "lr": 1e-4},
            "reward": {**REWARD, "sample_steps": 2},
        },
    ),
    Variant(
        "s2-60-2seg-lr1e-4-w2",
        "d",
        "the 2-segment lr 1e-4 stage 2 with the teacher at w=2 instead of 4",
        60,
        "stage1-only",
        {"stage2": {"num_segments": 2, "sample_steps": 2, "lr": 1e-4}, "distill": {"guidance_scale": 2.0}},
    ),
    Variant(
        "lcm-260",
        "baseline",
        "single-segment LCM, 260 it (the benchmark's LCM before this study)",
        60,
        single_segment=True,
    ),
]

TWO_STEP_GRID = (749, 624, 499, 374, 249, 124)  # second timestep of a 2-step sample on the 8-segment grid
GUIDANCE_PROBE = (1.5, 2.0)  # CFG applied to the student at sampling time
SWEPT = ("stage1-only", "s2-60", "s2-150-lr1e-4", "lcm-260")  # students that get the sampler-only rows


def recipe_for(v: Variant, model: str, run_dir: Path, seed: int, stage2_base: int = 60):
    if v.single_segment:
        return shapes_recipe(model, run_dir, False, True, (STAGE1_ITERATIONS, v.stage2), seed)
    return shapes_recipe(model, run_dir, False, False, (STAGE1_ITERATIONS, v.stage2), seed, v.overrides)


def seed_from_parent(run_dir: Path, parent_dir: Path) -> None:
    """Start ``run_dir`` from the parent's last checkpoint (and its metrics log) unless it has its own."""
    own = run_dir / "checkpoints"
    if own.is_dir() and any(own.glob("step_*.pt")):
        return
    latest = sorted((parent_dir / "checkpoints").glob("step_*.pt"))
    if not latest:
        raise FileNotFoundError(f"{parent_dir} has no checkpoint to continue from")
    own.mkdir(parents=True, exist_ok=True)
    shutil.copy2(latest[-1], own / latest[-1].name)
    if (parent_dir / "metrics.jsonl").exists():
        shutil.copy2(parent_dir / "metrics.jsonl", run_dir / "metrics.jsonl")


def student_pipeline(model: str, student_dir: Path, sampler: str):
    """The student with an 8-segment ``MLCMScheduler`` (a student last trained on another grid is still
    sampled on the benchmark's timesteps)."""
    from diffalign.core.models import load_pipeline

    from .inference import apply_student
    from .scheduler import MLCMScheduler

    pipe = apply_student(load_pipeline(model), student_dir, sampler=sampler)
    pipe.scheduler = MLCMScheduler.from_config(pipe.scheduler.config, num_segments=8, sampler=sampler)
    return pipe


def main(argv=None) -> dict:
    from diffusers import DDIMScheduler

    from diffalign.core.models import load_pipeline
    from diffalign.core.report import write_json
    from diffalign.core.shapes.evaluate import EVAL_PROMPTS_PER_SKILL, heldout_prompts, protocol

    from .train import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/mlcm-hypotheses.json")
    parser.add_argument("--run-dir", default="bench/tmp/mlcm-study")
    parser.add_argument("--model", default="shapes/unet")
    parser.add_argument("--seed", type=int, default=0, help="training and evaluation-noise seed")
    parser.add_argument("--prompts-per-skill", type=int, default=EVAL_PROMPTS_PER_SKILL)
    parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all, in order)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    work = Path(args.run_dir)
    prompts = heldout_prompts(args.prompts_per_skill)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.setdefault("package", "diffalign-mlcm")
    report.update(
        {
            "study": "what holds the 2-step student back (issue: 2-step MLCM vs single-segment LCM)",
            "command": f"python -m diffalign.mlcm.study --out {args.out} --run-dir {args.run_dir}",
            "model": args.model,
            "seed": args.seed,
            "stage1_iterations": STAGE1_ITERATIONS,
            "evaluation": protocol(args.prompts_per_skill, noise_seed=args.seed),
        }
    )
    report.setdefault("variants", {})
    report.setdefault("rows", [])
    done = {(r["student"], r["sampler"], str(r["timesteps"]), r["guidance"]) for r in report["rows"]}
    base = load_pipeline(args.model)
    resolution = base.vae_scale_factor * int(base.unet.config.sample_size)

    def add_row(student, sampler, timesteps, guidance, pipe) -> None:
        key = (student, sampler, str(timesteps), guidance)
        if key in done:
            return
        row = evaluate(pipe, prompts, len(timesteps), guidance, args.seed, resolution, timesteps=timesteps)
        report["rows"].append(
            {
                "student": student,
                "hypothesis": report["variants"].get(student, {}).get("hypothesis", "teacher"),
                "sampler": sampler,
                "steps": len(timesteps),
                "timesteps": list(timesteps),
                "guidance": guidance,
                "faithfulness": round(row["faithfulness"], 4),
                "fid": round(row["fid"], 1),
            }
        )
        done.add(key)
        print(report["rows"][-1], flush=True)

    if ("teacher-ddim-50", "ddim", "None", 4.0) not in done:
        teacher = load_pipeline(args.model)
        teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
        row = evaluate(teacher, prompts, 50, 4.0, args.seed, resolution)
        report["rows"].append(
            {"student": "teacher-ddim-50", "hypothesis": "teacher", "sampler": "ddim", "steps": 50,
             "timesteps": None, "guidance": 4.0, "faithfulness": round(row["faithfulness"], 4),
             "fid": round(row["fid"], 1)}
        )  # fmt: skip
        done.add(("teacher-ddim-50", "ddim", "None", 4.0))
        write_json(report, out)

    wanted = set(args.only) if args.only is not None else None
    for v in VARIANTS:
        if wanted is not None and v.name not in wanted:
            continue
        run_dir = work / v.name
        if v.parent is not None:
            seed_from_parent(run_dir, work / v.parent)
        cfg = recipe_for(v, args.model, run_dir, args.seed)
        cpu0 = time.process_time()
        result = train(cfg, pipe=load_pipeline(args.model))
        info = report["variants"].setdefault(v.name, {})
        info.update({"hypothesis": v.hypothesis, "what": v.what, "parent": v.parent})
        info["iterations"] = result.steps
        if result.losses:  # trained (or continued) in this call; reused students keep their first record
            info["cpu_s_this_call"] = round(time.process_time() - cpu0, 1)
            info["final_loss"] = round(result.losses[-1]["loss"], 6)
        for sampler in ("deterministic", "renoise"):
            pipe = student_pipeline(args.model, result.student_dir, sampler)
            add_row(v.name, sampler, [999, 749, 499, 124], 0.0, pipe)
            add_row(v.name, sampler, [999, 499], 0.0, pipe)
            if v.name in SWEPT:
                for t in TWO_STEP_GRID:
                    add_row(v.name, sampler, [999, t], 0.0, pipe)
                for w in GUIDANCE_PROBE:
                    add_row(v.name, sampler, [999, 499], w, pipe)
        write_json(report, out)
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
