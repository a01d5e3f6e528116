"""DI* benchmark on the shapes world (held-out prompts).

Compares, on the same prompts and seeds:
  * the teacher with its own scheduler at 1 / 4 / 25 / 50 steps (CFG as the teacher is sampled);
  * the initial one-step generator (teacher weights, LCMScheduler at t*; what training starts from);
  * DI* (score divergence + reward), SIM-like (reward off) and DI++-like (KL regulariser + reward),
    each trained with the same recipe and budget;
reporting faithfulness (DSG, non-differentiable) scored by the evaluation-only verifier
(``diffalign.core.shapes.load_eval_verifier()``, never a reward) beside the same score from the training
reward's verifier (``faithfulness_train_verifier``), FID (committed verifier features and reference
statistics), the training reward (shapes-reward), diversity (mean pairwise feature distance between seeds of
one prompt) and seconds per image. Trained rows are repeated over ``--seeds`` training seeds and carry the
mean, the standard deviation and the per-seed values of each score.

    python -m diffalign.di_star.bench --out bench/results/di-star.json [--quick] [--seeds 3] [--teacher shapes/unet]

Training runs go to --work-dir and resume if interrupted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import DiStarConfig

SHAPES_RECIPE: dict[str, Any] = {
    "seed": 0,
    # measured defaults (issue 19): t* 599, lr 1e-4 for both networks, alpha_rew near gradient parity
    "generator": {"t_star": 599, "optimizer": {"lr": 1e-4}},
    "fake_score": {"optimizer": {"lr": 1e-4}, "updates_per_generator_step": 2},
    "loss": {"cfg_scale": 4.0, "alpha_rew": 5.0, "huber_c": 1.0, "weighting": "sigma"},
    "reward": {"name": "shapes-reward"},
    "data": {"prompts": "shapes", "num_prompts": 2000, "batch_size": 16},
    "training": {"max_steps": 300, "checkpoint_every": 50, "log_every": 10},
}

VARIANTS: dict[str, dict[str, Any]] = {
    "di_star": {},
    "sim_reward_off": {"alpha_rew": 0.0},
    "di_pp_kl": {"regulariser": "kl"},
}

IMAGE_SIZE = 32  # the shapes verifier's input size


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _to_verifier_size(images: torch.Tensor) -> torch.Tensor:
    images = images.float().clamp(-1, 1)
    if images.shape[-1] != IMAGE_SIZE:
        images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return images


def measure(
    images: torch.Tensor,
    prompts: list[str],
    reward,
    diversity_images: torch.Tensor | None,
    eval_verifier=None,
) -> dict:
    """Faithfulness and FID (core's ``score_images``), reward and diversity of images in [-1, 1]."""
    from diffalign.core.shapes.evaluate import score_images

    images = _to_verifier_size(images)
    scores = score_images(images, prompts)
    return _with_reward_and_diversity(scores, images, prompts, reward, diversity_images, eval_verifier)


def _with_reward_and_diversity(
    scores: dict, images, prompts, reward, diversity_images, eval_verifier=None
) -> dict:
    """``scores``: core's row from the training reward's (committed) verifier. ``faithfulness`` is re-scored
    with ``eval_verifier`` (default: ``load_eval_verifier()``), which no reward optimises."""
    from diffalign.core.shapes import faithfulness, load_eval_verifier
    from diffalign.core.shapes.scoring import features

    verifier = eval_verifier if eval_verifier is not None else load_eval_verifier()
    held_out = faithfulness(images, prompts, verifier).as_dict()
    with torch.no_grad():
        rew = reward.score(images, prompts).float().mean().item()
    row = {
        "faithfulness": float(held_out["overall"]),
        "per_skill": {k: float(v) for k, v in held_out["per_skill"].items()},
        "faithfulness_train_verifier": float(scores["overall"]),
        "per_skill_train_verifier": {k: float(v) for k, v in scores["per_skill"].items()},
        "fid": float(scores["fid"]),
        "reward": rew,
    }
    if diversity_images is not None:  # [P, S, 3, H, W]: S seeds for each of P prompts
        p, s = diversity_images.shape[:2]
        feats = features(_to_verifier_size(diversity_images.flatten(0, 1))).view(p, s, -1).double()
        dists = torch.cdist(feats, feats)  # [P, S, S]
        row["diversity"] = float(dists.sum((1, 2)).div(s * (s - 1)).mean())
    return row


def _evaluate(name, sample_fn, prompts, div_prompts, seeds, reward, log, eval_verifier=None) -> dict:
    """Sample and score on core's evaluation path (``diffalign.core.shapes.evaluate``: one noise generator
    per prompt); diversity: each of ``div_prompts`` sampled under every noise seed in ``seeds``."""
    from diffalign.core.shapes.evaluate import evaluate_sampler, noise_generators

    def at_verifier_size(batch, generators):
        return _to_verifier_size(sample_fn(batch, generators))

    scores, images = evaluate_sampler(at_verifier_size, prompts)
    div = torch.stack(
        [
            torch.cat([sample_fn([p], noise_generators(1, seed=s, start=prompts.index(p))) for s in seeds])
            for p in div_prompts
        ]
    )
    row = _with_reward_and_diversity(scores, images, prompts, reward, div, eval_verifier)
    row["seconds_per_image"] = scores["seconds_per_image"]
    row["cpu_seconds"] = scores["cpu_seconds"]
    log(
        f"{name:>18}: faithfulness {row['faithfulness']:.3f} (train verifier "
        f"{row['faithfulness_train_verifier']:.3f})  FID {row['fid']:.2f}  reward {row['reward']:.3f}  "
        f"diversity {row['diversity']:.3f}  {row['seconds_per_image'] * 1000:.1f} ms/img (wall)"
    )
    return row


SEED_KEYS = ("faithfulness", "faithfulness_train_verifier", "fid", "reward", "diversity")
HACKING_GAP = 0.05  # train-verifier gain exceeding the evaluation verifier's gain by this much = hacking


def aggregate_seeds(rows: list[dict]) -> dict:
    """One row from per-seed rows: the mean of every numeric entry, ``<key>_std`` (sample standard
    deviation, 0 for one seed) for the scores in ``SEED_KEYS``, and the per-seed rows under ``per_seed``."""
    if not rows:
        raise ValueError("no seed rows to aggregate")
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            vals = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
            out[key] = float(vals.mean())
            if key in SEED_KEYS:
                out[f"{key}_std"] = float(vals.std()) if len(rows) > 1 else 0.0
        elif isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values()):
            out[key] = {k: sum(float(r[key][k]) for r in rows) / len(rows) for k in value}
        else:
            out[key] = value
    out["n_seeds"] = len(rows)
    out["per_seed"] = rows
    return out


def reward_hacking_check(trained: dict, init_row: dict) -> dict:
    """Compare the gain measured by the training reward's verifier with the gain measured by the
    evaluation-only verifier (which no reward sees): hacking raises the first without the second."""
    train_gain = trained["faithfulness_train_verifier"] - init_row["faithfulness_train_verifier"]
    eval_gain = trained["faithfulness"] - init_row["faithfulness"]
    reward_gain = trained["reward"] - init_row["reward"]
    diversity_ratio = trained["diversity"] / max(init_row["diversity"], 1e-12)
    return {
        "reward_gain_vs_init": reward_gain,
        "faithfulness_gain_vs_init": eval_gain,
        "train_verifier_faithfulness_gain_vs_init": train_gain,
        "verifier_gap": trained["faithfulness_train_verifier"] - trained["faithfulness"],
        "diversity_ratio_vs_init": diversity_ratio,
        "fid_ratio_vs_init": trained["fid"] / max(init_row["fid"], 1e-12),
        "suspected": bool(
            train_gain - eval_gain > HACKING_GAP
            or (reward_gain > HACKING_GAP and eval_gain < 0.0)
            or diversity_ratio < 0.5
        ),
        "rule": f"the training verifier's faithfulness gain exceeds the evaluation-only verifier's by more "
        f"than {HACKING_GAP}, or the reward rises while the evaluation verifier's faithfulness falls, or "
        "diversity halves",
    }


def _teacher_sampler(pipe, steps: int, guidance: float, resolution: int | None):
    from diffalign.core.shapes.evaluate import pipeline_sampler

    kw = {} if resolution is None else {"height": resolution, "width": resolution}
    return pipeline_sampler(pipe, steps, guidance, **kw)


def _one_step_sampler(pipe, t_star: int, resolution: int | None):
    from .inference import sample_one_step

    def sample(prompts, generators):
        out = sample_one_step(pipe, list(prompts), t_star, generator=generators, resolution=resolution)
        return out * 2 - 1

    return sample


def run(args: argparse.Namespace) -> dict:
    from diffalign.core.models import load_pipeline
    from diffalign.core.rewards import get_reward
    from diffalign.core.shapes import load_eval_verifier
    from diffalign.core.shapes.evaluate import EVAL_PROMPTS_PER_SKILL, heldout_prompts, protocol

    from .inference import to_one_step_pipeline
    from .train import train

    torch.manual_seed(0)
    log = print
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    n_per_skill = args.n_per_skill or (4 if args.quick else EVAL_PROMPTS_PER_SKILL)
    steps = args.train_steps or (20 if args.quick else SHAPES_RECIPE["training"]["max_steps"])
    prompts = heldout_prompts(n_per_skill)
    div_prompts = prompts[:: max(1, len(prompts) // (4 if args.quick else 8))][: (4 if args.quick else 8)]
    seeds = list(range(100, 100 + (3 if args.quick else 6)))
    reward = get_reward("shapes-reward")
    eval_verifier = load_eval_verifier()
    n_seeds = args.seeds or (1 if args.quick else 3)
    train_seeds = [SHAPES_RECIPE["seed"] + k for k in range(n_seeds)]
    teacher_steps = (1, 4) if args.quick else (1, 4, 25, 50)

    results: dict[str, Any] = {
        "package": "diffalign-di-star",
        "teacher": args.teacher,
        "quick": bool(args.quick),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "prompts": {
            "split": "heldout",
            "n": len(prompts),
            "diversity_prompts": len(div_prompts),
            "seeds": seeds,
        },
        "evaluation": protocol(n_per_skill, verifier="eval (load_eval_verifier); train verifier beside it"),
        "train_seeds": train_seeds,
        "teacher_guidance": args.guidance,
        "train_steps": steps,
        "rows": {},
    }
    t_start = time.perf_counter()
    teacher = load_pipeline(args.teacher)
    for s in teacher_steps:
        results["rows"][f"teacher_{s}step"] = _evaluate(
            f"teacher {s} steps",
            _teacher_sampler(teacher, s, args.guidance, args.resolution),
            prompts,
            div_prompts,
            seeds,
            reward,
            log,
            eval_verifier,
        )
    base = _merge(SHAPES_RECIPE, {"model": {"teacher": args.teacher, "resolution": args.resolution}})
    t_star = base["generator"]["t_star"]
    init = to_one_step_pipeline(load_pipeline(args.teacher))
    results["rows"]["init_one_step"] = _evaluate(
        "init (1 step)",
        _one_step_sampler(init, t_star, args.resolution),
        prompts,
        div_prompts,
        seeds,
        reward,
        log,
        eval_verifier,
    )
    for name, loss_override in VARIANTS.items():
        per_seed = []
        for seed in train_seeds:
            run_dir = work / name if seed == SHAPES_RECIPE["seed"] else work / f"{name}_seed{seed}"
            cfg_dict = _merge(
                base,
                {
                    "run_dir": str(run_dir),
                    "seed": seed,
                    "loss": loss_override,
                    "training": {"max_steps": steps},
                },
            )
            if args.reward_resize:
                cfg_dict["reward"]["resize"] = args.reward_resize
            cfg = DiStarConfig.model_validate(cfg_dict)
            t0 = time.perf_counter()
            out = train(cfg)
            train_seconds = time.perf_counter() - t0
            pipe = to_one_step_pipeline(load_pipeline(out))
            row = _evaluate(
                f"{name} seed {seed}",
                _one_step_sampler(pipe, t_star, args.resolution),
                prompts,
                div_prompts,
                seeds,
                reward,
                log,
                eval_verifier,
            )
            row["train_seconds"] = train_seconds
            row["seed"] = seed
            per_seed.append(row)
        row = aggregate_seeds(per_seed)
        row["config"] = cfg.loss.model_dump(mode="json")
        results["rows"][name] = row

    rows = results["rows"]
    ref = rows.get("teacher_50step") or rows[f"teacher_{teacher_steps[-1]}step"]
    di = rows["di_star"]
    results["target"] = {
        "baseline": "teacher_50step" if "teacher_50step" in rows else f"teacher_{teacher_steps[-1]}step",
        "faithfulness_reached": di["faithfulness"] >= ref["faithfulness"],
        "fid_within_1.5x": di["fid"] <= 1.5 * ref["fid"],
    }
    results["reward_hacking_check"] = reward_hacking_check(di, rows["init_one_step"])
    results["wall_seconds"] = time.perf_counter() - t_start
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/di-star.json")
    parser.add_argument("--teacher", default="shapes/unet", help="model id or folder of the teacher pipeline")
    parser.add_argument(
        "--quick", action="store_true", help="few prompts, 20 training steps, 1/4-step teacher"
    )
    parser.add_argument("--work-dir", default="bench/work/di-star")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument(
        "--seeds", type=int, default=None, help="training seeds per trained row (default 3; --quick: 1)"
    )
    parser.add_argument("--n-per-skill", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=4.0, help="teacher CFG scale when sampling it")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument(
        "--reward-resize", type=int, default=None, help="resize decoded pixels for the reward"
    )
    args = parser.parse_args(argv)
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
