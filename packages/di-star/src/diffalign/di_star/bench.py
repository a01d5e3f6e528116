"""DI* benchmark on the shapes world (held-out prompts), in the paper's two-stage protocol.

Per training seed: stage 1 distils a one-step generator from the teacher reward-free (SIM-like, alpha_rew 0);
stage 2 continues from its export twice at the same budget, as DI* (alpha_rew 5) and as continued SIM
(alpha_rew 0). On seed 0 stage 2 is also run over an alpha_rew sweep (faithfulness vs FID trade-off,
written beside the main result as ``<out>-alpha.json`` and ``<out>-alpha.png``). Compared on the same
prompts and noise: the teacher with its own scheduler at 1 / 4 / 25 / 50 steps (CFG as the teacher is
sampled), the teacher at t* as a one-step model (what stage 1 starts from), the stage-1 models and both
stage-2 models. Each row reports faithfulness (DSG, non-differentiable) scored by the evaluation-only
verifier (``diffalign.core.shapes.load_eval_verifier()``, never a reward) beside the same score from the
training reward's verifier (``faithfulness_train_verifier``), FID (committed verifier features and
reference statistics), the training reward (shapes-reward), diversity (mean pairwise feature distance
between seeds of one prompt) and seconds per image. Trained rows carry the mean, the standard deviation
and the per-seed values; ``comparisons`` holds the paired per-seed differences (DI* - SIM, SIM - stage 1,
DI* - teacher) with their mean and spread, and the FID ratio to the 50-step teacher.

    python -m diffalign.di_star.bench --out bench/results/di-star.json [--quick] [--seeds 3] \
        [--stage1-steps 120] [--stage2-steps 80] [--alphas 0 1 5 20 100]

Training runs and every scored row are kept in --work-dir: an interrupted run resumes there (training
from its last checkpoint, scored rows are not re-scored), and --out is rewritten after every row.
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
    "training": {"max_steps": 300, "checkpoint_every": 20, "keep_last": 1, "log_every": 10},
}

# the paper's protocol: a reward-free one-step model first, then DI* and continued SIM from it at one budget
STAGE1_LOSS: dict[str, Any] = {"alpha_rew": 0.0}
STAGE2_VARIANTS: dict[str, dict[str, Any]] = {
    "di_star": {"alpha_rew": SHAPES_RECIPE["loss"]["alpha_rew"]},
    "sim": {"alpha_rew": 0.0},
}
KL_VARIANT: dict[str, dict[str, Any]] = {"di_pp_kl": {"regulariser": "kl"}}  # --kl: DI++-like baseline
STAGE1_STEPS = 120
STAGE2_STEPS = 80
ALPHA_SWEEP = (0.0, 1.0, 5.0, 20.0, 100.0)  # stage 2 on the first training seed

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


def paired_differences(a: list[dict], b: list[dict] | dict, key: str = "faithfulness") -> dict:
    """``a[i][key] - b[i][key]`` for rows paired by training seed (``b`` one row: the same for every seed):
    the mean, the sample standard deviation, the extremes, how many seeds are positive, and the values."""
    if not a:
        raise ValueError("no rows to compare")
    bs = [b] * len(a) if isinstance(b, dict) else list(b)
    if len(bs) != len(a):
        raise ValueError(f"cannot pair {len(a)} rows with {len(bs)}")
    for x, y in zip(a, bs, strict=True):
        if "seed" in x and "seed" in y and x["seed"] != y["seed"]:
            raise ValueError(f"rows of seeds {x['seed']} and {y['seed']} are not a pair")
    diffs = torch.tensor(
        [float(x[key]) - float(y[key]) for x, y in zip(a, bs, strict=True)], dtype=torch.float64
    )
    return {
        "mean": float(diffs.mean()),
        "std": float(diffs.std()) if len(diffs) > 1 else 0.0,
        "min": float(diffs.min()),
        "max": float(diffs.max()),
        "n_positive": int((diffs > 0).sum()),
        "n": len(diffs),
        "per_seed": [float(d) for d in diffs],
    }


def fid_ratios(a: list[dict], ref: dict) -> dict:
    """FID of each seed's row over the reference row's FID: mean, extremes and values."""
    vals = [float(r["fid"]) / max(float(ref["fid"]), 1e-12) for r in a]
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "per_seed": vals}


def summarise(rows: dict[str, dict], seeds: list[int]) -> tuple[dict, dict, dict]:
    """From scored rows (``teacher_<n>step``, ``init_one_step`` and per seed ``stage1_seed<s>``,
    ``di_star_seed<s>``, ``sim_seed<s>``): the aggregated table, the paired comparisons and the targets of
    issue 19 (DI* > continued SIM > stage 1 and DI* >= teacher-4 in faithfulness, FID <= 1.5x teacher-50;
    stretch DI* >= teacher-50). A target holds when the mean difference over seeds does; ``*_every_seed``
    says whether it also holds seed by seed. Seeds not scored yet are left out."""
    table = {k: v for k, v in rows.items() if k.startswith("teacher_") or k == "init_one_step"}
    per: dict[str, list[dict]] = {}
    for name in ("stage1", *STAGE2_VARIANTS, *KL_VARIANT):
        done = [rows[f"{name}_seed{s}"] for s in seeds if f"{name}_seed{s}" in rows]
        if done:
            per[name] = done
            table[name] = aggregate_seeds(done)
    comparisons: dict[str, dict] = {}
    targets: dict[str, Any] = {}
    complete = [s for s in seeds if all(f"{n}_seed{s}" in rows for n in ("stage1", *STAGE2_VARIANTS))]
    if not complete:
        return table, comparisons, targets
    pick = {n: [rows[f"{n}_seed{s}"] for s in complete] for n in ("stage1", *STAGE2_VARIANTS)}
    di, sim, st1 = pick["di_star"], pick["sim"], pick["stage1"]
    comparisons["di_star_minus_sim"] = paired_differences(di, sim)
    comparisons["sim_minus_stage1"] = paired_differences(sim, st1)
    comparisons["di_star_minus_stage1"] = paired_differences(di, st1)
    if "init_one_step" in rows:
        comparisons["stage1_minus_init_one_step"] = paired_differences(st1, rows["init_one_step"])
    for steps in (4, 50):
        ref = rows.get(f"teacher_{steps}step")
        if ref is not None:
            comparisons[f"di_star_minus_teacher_{steps}step"] = paired_differences(di, ref)
    ref50 = rows.get("teacher_50step")
    if ref50 is not None:
        comparisons["fid_ratio_di_star_to_teacher_50step"] = fid_ratios(di, ref50)
        comparisons["fid_ratio_sim_to_teacher_50step"] = fid_ratios(sim, ref50)
    for key, comp, strict in (
        ("di_star_gt_sim", "di_star_minus_sim", True),
        ("sim_gt_stage1", "sim_minus_stage1", True),
        ("di_star_ge_teacher_4step", "di_star_minus_teacher_4step", False),
        ("stretch_di_star_ge_teacher_50step", "di_star_minus_teacher_50step", False),
    ):
        if comp in comparisons:
            c = comparisons[comp]
            targets[key] = c["mean"] > 0 if strict else c["mean"] >= 0
            targets[f"{key}_every_seed"] = (c["min"] > 0) if strict else (c["min"] >= 0)
    if "fid_ratio_di_star_to_teacher_50step" in comparisons:
        ratio = comparisons["fid_ratio_di_star_to_teacher_50step"]
        targets["di_star_fid_within_1.5x_teacher_50step"] = ratio["mean"] <= 1.5
        targets["di_star_fid_within_1.5x_teacher_50step_every_seed"] = ratio["max"] <= 1.5
    targets["seeds_compared"] = len(complete)
    return table, comparisons, targets


def alpha_sweep_result(rows: dict[str, dict], alphas: list[float], seed: int) -> dict:
    """The alpha_rew trade-off on one training seed: stage 2 from that seed's stage-1 model at each
    alpha_rew (0 is continued SIM, the recipe's default is DI*), beside its start and the teacher."""
    out: dict[str, dict] = {}
    start = rows.get(f"stage1_seed{seed}")
    for name, label in (
        ("teacher_4step", "teacher 4 steps"),
        ("teacher_50step", "teacher 50 steps"),
        (f"stage1_seed{seed}", "stage 1 (start)"),
    ):
        if name in rows:
            out[label] = _sweep_entry(rows[name], None, None)
    for alpha in alphas:
        name = alpha_row_name(alpha, seed)
        if name in rows:
            out[f"alpha_rew {alpha:g}"] = _sweep_entry(rows[name], alpha, start)
    return out


def _sweep_entry(row: dict, alpha: float | None, start: dict | None) -> dict:
    entry = {"alpha_rew": alpha}
    entry.update(
        {k: row[k] for k in ("faithfulness", "faithfulness_train_verifier", "fid", "reward", "diversity")}
    )
    if start is not None:
        entry["hacking_suspected"] = reward_hacking_check(row, start)["suspected"]
    return entry


def alpha_row_name(alpha: float, seed: int) -> str:
    """The scored row of stage 2 at ``alpha``: the DI* / SIM rows where the recipe already trains them."""
    for variant, loss in STAGE2_VARIANTS.items():
        if float(loss["alpha_rew"]) == float(alpha):
            return f"{variant}_seed{seed}"
    return f"alpha{alpha:g}_seed{seed}"


def plot_alpha_sweep(sweep: dict[str, dict], path: str | Path, seed: int) -> Path:
    """Faithfulness (evaluation verifier) against FID, one marker per alpha_rew and per reference."""
    from diffalign.core.report import scatter_plot

    groups = {label: ([e["fid"]], [e["faithfulness"]]) for label, e in sweep.items()}
    return scatter_plot(
        groups,
        path,
        title=f"DI* stage 2 over alpha_rew (training seed {seed})",
        xlabel="FID (lower is better)",
        ylabel="faithfulness, evaluation verifier",
    )


RowCache = dict[str, dict]


class ScoredRows:
    """Scored rows kept in ``<work>/rows.json`` with the settings they were measured under; a work dir
    of other settings is refused so a resumed run never mixes budgets."""

    def __init__(self, work: Path, signature: dict):
        self.path = work / "rows.json"
        self.signature = json.loads(json.dumps(signature))
        self.rows: RowCache = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("signature") != self.signature:
                changed = sorted(
                    k
                    for k in set(saved.get("signature", {})) | set(self.signature)
                    if saved.get("signature", {}).get(k) != self.signature.get(k)
                )
                raise SystemExit(
                    f"{work} holds runs measured with other settings ({', '.join(changed)}); "
                    "pass another --work-dir or remove it"
                )
            self.rows = saved["rows"]

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def add(self, name: str, row: dict) -> None:
        from diffalign.core.report import write_json

        self.rows[name] = row
        write_json({"signature": self.signature, "rows": self.rows}, self.path)


def run(args: argparse.Namespace) -> dict:
    from diffalign.core.models import load_pipeline
    from diffalign.core.report import write_json
    from diffalign.core.rewards import get_reward
    from diffalign.core.shapes import load_eval_verifier
    from diffalign.core.shapes.evaluate import EVAL_PROMPTS_PER_SKILL, heldout_prompts, protocol

    from .inference import to_one_step_pipeline
    from .train import train

    torch.manual_seed(0)
    log = print
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    quick = bool(args.quick)
    n_per_skill = args.n_per_skill or (4 if quick else EVAL_PROMPTS_PER_SKILL)
    stage1_steps = args.stage1_steps or (10 if quick else STAGE1_STEPS)
    stage2_steps = args.stage2_steps or (10 if quick else STAGE2_STEPS)
    alphas = [
        float(a) for a in (args.alphas if args.alphas is not None else ((0.0, 5.0) if quick else ALPHA_SWEEP))
    ]
    prompts = heldout_prompts(n_per_skill)
    div_prompts = prompts[:: max(1, len(prompts) // (4 if quick else 8))][: (4 if quick else 8)]
    noise_seeds = list(range(100, 100 + (3 if quick else 6)))
    n_seeds = args.seeds or (1 if quick else 3)
    train_seeds = [SHAPES_RECIPE["seed"] + k for k in range(n_seeds)]
    teacher_steps = (1, 4) if quick else (1, 4, 25, 50)
    variants = {**STAGE2_VARIANTS, **(KL_VARIANT if args.kl else {})}
    base = _merge(SHAPES_RECIPE, {"model": {"teacher": args.teacher, "resolution": args.resolution}})
    if args.reward_resize:
        base["reward"]["resize"] = args.reward_resize
    t_star = base["generator"]["t_star"]
    cache = ScoredRows(
        work,
        {
            "teacher": args.teacher,
            "recipe": base,
            "stage1_steps": stage1_steps,
            "stage2_steps": stage2_steps,
            "n_per_skill": n_per_skill,
            "guidance": args.guidance,
            "noise_seeds": noise_seeds,
        },
    )
    out_path = Path(args.out)
    alpha_json = out_path.with_name(out_path.stem + "-alpha.json")
    alpha_png = out_path.with_name(out_path.stem + "-alpha.png")
    reward = get_reward("shapes-reward")
    eval_verifier = load_eval_verifier()
    cpu_start, t_start = time.process_time(), time.perf_counter()

    def score(name: str, sample_fn, extra: dict | None = None) -> dict:
        row = _evaluate(name, sample_fn, prompts, div_prompts, noise_seeds, reward, log, eval_verifier)
        row.update(extra or {})
        cache.add(name, row)
        write_results(complete=False)
        return row

    def trained(name: str, seed: int, loss: dict, steps: int, init: Path | None) -> Path:
        """Train (or resume) one run and score its export once."""
        run_dir = work / name
        out = run_dir / "generator"
        if name in cache and out.is_dir():
            return out
        cfg = DiStarConfig.model_validate(
            _merge(
                base,
                {
                    "run_dir": str(run_dir),
                    "seed": seed,
                    "model": {"generator_init": None if init is None else str(init)},
                    "loss": loss,
                    "training": {"max_steps": steps},
                },
            )
        )
        cpu0 = time.process_time()
        out = train(cfg)
        extra = {"seed": seed, "train_steps": steps, "train_cpu_seconds": time.process_time() - cpu0}
        extra["alpha_rew"] = cfg.loss.alpha_rew
        if name not in cache:
            pipe = to_one_step_pipeline(load_pipeline(out))
            score(name, _one_step_sampler(pipe, t_star, args.resolution), extra)
        return out

    def write_results(complete: bool) -> dict:
        table, comparisons, targets = summarise(cache.rows, train_seeds)
        results: dict[str, Any] = {
            "package": "diffalign-di-star",
            "teacher": args.teacher,
            "quick": quick,
            "complete": complete,
            "protocol": (
                f"per training seed: stage 1 = reward-free one-step distillation from the teacher "
                f"({stage1_steps} generator steps, alpha_rew 0); stage 2 from stage 1's export, {stage2_steps} "
                f"steps each: DI* (alpha_rew {STAGE2_VARIANTS['di_star']['alpha_rew']:g}) and continued SIM "
                "(alpha_rew 0); the fake score restarts from the teacher in each stage"
            ),
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "prompts": {
                "split": "heldout",
                "n": len(prompts),
                "diversity_prompts": len(div_prompts),
                "seeds": noise_seeds,
            },
            "evaluation": protocol(
                n_per_skill, verifier="eval (load_eval_verifier); train verifier beside it"
            ),
            "train_seeds": train_seeds,
            "teacher_guidance": args.guidance,
            "stage1_steps": stage1_steps,
            "stage2_steps": stage2_steps,
            "recipe": base,
            "rows": table,
            "comparisons": comparisons,
            "target": targets,
        }
        if "di_star" in table and "stage1" in table:
            results["reward_hacking_check"] = reward_hacking_check(table["di_star"], table["stage1"])
        results["cpu_seconds_this_process"] = time.process_time() - cpu_start
        results["wall_seconds_this_process"] = time.perf_counter() - t_start
        write_json(results, out_path)
        sweep = alpha_sweep_result(cache.rows, alphas, train_seeds[0])
        if any(e["alpha_rew"] is not None for e in sweep.values()):
            write_json(
                {
                    "package": "diffalign-di-star",
                    "teacher": args.teacher,
                    "complete": complete,
                    "what": (
                        f"stage 2 from training seed {train_seeds[0]}'s stage-1 model, {stage2_steps} steps at "
                        "each alpha_rew; faithfulness by the evaluation verifier; hacking_suspected: "
                        "reward_hacking_check against the stage-1 start"
                    ),
                    "plot": alpha_png.name,
                    "rows": sweep,
                },
                alpha_json,
            )
            plot_alpha_sweep(sweep, alpha_png, train_seeds[0])
        return results

    teacher = load_pipeline(args.teacher)
    for s in teacher_steps:
        name = f"teacher_{s}step"
        if name not in cache:
            score(name, _teacher_sampler(teacher, s, args.guidance, args.resolution))
    if "init_one_step" not in cache:
        init = to_one_step_pipeline(load_pipeline(args.teacher))
        score("init_one_step", _one_step_sampler(init, t_star, args.resolution))
    stage1: dict[int, Path] = {}
    for seed in train_seeds:
        stage1[seed] = trained(f"stage1_seed{seed}", seed, STAGE1_LOSS, stage1_steps, None)
        for variant, loss in variants.items():
            trained(f"{variant}_seed{seed}", seed, loss, stage2_steps, stage1[seed])
    seed0 = train_seeds[0]
    for alpha in alphas:
        name = alpha_row_name(alpha, seed0)
        if name not in cache:
            trained(name, seed0, {"alpha_rew": alpha}, stage2_steps, stage1[seed0])
    return write_results(complete=True)


HEADLINE_ROWS = {
    "teacher_1step": "teacher, 1 step",
    "teacher_4step": "teacher, 4 steps",
    "teacher_25step": "teacher, 25 steps",
    "teacher_50step": "teacher, 50 steps",
    "init_one_step": "teacher at t* (one step, stage-1 start)",
    "stage1": "stage 1: reward-free (SIM-like)",
    "sim": "stage 2: continued SIM",
    "di_star": "stage 2: DI*",
    "di_pp_kl": "stage 2: DI++-like (KL)",
}


def _pm(row: dict, key: str, digits: int) -> str:
    if key not in row:
        return ""
    std = row.get(f"{key}_std")
    return f"{row[key]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def headline(results: dict) -> str:
    """The benchmark's result as markdown: the rows (mean ± standard deviation over training seeds), the
    paired differences and the targets."""
    from diffalign.core.report import markdown_table

    rows = results["rows"]
    labels = {n: HEADLINE_ROWS.get(n, n) for n in rows}  # known rows first, in the table's order
    labels = {**{n: lab for n, lab in HEADLINE_ROWS.items() if n in rows}, **labels}
    table = [
        {
            "model": label,
            "seeds": rows[name].get("n_seeds", ""),
            "faithfulness (eval verifier)": _pm(rows[name], "faithfulness", 3),
            "faithfulness (train verifier)": _pm(rows[name], "faithfulness_train_verifier", 3),
            "FID": _pm(rows[name], "fid", 1),
            "reward": _pm(rows[name], "reward", 3),
            "diversity": _pm(rows[name], "diversity", 1),
        }
        for name, label in labels.items()
    ]
    comps = [
        {
            "paired difference": name,
            "mean": c["mean"],
            "std": c.get("std", ""),
            "per seed": ", ".join(f"{v:+.3f}" if "fid" not in name else f"{v:.2f}" for v in c["per_seed"]),
        }
        for name, c in results.get("comparisons", {}).items()
    ]
    out = markdown_table(table)
    if comps:
        out += "\n" + markdown_table(comps)
    if results.get("target"):
        out += "\n" + "\n".join(f"- {k}: {v}" for k, v in results["target"].items()) + "\n"
    if "reward_hacking_check" in results:
        check = results["reward_hacking_check"]
        out += f"- reward hacking suspected (DI* vs stage 1): {check['suspected']}\n"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/di-star.json")
    parser.add_argument(
        "--print",
        dest="show",
        metavar="JSON",
        default=None,
        help="print the tables of a written result and exit",
    )
    parser.add_argument("--teacher", default="shapes/unet", help="model id or folder of the teacher pipeline")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="16 prompts, 10 + 10 training steps, 1 seed, alpha_rew 0 and 5, 1/4-step teacher",
    )
    parser.add_argument("--work-dir", default="bench/work/di-star")
    parser.add_argument(
        "--stage1-steps", type=int, default=None, help=f"stage-1 generator steps (default {STAGE1_STEPS})"
    )
    parser.add_argument(
        "--stage2-steps", type=int, default=None, help=f"stage-2 generator steps (default {STAGE2_STEPS})"
    )
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (default 3; --quick: 1)")
    parser.add_argument(
        "--alphas",
        type=float,
        nargs="*",
        default=None,
        help=f"stage-2 alpha_rew sweep on the first seed (default {' '.join(f'{a:g}' for a in ALPHA_SWEEP)})",
    )
    parser.add_argument(
        "--kl", action="store_true", help="also train the DI++-like KL regulariser in stage 2"
    )
    parser.add_argument("--n-per-skill", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=4.0, help="teacher CFG scale when sampling it")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument(
        "--reward-resize", type=int, default=None, help="resize decoded pixels for the reward"
    )
    args = parser.parse_args(argv)
    if args.show is not None:
        path = Path(args.show)
        if not path.is_file():
            parser.error(f"--print: no result file at {path}")
        print(headline(json.loads(path.read_text(encoding="utf-8"))), end="")
        return
    for flag in ("stage1_steps", "stage2_steps", "seeds", "n_per_skill"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.alphas is not None and any(a < 0 for a in args.alphas):
        parser.error("--alphas must be >= 0")
    run(args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
