"""Evaluation: pairwise accuracy (ImageReward tie rule), HPDv2 inversion score, Rapidata vote accuracy,
listener-disagreement (contradiction) rate, and confidence intervals. Metric functions are pure.

Label convention here: ``label`` 1 means image 1 (``image_a``) is preferred, 2 means image 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from diffalign.listener_reward.prompts import extract_answer
from diffalign.listener_reward.rewards import contradiction_rate


def pairwise_correct(score_a: Sequence[float], score_b: Sequence[float], label: Sequence[int]) -> np.ndarray:
    """Per pair: 1 if the model's higher score is on the preferred image; a model tie counts as wrong
    (ImageReward ``test.py``)."""
    a, b, y = np.asarray(score_a, float), np.asarray(score_b, float), np.asarray(label, int)
    if not (a.shape == b.shape == y.shape):
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, {y.shape}")
    if not np.isin(y, (1, 2)).all():
        raise ValueError("labels must be 1 (image 1 preferred) or 2 (image 2 preferred)")
    return np.where(y == 1, a > b, b > a).astype(float)


def pairwise_accuracy(score_a, score_b, label) -> float:
    correct = pairwise_correct(score_a, score_b, label)
    return float(correct.mean()) if correct.size else float("nan")


def scores_to_ranks(scores: Sequence[float]) -> list[int]:
    """0 = best; equal scores keep their input order (a stable descending sort)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    ranks = [0] * len(scores)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def inversion_score(predicted_ranks: Sequence[float], human_ranks: Sequence[float]) -> float:
    """HPDv2's metric for one prompt: 1 - (# pairs ordered oppositely) / (n(n-1)/2). Pairs tied in
    either ranking are not inversions."""
    if len(predicted_ranks) != len(human_ranks):
        raise ValueError(f"{len(predicted_ranks)} predicted ranks for {len(human_ranks)} human ranks")
    n = len(predicted_ranks)
    if n < 2:
        raise ValueError("inversion_score needs at least two images")
    inverted = 0
    for i in range(n - 1):
        for j in range(i + 1, n):
            p = predicted_ranks[i] - predicted_ranks[j]
            h = human_ranks[i] - human_ranks[j]
            if p * h < 0:
                inverted += 1
    return 1.0 - inverted / (n * (n - 1) / 2)


def mean_inversion_score(
    model_scores: Sequence[Sequence[float]], human_ranks: Sequence[Sequence[float]]
) -> float:
    """Average over prompts of the inversion score between the model's ranking (higher score = better)
    and the human ranking (lower rank = better)."""
    values = [inversion_score(scores_to_ranks(s), r) for s, r in zip(model_scores, human_ranks)]
    return float(np.mean(values)) if values else float("nan")


def vote_accuracy(p_image1: Sequence[float], votes1: Sequence[float], votes2: Sequence[float]) -> dict:
    """Rapidata-style evaluation from vote counts.

    ``accuracy``: majority-vote label, vote ties dropped, model tie (p = 0.5) wrong.
    ``vote_weighted``: share of all individual votes that agree with the model's choice.
    """
    p = np.asarray(p_image1, float)
    v1, v2 = np.asarray(votes1, float), np.asarray(votes2, float)
    keep = v1 != v2
    label = np.where(v1 > v2, 1, 2)[keep]
    correct = pairwise_correct(p[keep], 1.0 - p[keep], label)
    choice1, choice2 = p > 0.5, p < 0.5
    agreeing = (v1 * choice1 + v2 * choice2).sum()
    total = (v1 + v2).sum()
    return {
        "accuracy": float(correct.mean()) if correct.size else float("nan"),
        "n_pairs": int(keep.sum()),
        "vote_weighted": float(agreeing / total) if total > 0 else float("nan"),
        "n_votes": float(total),
    }


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if n <= 0:
        return (float("nan"), float("nan"))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(values, float)
    if x.size == 0 or n_boot <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n_boot, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def evaluate_judge(
    judge, pairs, listener=None, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Pairwise accuracy (+ Wilson and bootstrap CIs), format rate, and, with a listener, the
    contradiction rate of the judge's generated answers. Vote accuracy when pairs carry votes."""
    from diffalign.listener_reward.prompts import is_well_formed

    results = judge.compare_batch(
        [p.prompt for p in pairs], [p.images()[0] for p in pairs], [p.images()[1] for p in pairs]
    )
    p_a = np.array([r.p_image_a for r in results])
    labels = np.array([p.label for p in pairs])
    correct = pairwise_correct(p_a, 1 - p_a, labels)
    k, n = int(correct.sum()), len(correct)
    out = {
        "n": n,
        "accuracy": k / n if n else float("nan"),
        "accuracy_ci_wilson": wilson_interval(k, n, confidence),
        "accuracy_ci_bootstrap": bootstrap_ci(correct, n_boot, confidence, seed),
        "format_rate": float(
            np.mean([is_well_formed(r.completion, judge.prompts.answer_format) for r in results])
        ),
        "generated_answer_accuracy": float(
            np.mean([r.generated_choice == y for r, y in zip(results, labels)])
        ),
    }
    if listener is not None:
        probs = listener.probabilities(
            [p.prompt for p in pairs], [p.images() for p in pairs], [r.reasoning for r in results]
        )
        stats = contradiction_rate([extract_answer(r.completion) for r in results], probs)
        out["contradiction_rate"] = stats["contradiction_rate"]
        out["contradiction_n"] = stats["n"]
        valid = [i for i, r in enumerate(results) if r.generated_choice in (1, 2)]
        if valid:
            disagree = [float(int(torch.argmax(probs[i])) + 1 != results[i].generated_choice) for i in valid]
            out["contradiction_ci_bootstrap"] = bootstrap_ci(disagree, n_boot, confidence, seed)
        out["listener_accuracy_on_reasoning"] = float(
            np.mean((probs[:, 0] > probs[:, 1]).numpy() == (labels == 1))
        )
    if pairs and all(p.votes is not None for p in pairs):
        out["votes"] = vote_accuracy(p_a, [p.votes[0] for p in pairs], [p.votes[1] for p in pairs])
    return out


def evaluate_rankings(judge, records, anchors=None) -> float:
    """HPDv2 inversion score of a judge over ranked records (win-probability scores per prompt: round
    robin, or against ``anchors`` when given)."""
    model_scores, human = [], []
    for record in records:
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in record.images]
        if anchors:
            scores, _ = judge.rank_by_anchors(record.prompt, images, anchors)
        else:
            scores = judge.round_robin_scores(record.prompt, images)
        model_scores.append(scores.tolist())
        human.append(record.ranks)
    return mean_inversion_score(model_scores, human)


__all__ = [
    "bootstrap_ci",
    "evaluate_judge",
    "evaluate_rankings",
    "inversion_score",
    "mean_inversion_score",
    "pairwise_accuracy",
    "pairwise_correct",
    "scores_to_ranks",
    "vote_accuracy",
    "wilson_interval",
]
