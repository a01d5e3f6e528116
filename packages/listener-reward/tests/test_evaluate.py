import itertools

import numpy as np
import pytest

from diffalign.listener_reward.evaluate import (
    bootstrap_ci,
    inversion_score,
    mean_inversion_score,
    pairwise_accuracy,
    pairwise_correct,
    scores_to_ranks,
    vote_accuracy,
    wilson_interval,
)


def test_pairwise_accuracy_imagereward_tie_rule():
    a = [0.9, 0.2, 0.5, 0.7]
    b = [0.1, 0.8, 0.5, 0.3]
    labels = [1, 2, 1, 2]
    assert pairwise_correct(a, b, labels).tolist() == [1, 1, 0, 0]
    assert pairwise_accuracy(a, b, labels) == 0.5
    # negative control: counting a tie as half-correct gives a different number
    half = np.mean([1, 1, 0.5, 0])
    assert pairwise_accuracy(a, b, labels) != half
    with pytest.raises(ValueError):
        pairwise_correct([1], [0], [0])


def _brute_inversions(pred, human):
    n = len(pred)
    bad = sum(
        1
        for i, j in itertools.combinations(range(n), 2)
        if (pred[i] < pred[j] and human[i] > human[j]) or (pred[i] > pred[j] and human[i] < human[j])
    )
    return 1 - bad / (n * (n - 1) / 2)


def test_inversion_score_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 7))
        pred = rng.integers(0, 4, n).tolist()
        human = rng.integers(0, 4, n).tolist()
        assert inversion_score(pred, human) == pytest.approx(_brute_inversions(pred, human))
    assert inversion_score([0, 1, 2], [0, 1, 2]) == 1.0
    assert inversion_score([2, 1, 0], [0, 1, 2]) == 0.0
    # negative control: Kendall-style counting of ties as half inversions differs when ties exist
    assert inversion_score([0, 0, 1], [0, 1, 2]) == pytest.approx(1.0)


def test_mean_inversion_score_uses_higher_score_is_better():
    scores = [[0.9, 0.5, 0.1], [0.1, 0.5, 0.9]]
    human_ranks = [[0, 1, 2], [0, 1, 2]]  # lower rank = better
    assert scores_to_ranks([0.9, 0.5, 0.1]) == [0, 1, 2]
    assert mean_inversion_score(scores, human_ranks) == pytest.approx(0.5)


def test_vote_accuracy():
    p = [0.8, 0.3, 0.6, 0.5]
    v1 = [7, 2, 5, 9]
    v2 = [3, 8, 5, 1]  # third pair is a vote tie -> dropped; fourth: model tie -> wrong
    out = vote_accuracy(p, v1, v2)
    assert out["n_pairs"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3)
    # vote-weighted: agreeing votes 7 + 8 + 5 (pair 3 chooses image 1) + 0 over all 40 votes
    assert out["vote_weighted"] == pytest.approx(20 / 40)


def test_wilson_interval_reference_values():
    lo, hi = wilson_interval(50, 100, 0.95)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    assert np.isnan(wilson_interval(0, 0)[0])


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 50)
    large = rng.integers(0, 2, 5000)
    lo, hi = bootstrap_ci(small, 500, seed=0)
    assert lo <= small.mean() <= hi
    lo2, hi2 = bootstrap_ci(large, 500, seed=0)
    assert hi2 - lo2 < hi - lo
    assert bootstrap_ci(small, 200, seed=3) == bootstrap_ci(small, 200, seed=3)


def _fake_report(seed, rng, budget):
    """A bench report as ``bench.run`` writes it, from random sampled answers (k=4, 30 pairs)."""
    from diffalign.listener_reward.evaluate import SAMPLED_METRICS, ratio_bootstrap, sampled_pair_counts

    results = {"single_image_scorer": {}}
    for judge, p in (("sft", 0.5), ("grpo_naive", 0.6), ("grpo_listener", 0.7)):
        results[judge] = {}
        for split in ("test_id", "test_ood"):
            labels = rng.integers(1, 3, 30)
            right = rng.random((30, 4)) < p
            answers = np.where(right, labels[:, None], 3 - labels[:, None])
            counts = sampled_pair_counts(
                answers, labels, rng.integers(1, 3, (30, 4)), rng.integers(0, 3, (30, 4))
            )
            greedy = (rng.random(30) < p).astype(float)
            sampled = {
                m: ratio_bootstrap(counts[n], counts[d], n_boot=50) for m, (n, d) in SAMPLED_METRICS.items()
            }
            sampled.update(
                entropy_per_token=float(rng.random()), per_pair={k: v.tolist() for k, v in counts.items()}
            )
            results[judge][split] = {
                "greedy": {
                    "accuracy": float(greedy.mean()),
                    "contradiction_rate": 0.1,
                    "per_pair_correct": greedy.tolist(),
                    "per_pair_disagree": [0.0] * 30,
                    "per_pair_parsed": [1.0] * 30,
                },
                "sampled": sampled,
            }
    for split in ("test_id", "test_ood"):
        results["single_image_scorer"][split] = {
            "greedy": {"accuracy": float(rng.random()), "contradiction_rate": None}
        }
    training = {
        "grpo_naive": None,
        "grpo_listener": {"summary": {"listener_rank_change": {"mean": 0.4 + seed}}},
    }
    stages = {"sft": {"fingerprint": f"fp{seed}"}}
    return {
        "seed": seed,
        "data_seed": seed,
        "budget": budget,
        "results": results,
        "training": training,
        "stages": stages,
    }


def test_bench_aggregate_over_seeds_matches_numpy():
    from diffalign.listener_reward.bench import aggregate, aggregate_table

    rng = np.random.default_rng(0)
    reports = [_fake_report(seed, rng, {"sft_steps": 10}) for seed in range(3)]
    agg = aggregate(reports, n_boot=100)
    acc = [r["results"]["sft"]["test_ood"]["sampled"]["sampled_accuracy"]["value"] for r in reports]
    got = agg["judges"]["sft"]["test_ood"]["sampled_accuracy"]
    assert np.isclose(got["mean"], np.mean(acc)) and np.isclose(got["sd"], np.std(acc, ddof=1))
    assert not np.isclose(got["sd"], np.std(acc))  # negative control: the population sd is not reported
    assert agg["judges"]["single_image_scorer"]["test_id"].keys() == {"greedy_accuracy"}
    diff = agg["paired"]["listener_minus_naive"]["test_id"]["greedy_accuracy"]
    want = np.mean(
        [
            np.mean(r["results"]["grpo_listener"]["test_id"]["greedy"]["per_pair_correct"])
            - np.mean(r["results"]["grpo_naive"]["test_id"]["greedy"]["per_pair_correct"])
            for r in reports
        ]
    )
    assert np.isclose(diff["value"], want) and diff["strata"] == 3
    assert agg["training"]["grpo_listener"]["listener_rank_change"]["per_seed"] == [0.4, 1.4, 2.4]
    check = agg["target"]["test_id"]["naive_gt_sft_sampled_accuracy"]
    assert check["holds"] == (agg["paired"]["naive_minus_sft"]["test_id"]["sampled_accuracy"]["value"] > 0)
    assert "listener_minus_naive" in aggregate_table(agg)
    reports[1]["budget"] = {"sft_steps": 20}
    with pytest.raises(ValueError, match="budget"):
        aggregate(reports)
    reports[1]["budget"] = {"sft_steps": 10}
    reports[1]["data_seed"] = 0  # two reports on the same data are not independent seeds
    with pytest.raises(ValueError, match="data seeds"):
        aggregate(reports)
