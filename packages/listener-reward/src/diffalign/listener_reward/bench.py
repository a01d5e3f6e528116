"""Shapes-world benchmark: single-image scorer, SFT, naive GRPO, listener-shaped GRPO.

``python -m diffalign.listener_reward.bench --out bench/results/listener-reward-seed0.json --seed 0``

Same training pairs, seed and step budget for both GRPO variants (both start from the same SFT model); the
seed also draws the data (``data.seed``). Every judge is evaluated on an in-distribution split
(``test_id``) and an out-of-distribution split (``test_ood``: colour-shape combinations held out of the
preference data only; the captioning bases saw every combination, so OOD tests judgement, not
perception), greedy AND sampled (``k`` completions per pair at the GRPO temperature: mean accuracy,
majority-of-k accuracy, listener disagreement, self-contradiction between the reasoning's verdicts and the
answer, policy entropy), with bootstrap intervals and paired differences between judges.

Each stage writes its model under ``--work`` in a directory named by a fingerprint of everything it
depends on (its config, its budget, its seed, the fingerprints of the stages it starts from); a rerun
reuses a stage only when that fingerprint matches, so a killed benchmark resumes and nothing from a
differently configured run is ever reused. The fingerprints are written in the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffalign.listener_reward.config import ListenerRewardRecipe

SHAPES_RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "shapes.yaml"
STAGE_CODE_VERSION = 3  # bump when a stage's training code changes what it produces
# The captioning base (the stand-in for a pretrained VLM) and the listener (a fixed, independent judge)
# are the same for every bench seed, as pretrained models are; the seed varies the preference data, the
# single-image scorer, SFT and both GRPO runs.
WORLD_SEED = 0

QUICK = dict(
    num_train=128,
    grpo_pairs=128,
    num_eval=48,
    base_steps=60,
    listener_base_steps=60,
    base_lr=1e-3,
    listener_steps=80,
    listener_batch=16,
    listener_lr=2e-3,
    listener_pairs=400,
    listener_hidden=96,
    scorer_steps=40,
    sft_steps=40,
    grpo_epochs=1,
    k_samples=4,
    listener_weight=1.0,
)
FULL = dict(
    # SFT on the reasoning of 1024 pairs for 600 steps describes both images right but matches them to the
    # prompt on 0.69 of held-out pairs (greedy), leaving GRPO room (256 pairs: always "image 2"; 2048 pairs x
    # 1000 steps: 1.00, no room); GRPO then runs 3 epochs over the first 256 pairs
    num_train=1024,
    grpo_pairs=256,
    num_eval=160,
    # 2000 captioning steps at lr 1e-3: the base names colour and shape of every render (1.00 / 1.00 on
    # 150 fresh renders); 400-600 steps at 3e-3 learnt colour only (shape at chance), which left every
    # judge downstream at chance
    base_steps=2000,
    listener_base_steps=2000,
    base_lr=1e-3,
    listener_steps=600,
    listener_batch=32,
    listener_lr=2e-3,
    listener_pairs=3000,
    listener_hidden=96,
    scorer_steps=300,
    sft_steps=600,
    grpo_epochs=3,
    k_samples=8,
    listener_weight=1.0,
)
FLOAT_BUDGET = {"listener_weight", "base_lr", "listener_lr"}
# a captioning base must name the shape of this share of fresh renders before anything is trained on it
GATE_SHAPE_ACCURACY = 0.9
# given the oracle reasoning of a held-out pair (answer stripped), the listener must pick the image it supports
GATE_LISTENER_ACCURACY = 0.9


def bench_config(
    budget: dict, work: Path, seed: int = 0, extra: list[str] | None = None
) -> ListenerRewardRecipe:
    from diffalign.core.config import load_config

    overrides = [
        f"seed={seed}",
        f"data.seed={seed}",
        f"data.num_train={budget['num_train']}",
        f"data.num_eval={budget['num_eval']}",
        f"sft.max_steps={budget['sft_steps']}",
        f"reward.listener_weight={budget['listener_weight']}",
        *(extra or []),
    ]
    path = SHAPES_RECIPE if SHAPES_RECIPE.is_file() else None
    cfg = load_config(ListenerRewardRecipe, path, overrides)
    prompts_per_step = max(cfg.grpo.per_device_batch_size // cfg.grpo.num_generations, 1)
    # GRPO runs several epochs over the first ``grpo_pairs`` training pairs (SFT and the scorer see them all)
    grpo_pairs = min(budget["grpo_pairs"], budget["num_train"])
    cfg.grpo.max_steps = max(1, math.ceil(budget["grpo_epochs"] * grpo_pairs / prompts_per_step))
    return cfg


def fingerprint(payload: dict) -> str:
    """Short stable hash of a JSON-able description of a stage."""
    text = json.dumps({"code": STAGE_CODE_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stage_plan(cfg: ListenerRewardRecipe, budget: dict, seed: int) -> dict:
    """Per stage: its fingerprint and the payload it hashes (upstream fingerprints included)."""
    from diffalign.listener_reward.shapes_models import TINY_SIZES

    pixels = {"min": cfg.model.min_pixels, "max": cfg.model.max_pixels, "image_size": cfg.data.image_size}
    data = cfg.data.model_dump(mode="json")
    prompts = cfg.prompts.model_dump(mode="json")
    plan: dict = {}

    def add(name, payload):
        plan[name] = {"fingerprint": fingerprint({"stage": name, **payload}), "payload": payload}

    add(
        "reasoner_init",
        {
            "seed": WORLD_SEED,
            "base_steps": budget["base_steps"],
            "base_lr": budget["base_lr"],
            "sizes": TINY_SIZES,
            **pixels,
        },
    )
    listener_sizes = listener_size(budget)
    add(
        "listener",
        {
            "seed": 1000 + WORLD_SEED,
            "sizes": {**TINY_SIZES, **listener_sizes},
            "pairs_split": "all",
            "annotator_noise": cfg.data.annotator_noise,
            "prompts": prompts,
            **{
                k: budget[k]
                for k in (
                    "listener_base_steps",
                    "base_lr",
                    "listener_steps",
                    "listener_pairs",
                    "listener_batch",
                    "listener_lr",
                )
            },
            **pixels,
        },
    )
    base = plan["reasoner_init"]["fingerprint"]
    add("single_image_scorer", {"init": base, "data": data, "steps": budget["scorer_steps"], "seed": seed})
    sft = cfg.sft.model_dump(mode="json", exclude={"output_dir"})
    add("sft", {"init": base, "data": data, "sft": sft, "prompts": prompts, "seed": seed})
    grpo = cfg.grpo.model_dump(mode="json", exclude={"output_dir", "init_from"})
    for name, shaped in (("grpo_naive", False), ("grpo_listener", True)):
        reward = cfg.reward.model_dump(mode="json")
        reward["use_listener"] = shaped
        add(
            name,
            {
                "init": plan["sft"]["fingerprint"],
                "listener": plan["listener"]["fingerprint"] if shaped else None,
                "data": data,
                "grpo": grpo,
                "reward": reward,
                "grpo_pairs": budget["grpo_pairs"],
                "prompts": prompts,
                "seed": seed,
            },
        )
    return plan


def listener_size(budget: dict) -> dict:
    """The listener is a wider model than the reasoner (the paper's listener is an independent larger VLM)."""
    hidden = int(budget["listener_hidden"])
    return {
        "hidden_size": hidden,
        "vision_hidden_size": 64,
    }  # vision head dim 16 (rotary needs a multiple of 4)


def _stage(name: str, final: Path, fn, timings: dict, fp: str | None = None):
    if (final / "config.json").is_file():
        recorded = final / "fingerprint.json"
        if fp is not None and (
            not recorded.is_file() or json.loads(recorded.read_text())["fingerprint"] != fp
        ):
            raise RuntimeError(f"{final} holds a {name} stage of another configuration; use a new --work")
        timings[name] = timings.get(name, 0.0)
        print(f"[bench] {name}: reusing {final} (fingerprint {fp})", flush=True)
        return final
    start, cpu = time.time(), time.process_time()
    print(f"[bench] {name} ...", flush=True)
    out = fn()
    timings[name] = time.time() - start
    timings[f"{name}_cpu"] = time.process_time() - cpu
    if fp is not None:
        (final / "fingerprint.json").write_text(json.dumps({"stage": name, "fingerprint": fp}))
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


JUDGES = ("sft", "grpo_naive", "grpo_listener")
PAIRED = {
    "listener_minus_naive": ("grpo_listener", "grpo_naive"),
    "naive_minus_sft": ("grpo_naive", "sft"),
    "listener_minus_sft": ("grpo_listener", "sft"),
}
GREEDY_METRICS = {
    "greedy_accuracy": ("per_pair_correct", None),
    "greedy_disagreement": ("per_pair_disagree", "per_pair_parsed"),
}


def _counts(result: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair numerator and denominator of one metric of one judge on one split."""
    from diffalign.listener_reward.evaluate import SAMPLED_METRICS

    if metric in GREEDY_METRICS:
        num, den = GREEDY_METRICS[metric]
        n = np.asarray(result["greedy"][num], float)
        return n, (np.ones_like(n) if den is None else np.asarray(result["greedy"][den], float))
    num, den = SAMPLED_METRICS[metric]
    pp = result["sampled"]["per_pair"]
    return np.asarray(pp[num], float), np.asarray(pp[den], float)


def paired_differences(per_seed_results: list[dict], n_boot: int = 1000) -> dict:
    """For each pair of judges in :data:`PAIRED`, split and metric: the difference a - b on the same pairs
    with a paired bootstrap interval, resampling pairs within each seed (every seed weighs the same)."""
    from diffalign.listener_reward.evaluate import SAMPLED_METRICS, ratio_bootstrap

    metrics = [*GREEDY_METRICS, *SAMPLED_METRICS]
    out: dict = {}
    first = per_seed_results[0]
    for label, (a, b) in PAIRED.items():
        out[label] = {}
        for split in first[a]:
            out[label][split] = {}
            for metric in metrics:
                cols = {"na": [], "da": [], "nb": [], "db": [], "strata": []}
                for s, results in enumerate(per_seed_results):
                    na, da = _counts(results[a][split], metric)
                    nb, db = _counts(results[b][split], metric)
                    for key, v in zip(("na", "da", "nb", "db"), (na, da, nb, db)):
                        cols[key].append(v)
                    cols["strata"].append(np.full(na.size, s))
                cat = {k: np.concatenate(v) for k, v in cols.items()}
                out[label][split][metric] = ratio_bootstrap(
                    cat["na"], cat["da"], cat["nb"], cat["db"], strata=cat["strata"], n_boot=n_boot
                )
    return out


def _train_log_summary(history: Path) -> dict | None:
    if not history.is_file():
        return None
    rows = json.loads(history.read_text())
    keys = sorted({k for r in rows for k in r if isinstance(r[k], (int, float))})
    summary = {}
    for key in keys:
        values = [float(r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
        if values:
            tail = values[len(values) // 2 :]
            summary[key] = {
                "first": values[0],
                "last": values[-1],
                "mean": float(np.mean(values)),
                "mean_second_half": float(np.mean(tail)),
            }
    return {"logged_rows": len(rows), "summary": summary}


def listener_choices(listener, pairs, reasonings: list[str] | None = None) -> np.ndarray:
    """The image (1 or 2) the listener puts its answer on for each pair, given ``reasonings`` (default: none,
    so it judges from the images alone)."""
    reasonings = [""] * len(pairs) if reasonings is None else reasonings
    probs = listener.probabilities([p.prompt for p in pairs], [p.images() for p in pairs], reasonings)
    return (probs[:, 1] > probs[:, 0]).long().numpy() + 1


class GateError(RuntimeError):
    """A model the benchmark builds on cannot do what the later stages assume (see :func:`check_gates`)."""


def check_gates(dirs: dict, pairs, cfg: ListenerRewardRecipe, enforce: bool = True) -> dict:
    """Before any judge is trained: the reasoner's captioning base must name colour and shape
    (:data:`GATE_SHAPE_ACCURACY`), and the listener must follow reasoning: given the oracle reasoning of
    held-out pairs (answer stripped) it must put its answer on the image that reasoning supports
    (:data:`GATE_LISTENER_ACCURACY`). Judges built on a base that cannot see the shape, or rewarded by a
    listener that ignores the reasoning, cannot show the method, so a failed gate stops the benchmark
    (``enforce=False`` records and goes on). The listener's accuracy from the images alone (empty
    reasoning) is recorded beside it, not enforced."""
    from diffalign.listener_reward.data import oracle_reasoning
    from diffalign.listener_reward.modeling import load_vlm_and_processor
    from diffalign.listener_reward.rewards import LocalListener
    from diffalign.listener_reward.shapes_models import caption_accuracy

    model, processor = load_vlm_and_processor(dirs["reasoner_init"])
    base = caption_accuracy(model, processor, n=120, seed=WORLD_SEED, image_size=cfg.data.image_size)
    model, processor = load_vlm_and_processor(dirs["listener"])
    listener = LocalListener(model, processor, cfg.prompts, batch_size=32)
    truth = np.array([1 if p.faithful[0] else 2 for p in pairs])
    labels = np.array([p.label for p in pairs])
    oracle = [oracle_reasoning(p.faithful, p.descriptions) for p in pairs]
    follows = float((listener_choices(listener, pairs, oracle) == truth).mean())
    alone = listener_choices(listener, pairs)
    gates = {
        "reasoner_base_caption": base,
        "listener_follows_reasoning": follows,
        "listener_images_only_accuracy": {
            "vs_annotators": float((alone == labels).mean()),
            "vs_faithful": float((alone == truth).mean()),
        },
        "thresholds": {
            "shape_accuracy": GATE_SHAPE_ACCURACY,
            "listener_follows_reasoning": GATE_LISTENER_ACCURACY,
        },
    }
    failed = []
    if base["shape_accuracy"] < GATE_SHAPE_ACCURACY:
        failed.append(
            f"the reasoner's captioning base names the shape of {base['shape_accuracy']:.2f} of renders "
            f"(< {GATE_SHAPE_ACCURACY}); train it longer or at another learning rate (--budget base_steps=...)"
        )
    if follows < GATE_LISTENER_ACCURACY:
        failed.append(
            f"the listener follows the reasoning on {follows:.2f} of held-out pairs "
            f"(< {GATE_LISTENER_ACCURACY}); train it longer (--budget listener_steps=...)"
        )
    gates["passed"] = not failed
    print(f"[bench] gates: {json.dumps(gates)}", flush=True)
    if failed and enforce:
        raise GateError("; ".join(failed) + " (--no-gate to go on anyway)")
    return gates


def run(
    out: Path,
    quick: bool,
    work: Path | None = None,
    seed: int = 0,
    budget_overrides: dict | None = None,
    overrides: list[str] | None = None,
    gate: bool = True,
) -> dict:
    from diffalign.listener_reward.data import load_pairs
    from diffalign.listener_reward.evaluate import evaluate_judge, evaluate_sampled
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
    plan = stage_plan(cfg, budget, seed)
    dirs = {name: work / f"{name}-{p['fingerprint']}" for name, p in plan.items()}
    cfg.model.reasoner = str(dirs["reasoner_init"])
    cfg.model.listener = str(dirs["listener"])
    cfg.sft.output_dir = str(dirs["sft"])
    cfg.grpo.init_from = str(dirs["sft"] / "final")
    timings: dict = {}
    started, cpu_started = time.time(), time.process_time()
    train_pairs = load_pairs(cfg.data, "train")
    eval_pairs = {split: load_pairs(cfg.data, split) for split in ("test_id", "test_ood")}

    _stage(
        "reasoner_init",
        dirs["reasoner_init"],
        lambda: build_reasoner_init(
            cfg,
            dirs["reasoner_init"],
            seed=WORLD_SEED,
            base_steps=budget["base_steps"],
            base_lr=budget["base_lr"],
        ),
        timings,
        plan["reasoner_init"]["fingerprint"],
    )
    _stage(
        "listener",
        dirs["listener"],
        lambda: train_listener(
            cfg,
            dirs["listener"],
            budget["listener_steps"],
            budget["listener_pairs"],
            seed=1000 + WORLD_SEED,
            base_steps=budget["listener_base_steps"],
            base_lr=budget["base_lr"],
            batch_size=budget["listener_batch"],
            lr=budget["listener_lr"],
            split="all",
            sizes=listener_size(budget),
        ),
        timings,
        plan["listener"]["fingerprint"],
    )
    gates = check_gates(dirs, eval_pairs["test_id"], cfg, gate)
    _stage(
        "single_image_scorer",
        dirs["single_image_scorer"],
        lambda: train_single_image_scorer(
            cfg,
            train_pairs,
            dirs["single_image_scorer"],
            budget["scorer_steps"],
            seed=seed,
            init=dirs["reasoner_init"],
        ),
        timings,
        plan["single_image_scorer"]["fingerprint"],
    )
    _stage(
        "sft", dirs["sft"] / "final", lambda: run_sft(cfg, train_pairs), timings, plan["sft"]["fingerprint"]
    )

    naive = cfg.model_copy(deep=True)
    naive.reward.use_listener = False
    naive.grpo.output_dir = str(dirs["grpo_naive"])
    shaped = cfg.model_copy(deep=True)
    shaped.reward.use_listener = True
    shaped.grpo.output_dir = str(dirs["grpo_listener"])
    listener_model, listener_processor = load_vlm_and_processor(dirs["listener"])
    listener = LocalListener(listener_model, listener_processor, cfg.prompts, batch_size=32)
    _stage(
        "grpo_naive",
        dirs["grpo_naive"] / "final",
        lambda: run_grpo(naive, train_pairs[: budget["grpo_pairs"]]),
        timings,
        plan["grpo_naive"]["fingerprint"],
    )
    _stage(
        "grpo_listener",
        dirs["grpo_listener"] / "final",
        lambda: run_grpo(shaped, train_pairs[: budget["grpo_pairs"]], listener_backend=listener),
        timings,
        plan["grpo_listener"]["fingerprint"],
    )

    results: dict = {}
    scorer_model, scorer_processor = load_vlm_and_processor(dirs["single_image_scorer"])
    scorer = SingleImageScorer(scorer_model, scorer_processor, cfg.prompts)
    results["single_image_scorer"] = {
        s: {"greedy": evaluate_scorer(scorer, p)} for s, p in eval_pairs.items()
    }
    paths = {"sft": dirs["sft"] / "final", "grpo_naive": dirs["grpo_naive"] / "final"}
    paths["grpo_listener"] = dirs["grpo_listener"] / "final"
    for name in JUDGES:
        start, cpu = time.time(), time.process_time()
        judge = PreferenceJudge.from_pretrained(str(paths[name]), cfg.prompts, cfg.judge, batch_size=32)
        results[name] = {}
        for split, pairs in eval_pairs.items():
            results[name][split] = {
                "greedy": evaluate_judge(judge, pairs, listener, n_boot=1000, seed=seed),
                "sampled": evaluate_sampled(
                    judge, pairs, listener, budget["k_samples"], cfg.grpo.temperature, seed=seed
                ),
            }
        timings[f"eval_{name}"] = time.time() - start
        timings[f"eval_{name}_cpu"] = time.process_time() - cpu
    # reference points: the listener alone (empty reasoning) and the annotators' agreement with the truth
    reference: dict = {}
    for split, pairs in eval_pairs.items():
        choice = listener_choices(listener, pairs)
        labels = np.array([p.label for p in pairs])
        truth = np.array([1 if p.faithful[0] else 2 for p in pairs])
        reference[split] = {
            "listener_images_only_accuracy": float((choice == labels).mean()),
            "annotator_agreement_with_faithful": float((labels == truth).mean()),
        }
    training = {
        name: _train_log_summary(dirs[name] / "log_history.json") for name in ("grpo_naive", "grpo_listener")
    }
    report = {
        "package": "diffalign-listener-reward",
        "mode": "quick" if quick else "full",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "note": "wall times taken on a shared, loaded 2-core machine; *_cpu entries are process CPU time",
        },
        "seed": seed,
        "data_seed": cfg.data.seed,
        "budget": budget,
        "grpo_steps": cfg.grpo.max_steps,
        "stages": plan,
        "config": cfg.model_dump(mode="json"),
        "results": results,
        "paired": paired_differences([results]),
        "reference": reference,
        "gates": gates,
        "training": training,
        "baseline_for": {"grpo_listener": "grpo_naive", "grpo_naive": "sft", "sft": "single_image_scorer"},
        "timings_s": timings,
        "wall_time_s": time.time() - started,
        "cpu_time_s": time.process_time() - cpu_started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(summary_table(report))
    return report


def aggregate(reports: list[dict], n_boot: int = 1000) -> dict:
    """Seeds of the same budget -> per judge, split and metric: per-seed values, their mean and sample sd;
    paired differences between judges pooled over seeds (pairs resampled within each seed); and whether
    the target ordering holds with intervals that exclude zero."""
    if not reports:
        raise ValueError("aggregate needs at least one bench report")
    budgets = {json.dumps(r["budget"], sort_keys=True) for r in reports}
    if len(budgets) > 1:
        raise ValueError("reports were run with different budgets; aggregate only seeds of one budget")
    seeds = [r["seed"] for r in reports]
    if len(set(seeds)) != len(seeds) or len({r.get("data_seed") for r in reports}) != len(reports):
        raise ValueError(f"reports must come from distinct seeds with distinct data seeds; got seeds {seeds}")

    def stats(values):
        v = np.asarray([x for x in values if x is not None], dtype=float)
        if v.size == 0:
            return None
        sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
        return {"per_seed": v.tolist(), "mean": float(v.mean()), "sd": sd, "n": int(v.size)}

    out: dict = {"seeds": seeds, "budget": reports[0]["budget"], "judges": {}}
    for name, splits in reports[0]["results"].items():
        out["judges"][name] = {}
        for split in splits:
            row = {
                "greedy_accuracy": stats([r["results"][name][split]["greedy"]["accuracy"] for r in reports])
            }
            if "sampled" in splits[split]:
                row["greedy_disagreement"] = stats(
                    [r["results"][name][split]["greedy"].get("contradiction_rate") for r in reports]
                )
                for metric in (
                    "sampled_accuracy",
                    "majority_accuracy",
                    "listener_disagreement",
                    "self_contradiction",
                ):
                    row[metric] = stats(
                        [r["results"][name][split]["sampled"][metric]["value"] for r in reports]
                    )
                row["entropy_per_token"] = stats(
                    [r["results"][name][split]["sampled"]["entropy_per_token"] for r in reports]
                )
            out["judges"][name][split] = row
    out["paired"] = paired_differences([r["results"] for r in reports], n_boot)
    out["training"] = {
        name: {
            key: stats(
                [(r["training"][name] or {}).get("summary", {}).get(key, {}).get("mean") for r in reports]
            )
            for key in ("listener_rank_change", "listener_rank_flip", "kl", "entropy", "frac_reward_zero_std")
        }
        for name in ("grpo_naive", "grpo_listener")
    }
    out["target"] = target_check(out["paired"])
    out["fingerprints"] = {r["seed"]: {k: v["fingerprint"] for k, v in r["stages"].items()} for r in reports}
    return out


def target_check(paired: dict) -> dict:
    """The issue's target on each split: listener >= naive and naive > SFT on sampled accuracy, and lower
    self-contradiction / listener disagreement for the listener run; ``holds`` uses the point estimate,
    ``significant`` asks the 95% interval to exclude zero in the stated direction."""
    out = {}
    for split in paired["listener_minus_naive"]:
        checks = {
            "listener_ge_naive_sampled_accuracy": (
                paired["listener_minus_naive"][split]["sampled_accuracy"],
                +1,
                True,
            ),
            "naive_gt_sft_sampled_accuracy": (
                paired["naive_minus_sft"][split]["sampled_accuracy"],
                +1,
                False,
            ),
            "listener_lower_self_contradiction": (
                paired["listener_minus_naive"][split]["self_contradiction"],
                -1,
                False,
            ),
            "listener_lower_disagreement": (
                paired["listener_minus_naive"][split]["listener_disagreement"],
                -1,
                False,
            ),
        }
        out[split] = {}
        for name, (d, sign, weak) in checks.items():
            value, (lo, hi) = d["value"], d["ci"]
            holds = value * sign >= 0 if weak else value * sign > 0
            significant = lo > 0 if sign > 0 else hi < 0
            out[split][name] = {
                "holds": bool(holds),
                "significant": bool(significant),
                "diff": value,
                "ci": [lo, hi],
            }
    return out


METRIC_COLUMNS = (
    "greedy_accuracy",
    "sampled_accuracy",
    "majority_accuracy",
    "self_contradiction",
    "listener_disagreement",
)


def aggregate_table(agg: dict) -> str:
    def cell(m):
        return "n/a" if m is None else f"{m['mean']:.3f} ({m['sd']:.3f})"

    lines = [
        f"seeds {agg['seeds']}: mean (sd over seeds)",
        "",
        "| judge | split | " + " | ".join(METRIC_COLUMNS) + " | entropy/token |",
        "|---|---|" + "---|" * (len(METRIC_COLUMNS) + 1),
    ]
    for name, splits in agg["judges"].items():
        for split, m in splits.items():
            cells = [cell(m.get(c)) for c in METRIC_COLUMNS] + [cell(m.get("entropy_per_token"))]
            lines.append(f"| {name} | {split} | " + " | ".join(cells) + " |")
    lines += ["", "paired differences pooled over seeds [95% paired bootstrap]", ""]
    lines += [
        "| difference | split | " + " | ".join(METRIC_COLUMNS) + " |",
        "|---|---|" + "---|" * len(METRIC_COLUMNS),
    ]
    for label, splits in agg["paired"].items():
        for split, m in splits.items():
            cells = [
                f"{m[c]['value']:+.3f} [{m[c]['ci'][0]:+.3f}, {m[c]['ci'][1]:+.3f}]" for c in METRIC_COLUMNS
            ]
            lines.append(f"| {label} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    lines = [
        "| judge | split | greedy acc [95% CI] | sampled acc [CI] | majority-of-k | self-contradiction | listener disagreement | entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, splits in report["results"].items():
        for split, r in splits.items():
            g = r["greedy"]
            lo, hi = g["accuracy_ci_wilson"]
            row = f"| {name} | {split} | {g['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |"
            smp = r.get("sampled")
            if smp is None:
                row += " n/a | n/a | n/a | n/a | n/a |"
            else:
                for metric in (
                    "sampled_accuracy",
                    "majority_accuracy",
                    "self_contradiction",
                    "listener_disagreement",
                ):
                    m = smp[metric]
                    row += f" {m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}] |"
                row += f" {smp['entropy_per_token']:.3f} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/listener-reward-seed0.json"))
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
        "--no-gate",
        action="store_true",
        help="go on when the captioning base or the listener fails its check (recorded in the report)",
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
        try:
            parsed = float(value) if key in FLOAT_BUDGET else int(value)
        except ValueError:
            parsed = None
        if key not in FULL or parsed is None or parsed < 0:
            parser.error(f"--budget expects KEY=N (N >= 0) with KEY in {sorted(FULL)}; got {item!r}")
        budget[key] = parsed
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(args.out, args.quick, args.work, args.seed, budget, args.overrides, gate=not args.no_gate)
    except GateError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
