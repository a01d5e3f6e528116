"""Agreement between a scorer and human preferences.

* :func:`pairwise_accuracy` / :func:`ranking_accuracy` - the ImageReward test-set rule: over every
  pair of images with a strict human preference, a prediction is correct only if the model's scores
  are strictly ordered the same way; a **predicted tie counts as wrong**; human ties are skipped.
* :func:`inversion_score` - the HPDv2 test-set score per prompt: ``1 - discordant / (n (n - 1) / 2)``
  over all ``n (n - 1) / 2`` image pairs (pairs tied on either side are not discordant), averaged over
  prompts.
* :func:`vote_accuracy` - for Rapidata-style vote data: the majority-agreement accuracy (pairs with
  tied votes skipped, predicted ties wrong) and the vote-weighted agreement, the share of individual
  votes cast for the image the model prefers (a predicted tie earns half the votes).
* :func:`wilson_interval` and :func:`bootstrap_interval` - confidence intervals; the bootstrap
  resamples whole prompts (clusters), since pairs from one prompt are correlated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffalign.core.metrics.preference_data import PreferenceRecord

__all__ = [
    "AccuracyResult",
    "VoteAccuracy",
    "bootstrap_interval",
    "inversion_score",
    "pairwise_accuracy",
    "pairwise_outcomes",
    "ranking_accuracy",
    "vote_accuracy",
    "wilson_interval",
]


@dataclass(frozen=True)
class AccuracyResult:
    """An accuracy with its number of judged pairs and a confidence interval."""

    accuracy: float
    correct: float
    total: int
    low: float
    high: float


def wilson_interval(successes: float, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if total <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= total:
        raise ValueError(f"successes ({successes}) must lie in [0, total={total}]")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    groups: Sequence[Sequence[float]],
    statistic: Callable[[list[float]], float] | None = None,
    *,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap of ``statistic`` (default: mean of all values) resampling whole groups."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return (float("nan"), float("nan"))
    statistic = statistic or (lambda values: float(np.mean(values)))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(num_resamples):
        picks = rng.integers(0, len(groups), size=len(groups))
        stats.append(statistic([v for i in picks for v in groups[i]]))
    alpha = (1 - confidence) / 2
    return (float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)))


def pairwise_outcomes(human_strength: Sequence[float], model_scores: Sequence[float]) -> list[int]:
    """1/0 per image pair with a strict human preference: 1 iff the model orders it strictly the same.

    ``human_strength``: larger = preferred (use ``-rank`` for rank lists or the vote counts).
    """
    if len(human_strength) != len(model_scores):
        raise ValueError(f"{len(human_strength)} human values for {len(model_scores)} model scores")
    out = []
    n = len(human_strength)
    for i in range(n):
        for j in range(i + 1, n):
            h = human_strength[i] - human_strength[j]
            if h == 0:
                continue
            m = model_scores[i] - model_scores[j]
            out.append(int(m != 0 and (m > 0) == (h > 0)))
    return out


def pairwise_accuracy(
    scores_a: Sequence[float], scores_b: Sequence[float], labels: Sequence[int], confidence: float = 0.95
) -> AccuracyResult:
    """Accuracy over pairs: ``labels[k]`` is 0 when image a was preferred, 1 when b; ties count wrong."""
    if not (len(scores_a) == len(scores_b) == len(labels)):
        raise ValueError("scores_a, scores_b and labels must have the same length")
    if any(label not in (0, 1) for label in labels):
        raise ValueError("labels must be 0 (a preferred) or 1 (b preferred)")
    correct = sum(
        int(a != b and (a > b) == (label == 0))
        for a, b, label in zip(scores_a, scores_b, labels, strict=True)
    )
    return _result(correct, len(labels), confidence)


def _result(correct: float, total: int, confidence: float) -> AccuracyResult:
    low, high = wilson_interval(correct, total, confidence)
    return AccuracyResult(
        accuracy=correct / total if total else float("nan"), correct=correct, total=total, low=low, high=high
    )


def _check_scores(records: Sequence[PreferenceRecord], scores: Sequence[Sequence[float]]) -> None:
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} records but {len(scores)} score lists")
    for n, (record, s) in enumerate(zip(records, scores, strict=True)):
        if len(s) != len(record.images):
            raise ValueError(f"record {n}: {len(record.images)} images but {len(s)} scores")


def ranking_accuracy(
    records: Sequence[PreferenceRecord],
    scores: Sequence[Sequence[float]],
    *,
    confidence: float = 0.95,
    interval: str = "wilson",
    seed: int = 0,
) -> AccuracyResult:
    """ImageReward-rule pairwise accuracy of model ``scores`` (one list per record, higher = better).

    ``interval`` is ``"wilson"`` (pairs treated as independent) or ``"bootstrap"`` (prompts resampled).
    """
    _check_scores(records, scores)
    per_record = [pairwise_outcomes(r.strengths(), list(s)) for r, s in zip(records, scores, strict=True)]
    flat = [v for group in per_record for v in group]
    result = _result(sum(flat), len(flat), confidence)
    if interval == "bootstrap":
        low, high = bootstrap_interval(per_record, confidence=confidence, seed=seed)
        result = AccuracyResult(result.accuracy, result.correct, result.total, low, high)
    elif interval != "wilson":
        raise ValueError(f"interval must be 'wilson' or 'bootstrap', got {interval!r}")
    return result


def _descending_positions(scores: Sequence[float]) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    position = [0] * len(scores)
    for pos, idx in enumerate(order):
        position[idx] = pos
    return position


def inversion_score(
    records: Sequence[PreferenceRecord],
    scores: Sequence[Sequence[float]],
    confidence: float = 0.95,
    seed: int = 0,
) -> AccuracyResult:
    """HPDv2-style mean per-prompt inversion score, with a prompt-bootstrap interval.

    Model scores become a predicted ranking (0 = highest score); per prompt the score is
    ``1 - discordant / (n (n - 1) / 2)`` against the human ranks (lower = preferred).
    """
    _check_scores(records, scores)
    per_prompt = []
    for record, s in zip(records, scores, strict=True):
        if record.ranks is None:
            raise ValueError("inversion_score needs ranked records (ImageReward or HPDv2 sets)")
        predicted = _descending_positions(list(s))
        human = record.ranks
        n = len(human)
        discordant = sum(
            1
            for i in range(n)
            for j in range(i + 1, n)
            if (predicted[i] - predicted[j]) * (human[i] - human[j]) < 0
        )
        per_prompt.append(1 - discordant / (n * (n - 1) / 2))
    low, high = bootstrap_interval([[v] for v in per_prompt], confidence=confidence, seed=seed)
    return AccuracyResult(float(np.mean(per_prompt)), float(np.sum(per_prompt)), len(per_prompt), low, high)


@dataclass(frozen=True)
class VoteAccuracy:
    majority: AccuracyResult
    vote_weighted: float
    votes: float


def vote_accuracy(
    records: Sequence[PreferenceRecord], scores: Sequence[Sequence[float]], confidence: float = 0.95
) -> VoteAccuracy:
    """Rapidata-style accuracy for two-image vote records (see module docstring)."""
    _check_scores(records, scores)
    majority_correct, judged, agreeing_votes, all_votes = 0, 0, 0.0, 0.0
    for n, (record, s) in enumerate(zip(records, scores, strict=True)):
        if record.votes is None or len(record.votes) != 2:
            raise ValueError(f"record {n}: vote_accuracy needs two-image records with votes")
        v1, v2 = record.votes
        a, b = s
        if v1 != v2:
            judged += 1
            majority_correct += int(a != b and (a > b) == (v1 > v2))
        all_votes += v1 + v2
        agreeing_votes += v1 if a > b else v2 if b > a else (v1 + v2) / 2
    return VoteAccuracy(
        majority=_result(majority_correct, judged, confidence),
        vote_weighted=agreeing_votes / all_votes if all_votes else float("nan"),
        votes=all_votes,
    )
