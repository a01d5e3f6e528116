"""Evaluation: pairwise accuracy (ImageReward tie rule), HPDv2 inversion score, Rapidata vote accuracy,
listener-disagreement (contradiction) rate, and confidence intervals. Metric functions are pure.

Label convention here: ``label`` 1 means image 1 (``image_a``) is preferred, 2 means image 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from diffalign.listener_reward.prompts import extract_answer, strip_answer
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
        "per_pair_correct": correct.tolist(),
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
        listener_choice = (probs[:, 1] > probs[:, 0]).long() + 1
        out["per_pair_parsed"] = [float(r.generated_choice in (1, 2)) for r in results]
        out["per_pair_disagree"] = [
            float(r.generated_choice in (1, 2) and int(c) != r.generated_choice)
            for r, c in zip(results, listener_choice)
        ]
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


def ratio_bootstrap(
    num: Sequence[float],
    den: Sequence[float],
    num_b: Sequence[float] | None = None,
    den_b: Sequence[float] | None = None,
    strata: Sequence[int] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Point value and percentile-bootstrap interval of a ratio of sums over pairs, ``sum(num) / sum(den)``,
    or, with ``num_b``/``den_b`` measured on the same pairs, of the paired difference of two such ratios.

    Pairs are resampled together (a paired bootstrap), within each stratum when ``strata`` is given (e.g. the
    seed each pair came from); the statistic is then the mean over strata of the per-stratum value, so every
    seed weighs the same. Accuracy is ``num`` = correct samples, ``den`` = samples per pair."""
    a_num, a_den = np.asarray(num, float), np.asarray(den, float)
    paired = num_b is not None
    b_num = np.asarray(num_b if paired else np.zeros_like(a_num), float)
    b_den = np.asarray(den_b if paired else np.ones_like(a_den), float)
    if not (a_num.shape == a_den.shape == b_num.shape == b_den.shape) or a_num.ndim != 1:
        raise ValueError("num, den (and num_b, den_b) must be 1-d arrays over the same pairs")
    groups = np.zeros(a_num.size, int) if strata is None else np.asarray(strata)
    if groups.shape != a_num.shape:
        raise ValueError(f"strata has {groups.size} entries for {a_num.size} pairs")
    index = [np.flatnonzero(groups == g) for g in np.unique(groups)]

    def value(rows_per_stratum) -> float:
        parts = []
        for rows in rows_per_stratum:
            da, db = a_den[rows].sum(), b_den[rows].sum()
            if da == 0 or db == 0:
                return float("nan")
            parts.append(a_num[rows].sum() / da - (b_num[rows].sum() / db if paired else 0.0))
        return float(np.mean(parts))

    point = value(index)
    rng = np.random.default_rng(seed)
    draws = np.array(
        [value([rows[rng.integers(0, rows.size, rows.size)] for rows in index]) for _ in range(n_boot)]
    )
    draws = draws[np.isfinite(draws)]
    alpha = (1 - confidence) / 2
    ci = (
        (float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha)))
        if draws.size
        else (np.nan,) * 2
    )
    return {
        "value": point,
        "ci": [float(ci[0]), float(ci[1])],
        "n_pairs": int(a_num.size),
        "strata": len(index),
    }


def sampled_pair_counts(
    answers: np.ndarray,
    labels: Sequence[int],
    listener_choices: np.ndarray,
    verdicts: np.ndarray | None = None,
) -> dict:
    """Per-pair counts from ``k`` sampled completions per pair. ``answers``, ``listener_choices`` and
    ``verdicts`` are ``[N, k]`` with 1 or 2 (0 = no parsable answer / undecided reasoning).

    * ``correct``: samples whose written answer equals the label (unparsable = wrong), of ``k``;
    * ``majority``: 1 if the strict majority of the parsed answers is the label (tie or none = wrong);
    * ``disagree`` / ``parsed``: samples whose answer differs from the listener's argmax on the same
      answer-free reasoning, of samples with a parsed answer (the paper's listener-disagreement rate);
    * ``contradict`` / ``decided``: samples whose answer differs from the image their own reasoning's
      verdicts support, of samples with both an answer and a decided reasoning (no listener involved)."""
    a = np.asarray(answers, int)
    y = np.asarray(labels, int)
    lis = np.asarray(listener_choices, int)
    if a.ndim != 2 or a.shape[0] != y.size or lis.shape != a.shape:
        raise ValueError(f"answers {a.shape}, listener choices {lis.shape} and {y.size} labels do not match")
    k = a.shape[1]
    parsed = a > 0
    votes1, votes2 = (a == 1).sum(1), (a == 2).sum(1)
    majority = np.where(votes1 > votes2, 1, np.where(votes2 > votes1, 2, 0))
    out = {
        "correct": (a == y[:, None]).sum(1).astype(float),
        "samples": np.full(y.size, float(k)),
        "majority": (majority == y).astype(float),
        "ones": np.ones(y.size),
        "disagree": (parsed & (lis != a)).sum(1).astype(float),
        "parsed": parsed.sum(1).astype(float),
    }
    if verdicts is not None:
        v = np.asarray(verdicts, int)
        if v.shape != a.shape:
            raise ValueError(f"verdicts {v.shape} do not match answers {a.shape}")
        decided = parsed & (v > 0)
        out["contradict"] = (decided & (v != a)).sum(1).astype(float)
        out["decided"] = decided.sum(1).astype(float)
    return out


# ratio metrics of the sampled evaluation: name -> (numerator, denominator) in sampled_pair_counts
SAMPLED_METRICS = {
    "sampled_accuracy": ("correct", "samples"),
    "majority_accuracy": ("majority", "ones"),
    "listener_disagreement": ("disagree", "parsed"),
    "self_contradiction": ("contradict", "decided"),
}


@torch.no_grad()
def sample_completions(
    model,
    processor,
    messages_batch,
    images,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[list[list[str]], dict]:
    """``k`` completions per prompt, sampled from the full softmax at ``temperature`` (no top-k/top-p, as
    GRPO rollouts), and the policy's mean per-token entropy (nats, over generated tokens up to and
    including EOS). Returns (``[N][k]`` texts, ``{"entropy_per_token", "tokens"}``)."""
    from diffalign.listener_reward.modeling import encode, render_prompts

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = next(model.parameters()).device
    flat_messages = [m for m in messages_batch for _ in range(k)]
    flat_images = [im for im in images for _ in range(k)]
    eos = model.generation_config.eos_token_id
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    entropy_sum, token_count = 0.0, 0
    try:
        for start in range(0, len(flat_messages), batch_size):
            prompts = render_prompts(processor, flat_messages[start : start + batch_size])
            inputs = encode(processor, prompts, flat_images[start : start + batch_size], device)
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[:, inputs["input_ids"].shape[1] :].cpu()
            logits = torch.stack(out.logits, dim=1).float().cpu() / temperature
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)  # [B, T]
            is_eos = torch.isin(new, eos_ids)
            after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
            mask = ~after_eos
            entropy_sum += float(entropy[mask].sum())
            token_count += int(mask.sum())
            texts.extend(processor.batch_decode(new, skip_special_tokens=True))
    finally:
        torch.set_rng_state(generator_state)
    grouped = [texts[i * k : (i + 1) * k] for i in range(len(messages_batch))]
    return grouped, {"entropy_per_token": entropy_sum / max(token_count, 1), "tokens": token_count}


def evaluate_sampled(
    judge,
    pairs,
    listener,
    k: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    n_boot: int = 1000,
    confidence: float = 0.95,
    verdicts: bool = True,
) -> dict:
    """Sampled decoding of a reasoner judge: ``k`` completions per pair, scored by their written answers.
    Mean accuracy, majority-of-k accuracy, listener disagreement and (shapes world, ``verdicts``) the
    self-contradiction between the reasoning's verdicts and the answer, each with a paired-bootstrap
    interval over pairs, the policy entropy, and the per-pair counts (for paired differences)."""
    from diffalign.listener_reward.data import reasoning_verdict
    from diffalign.listener_reward.prompts import reasoner_messages

    messages = [reasoner_messages(p.prompt, judge.prompts) for p in pairs]
    images = [p.images() for p in pairs]
    texts, entropy = sample_completions(
        judge.model,
        judge.processor,
        messages,
        images,
        k,
        judge.cfg.max_new_tokens,
        temperature,
        judge.batch_size,
        seed,
    )
    flat = [t for row in texts for t in row]
    reasonings = [strip_answer(t) for t in flat]
    probs = listener.probabilities(
        [p.prompt for p in pairs for _ in range(k)], [im for im in images for _ in range(k)], reasonings
    )
    listener_choice = ((probs[:, 1] > probs[:, 0]).long() + 1).numpy().reshape(len(pairs), k)
    answers = np.array([extract_answer(t) or 0 for t in flat]).reshape(len(pairs), k)
    verdict = (
        np.array([reasoning_verdict(r) or 0 for r in reasonings]).reshape(len(pairs), k) if verdicts else None
    )
    counts = sampled_pair_counts(answers, [p.label for p in pairs], listener_choice, verdict)
    out: dict = {"n": len(pairs), "k": k, "temperature": temperature, **entropy}
    for name, (num, den) in SAMPLED_METRICS.items():
        if num in counts:
            out[name] = ratio_bootstrap(
                counts[num], counts[den], n_boot=n_boot, confidence=confidence, seed=seed
            )
    out["undecided_reasoning_rate"] = float(np.mean(verdict == 0)) if verdicts else None
    out["per_pair"] = {key: value.tolist() for key, value in counts.items()}
    out["examples"] = flat[:4]
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
    "SAMPLED_METRICS",
    "bootstrap_ci",
    "evaluate_judge",
    "evaluate_sampled",
    "evaluate_rankings",
    "inversion_score",
    "mean_inversion_score",
    "pairwise_accuracy",
    "pairwise_correct",
    "ratio_bootstrap",
    "sample_completions",
    "sampled_pair_counts",
    "scores_to_ranks",
    "vote_accuracy",
    "wilson_interval",
]
