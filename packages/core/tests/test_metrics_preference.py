"""Preference accuracy: ImageReward tie rule, HPDv2 inversion score, vote accuracy, intervals."""

import random

import numpy as np
import pytest

from diffalign.core.metrics.preference import (
    bootstrap_interval,
    inversion_score,
    pairwise_accuracy,
    pairwise_outcomes,
    ranking_accuracy,
    vote_accuracy,
    wilson_interval,
)
from diffalign.core.metrics.preference_data import PreferenceRecord


def _record(ranks=None, votes=None):
    n = len(ranks if ranks is not None else votes)
    return PreferenceRecord(prompt="p", images=[f"{k}.png" for k in range(n)], ranks=ranks, votes=votes)


def _imagereward_rule(ranks, rewards):
    """The ImageReward test loop, written out literally: rank 1 = best, equal rewards are wrong."""
    total = correct = 0
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] > ranks[j]:  # j preferred
                total += 1
                correct += rewards[i] < rewards[j]
            elif ranks[i] < ranks[j]:  # i preferred
                total += 1
                correct += rewards[i] > rewards[j]
    return correct, total


def _random_data(seed, n_records=60):
    rng = random.Random(seed)
    ranks, rewards = [], []
    for _ in range(n_records):
        k = rng.randint(2, 7)
        ranks.append([rng.randint(1, 4) for _ in range(k)])  # many human ties
        rewards.append([rng.randint(0, 3) for _ in range(k)])  # many predicted ties
    return ranks, rewards


def test_hand_worked_tie_rule():
    # human: 0 > 1 > 2; model ties 0 and 1 -> that pair is wrong, the other two right
    result = ranking_accuracy([_record(ranks=[1, 2, 3])], [[3.0, 3.0, 1.0]])
    assert result.correct == 2 and result.total == 3 and result.accuracy == pytest.approx(2 / 3)
    # human tie between 0 and 1 is skipped
    assert pairwise_outcomes([-1, -1, -2], [0.0, 1.0, 2.0]) == [0, 0]


def test_ranking_accuracy_matches_literal_imagereward_loop():
    ranks, rewards = _random_data(0)
    records = [_record(ranks=r) for r in ranks]
    correct = total = 0
    for r, s in zip(ranks, rewards):
        c, t = _imagereward_rule(r, s)
        correct, total = correct + c, total + t
    result = ranking_accuracy(records, rewards)
    assert (result.correct, result.total) == (correct, total)
    # negative control: counting predicted ties as half-right gives a different number on this data
    ties = sum(
        1
        for r, s in zip(ranks, rewards)
        for i in range(len(r))
        for j in range(i + 1, len(r))
        if r[i] != r[j] and s[i] == s[j]
    )
    assert ties > 0 and (correct + 0.5 * ties) / total != pytest.approx(result.accuracy)


def test_pairwise_accuracy_labels_and_ties():
    result = pairwise_accuracy([2.0, 1.0, 0.5, 1.0], [1.0, 3.0, 0.5, 0.0], [0, 1, 0, 1])
    assert result.correct == 2 and result.total == 4  # tie wrong, last one wrong
    with pytest.raises(ValueError, match="labels"):
        pairwise_accuracy([1.0], [0.0], [2])


def test_wilson_interval_known_values_and_wald_control():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    wald_high = 0.8 + 1.959964 * np.sqrt(0.8 * 0.2 / 10)
    assert wald_high > 1.0 and high < 1.0  # the Wald interval leaves [0, 1]; Wilson does not
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0.1


def test_bootstrap_interval_over_prompts():
    constant = [[1, 1], [1], [1, 1, 1]]
    assert bootstrap_interval(constant) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    small = [[float(v)] for v in rng.integers(0, 2, size=20)]
    large = [[float(v)] for v in rng.integers(0, 2, size=2000)]
    lo_s, hi_s = bootstrap_interval(small, num_resamples=500)
    lo_l, hi_l = bootstrap_interval(large, num_resamples=500)
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert lo_l < np.mean(large) < hi_l
    result = ranking_accuracy([_record(ranks=[1, 2, 3])] * 5, [[3, 2, 1]] * 5, interval="bootstrap")
    assert (result.low, result.high) == (1.0, 1.0)


def _hpdv2_inversion(p1, p2):
    """The HPDv2 per-prompt formula, written out: p1 = predicted positions, p2 = human ranks."""
    n = len(p1)
    cnt = 0
    for i in range(n - 1):
        for j in range(i + 1, n):
            if (p1[i] > p1[j] and p2[i] < p2[j]) or (p1[i] < p1[j] and p2[i] > p2[j]):
                cnt += 1
    return 1 - cnt / (n * (n - 1) / 2)


def test_inversion_score_hand_worked_and_brute_force():
    perfect = inversion_score([_record(ranks=[0, 1, 2, 3])], [[4.0, 3.0, 2.0, 1.0]])
    reversed_ = inversion_score([_record(ranks=[0, 1, 2, 3])], [[1.0, 2.0, 3.0, 4.0]])
    assert perfect.accuracy == 1.0 and reversed_.accuracy == 0.0
    rng = np.random.default_rng(1)
    records, scores, expected = [], [], []
    for _ in range(30):
        n = int(rng.integers(3, 8))
        human = list(rng.permutation(n))
        s = list(rng.normal(size=n))
        positions = list(np.argsort(np.argsort(-np.array(s))))
        records.append(_record(ranks=[int(h) for h in human]))
        scores.append(s)
        expected.append(_hpdv2_inversion(positions, human))
    assert inversion_score(records, scores).accuracy == pytest.approx(np.mean(expected))
    # negative control: ranking ascending by score (forgetting that higher is better) is different
    flipped = [list(-np.array(s)) for s in scores]
    assert inversion_score(records, flipped).accuracy == pytest.approx(1 - np.mean(expected))


def test_vote_accuracy_hand_worked():
    records = [_record(votes=[7, 3]), _record(votes=[2, 8]), _record(votes=[5, 5])]
    result = vote_accuracy(records, [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # pair 1 right, pair 2 predicted tie -> wrong, pair 3 has tied votes -> skipped
    assert result.majority.correct == 1 and result.majority.total == 2
    # weighted: 7 + (2 + 8) / 2 + 5 = 17 of 30 votes
    assert result.vote_weighted == pytest.approx(17 / 30)
    with pytest.raises(ValueError, match="votes"):
        vote_accuracy([_record(ranks=[1, 2])], [[0.0, 1.0]])


def test_score_shape_errors():
    with pytest.raises(ValueError, match="2 images but 3 scores"):
        ranking_accuracy([_record(ranks=[1, 2])], [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="1 records but 2"):
        ranking_accuracy([_record(ranks=[1, 2])], [[1.0, 2.0], [1.0, 2.0]])
