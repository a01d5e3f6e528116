"""Shapes-world benchmark: single-image scorer, SFT, naive GRPO, listener-shaped GRPO.

``python -m diffalign.listener_reward.bench --out bench/results/listener-reward.json [--quick]``

Same training pairs, seeds and step budget for both GRPO variants (both start from the same SFT model).
Every judge is evaluated on an in-distribution split (``test_id``: colour-shape combinations seen in
training) and an out-of-distribution split (``test_ood``: held-out combinations): pairwise accuracy with
95% Wilson and bootstrap intervals, and the listener-disagreement (contradiction) rate. Each stage writes
its model to ``--work`` and is skipped when rerun, so a killed benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from diffalign.listener_reward.config import ListenerRewardRecipe

SHAPES_RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "shapes.yaml"

QUICK = dict(
    num_train=256,
    num_eval=100,
    base_steps=300,
    listener_steps=400,
    listener_batch=32,
    listener_pairs=1200,
    scorer_steps=150,
    sft_steps=150,
    grpo_steps=16,
)
FULL = dict(
    num_train=1024,
    num_eval=300,
    base_steps=600,
    listener_steps=2000,
    listener_batch=32,
    listener_pairs=4000,
    scorer_steps=1200,
    sft_steps=1000,
    grpo_steps=400,
)


def bench_config(
    budget: dict, work: Path, seed: int = 0, extra: list[str] | None = None
) -> ListenerRewardRecipe:
    from diffalign.core.config import load_config

    overrides = [
        f"seed={seed}",
        f"data.num_train={budget['num_train']}",
        f"data.num_eval={budget['num_eval']}",
        f"sft.max_steps={budget['sft_steps']}",
        f"sft.output_dir={work / 'sft'}",
        f"grpo.max_steps={budget['grpo_steps']}",
        f"grpo.init_from={work / 'sft' / 'final'}",
        f"model.reasoner={work / 'models' / 'reasoner'}",
        f"model.listener={work / 'models' / 'listener'}",
        *(extra or []),
    ]
    path = SHAPES_RECIPE if SHAPES_RECIPE.is_file() else None
    return load_config(ListenerRewardRecipe, path, overrides)


def _stage(name: str, final: Path, fn, timings: dict):
    if (final / "config.json").is_file():
        timings[name] = timings.get(name, 0.0)
        print(f"[bench] {name}: reusing {final}", flush=True)
        return final
    start = time.time()
    print(f"[bench] {name} ...", flush=True)
    out = fn()
    timings[name] = time.time() - start
    print(f"[bench] {name} done in {timings[name]:.0f}s", flush=True)
    return out


def evaluate_scorer(scorer, pairs) -> dict:
    from diffalign.listener_reward.evaluate import bootstrap_ci, pairwise_correct, wilson_interval

    s1 = scorer.score([p.prompt for p in pairs], [p.images()[0] for p in pairs])
    s2 = scorer.score([p.prompt for p in pairs], [p.images()[1] for p in pairs])
    correct = pairwise_correct(s1.numpy(), s2.numpy(), [p.label for p in pairs])
    k, n = int(correct.sum()), len(correct)
    return {
        "n": n,
        "accuracy": k / n,
        "accuracy_ci_wilson": wilson_interval(k, n),
        "accuracy_ci_bootstrap": bootstrap_ci(correct),
        "contradiction_rate": None,
    }


def run(
    out: Path,
    quick: bool,
    work: Path | None = None,
    seed: int = 0,
    budget_overrides: dict | None = None,
    overrides: list[str] | None = None,
) -> dict:
    from diffalign.listener_reward.data import load_pairs
    from diffalign.listener_reward.evaluate import evaluate_judge
    from diffalign.listener_reward.judge import PreferenceJudge
    from diffalign.listener_reward.modeling import load_vlm_and_processor
    from diffalign.listener_reward.rewards import LocalListener
    from diffalign.listener_reward.shapes_models import (
        SingleImageScorer,
        build_reasoner_init,
        train_listener,
        train_single_image_scorer,
    )
    from diffalign.listener_reward.train import run_grpo, run_sft

    torch.set_num_threads(1)
    budget = {**(QUICK if quick else FULL), **(budget_overrides or {})}
    work = Path(work or Path("runs/listener-reward") / ("bench-quick" if quick else "bench"))
    cfg = bench_config(budget, work, seed, overrides)
    timings: dict = {}
    started = time.time()
    train_pairs = load_pairs(cfg.data, "train")
    eval_pairs = {split: load_pairs(cfg.data, split) for split in ("test_id", "test_ood")}

    models = work / "models"
    _stage(
        "reasoner_init",
        models / "reasoner",
        lambda: build_reasoner_init(cfg, models / "reasoner", base_steps=budget["base_steps"]),
        timings,
    )
    _stage(
        "listener",
        models / "listener",
        lambda: train_listener(
            cfg,
            models / "listener",
            budget["listener_steps"],
            budget["listener_pairs"],
            seed=1000 + seed,
            base_steps=budget["base_steps"],
            batch_size=budget["listener_batch"],
        ),
        timings,
    )
    _stage(
        "single_image_scorer",
        models / "scorer",
        lambda: train_single_image_scorer(
            cfg, train_pairs, models / "scorer", budget["scorer_steps"], seed=seed, init=models / "reasoner"
        ),
        timings,
    )
    _stage("sft", work / "sft" / "final", lambda: run_sft(cfg, train_pairs), timings)

    naive = cfg.model_copy(deep=True)
    naive.reward.use_listener = False
    naive.grpo.output_dir = str(work / "grpo_naive")
    shaped = cfg.model_copy(deep=True)
    shaped.reward.use_listener = True
    shaped.grpo.output_dir = str(work / "grpo_listener")
    listener_model, listener_processor = load_vlm_and_processor(models / "listener")
    listener = LocalListener(listener_model, listener_processor, cfg.prompts, batch_size=32)
    _stage("grpo_naive", work / "grpo_naive" / "final", lambda: run_grpo(naive, train_pairs), timings)
    _stage(
        "grpo_listener",
        work / "grpo_listener" / "final",
        lambda: run_grpo(shaped, train_pairs, listener_backend=listener),
        timings,
    )

    results: dict = {}
    scorer_model, scorer_processor = load_vlm_and_processor(models / "scorer")
    scorer = SingleImageScorer(scorer_model, scorer_processor, cfg.prompts)
    results["single_image_scorer"] = {s: evaluate_scorer(scorer, p) for s, p in eval_pairs.items()}
    for name, path in (
        ("sft", work / "sft" / "final"),
        ("grpo_naive", work / "grpo_naive" / "final"),
        ("grpo_listener", work / "grpo_listener" / "final"),
    ):
        start = time.time()
        judge = PreferenceJudge.from_pretrained(str(path), cfg.prompts, cfg.judge, batch_size=32)
        results[name] = {
            s: evaluate_judge(judge, p, listener, n_boot=1000, seed=seed) for s, p in eval_pairs.items()
        }
        timings[f"eval_{name}"] = time.time() - start
    # reference points: the listener alone (empty reasoning) and the annotators' agreement with the truth
    reference = {}
    for split, pairs in eval_pairs.items():
        probs = listener.probabilities(
            [p.prompt for p in pairs], [p.images() for p in pairs], [""] * len(pairs)
        )
        choice = (probs[:, 1] > probs[:, 0]).long().numpy() + 1
        labels = np.array([p.label for p in pairs])
        truth = np.array([1 if p.faithful[0] else 2 for p in pairs])
        reference[split] = {
            "listener_images_only_accuracy": float((choice == labels).mean()),
            "annotator_agreement_with_faithful": float((labels == truth).mean()),
        }
    for name, path in (("grpo_naive", work / "grpo_naive"), ("grpo_listener", work / "grpo_listener")):
        history = path / "log_history.json"
        if history.is_file():
            rows = json.loads(history.read_text())
            reference[f"{name}_train_log"] = [
                {k: r[k] for k in r if k.startswith(("reward", "step", "rewards/", "kl", "listener"))}
                for r in rows
            ]
    report = {
        "package": "diffalign-listener-reward",
        "mode": "quick" if quick else "full",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "seed": seed,
        "budget": budget,
        "config": cfg.model_dump(mode="json"),
        "results": results,
        "reference": reference,
        "baseline_for": {"grpo_listener": "grpo_naive", "grpo_naive": "sft", "sft": "single_image_scorer"},
        "timings_s": timings,
        "wall_time_s": time.time() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(summary_table(report))
    return report


def aggregate(reports: list[dict]) -> dict:
    """Seeds of the same budget -> per judge and split: mean and sample sd of accuracy and contradiction
    rate, and the per-seed paired differences listener-shaped minus naive GRPO and naive GRPO minus SFT."""
    if not reports:
        raise ValueError("aggregate needs at least one bench report")
    budgets = {json.dumps(r["budget"], sort_keys=True) for r in reports}
    if len(budgets) > 1:
        raise ValueError("reports were run with different budgets; aggregate only seeds of one budget")

    def stats(values):
        v = np.asarray([x for x in values if x is not None], dtype=float)
        if v.size == 0:
            return None
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}

    out: dict = {"seeds": [r["seed"] for r in reports], "budget": reports[0]["budget"], "judges": {}}
    for name in reports[0]["results"]:
        out["judges"][name] = {
            split: {
                metric: stats([r["results"][name][split].get(metric) for r in reports])
                for metric in ("accuracy", "contradiction_rate")
            }
            for split in reports[0]["results"][name]
        }
    pairs = {
        "listener_minus_naive": ("grpo_listener", "grpo_naive"),
        "naive_minus_sft": ("grpo_naive", "sft"),
    }
    out["paired"] = {}
    for label, (a, b) in pairs.items():
        out["paired"][label] = {}
        for split in reports[0]["results"][a]:
            per_metric = {}
            for metric in ("accuracy", "contradiction_rate"):
                diffs = [r["results"][a][split][metric] - r["results"][b][split][metric] for r in reports]
                per_metric[metric] = {"per_seed": diffs, **(stats(diffs) or {})}
            out["paired"][label][split] = per_metric
    return out


def aggregate_table(agg: dict) -> str:
    lines = [
        f"seeds {agg['seeds']}: mean (sd) over seeds",
        "",
        "| judge | split | accuracy | contradiction rate |",
        "|---|---|---|---|",
    ]
    for name, splits in agg["judges"].items():
        for split, m in splits.items():
            acc = m["accuracy"]
            con = m["contradiction_rate"]
            con_s = "n/a" if con is None else f"{con['mean']:.3f} ({con['sd']:.3f})"
            lines.append(f"| {name} | {split} | {acc['mean']:.3f} ({acc['sd']:.3f}) | {con_s} |")
    lines += [
        "",
        "| paired difference | split | accuracy per seed | contradiction per seed |",
        "|---|---|---|---|",
    ]
    for label, splits in agg["paired"].items():
        for split, m in splits.items():
            acc = ", ".join(f"{d:+.3f}" for d in m["accuracy"]["per_seed"])
            con = ", ".join(f"{d:+.3f}" for d in m["contradiction_rate"]["per_seed"])
            lines.append(f"| {label} | {split} | {acc} | {con} |")
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    lines = ["| judge | split | accuracy [95% CI] | contradiction rate |", "|---|---|---|---|"]
    for name, splits in report["results"].items():
        for split, r in splits.items():
            lo, hi = r["accuracy_ci_wilson"]
            contra = r.get("contradiction_rate")
            contra_s = "n/a" if contra is None else f"{contra:.3f}"
            lines.append(f"| {name} | {split} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {contra_s} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/listener-reward.json"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="stage directory (resumable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="KEY=N",
        help="override one budget entry, e.g. sft_steps=600",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="recipe override"
    )
    parser.add_argument(
        "--aggregate",
        nargs="+",
        type=Path,
        default=None,
        metavar="REPORT",
        help="do not train: combine bench reports of several seeds (same budget) into --out",
    )
    args = parser.parse_args(argv)
    if args.aggregate:
        agg = aggregate([json.loads(p.read_text()) for p in args.aggregate])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(agg, indent=2))
        print(aggregate_table(agg))
        return
    budget = {}
    for item in args.budget:
        key, _, value = item.partition("=")
        if key not in FULL or not value.isdigit():
            parser.error(f"--budget expects KEY=N with KEY in {sorted(FULL)}; got {item!r}")
        budget[key] = int(value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args.out, args.quick, args.work, args.seed, budget, args.overrides)


if __name__ == "__main__":
    main()
