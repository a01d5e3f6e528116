import numpy as np
import pytest

from diffalign.ecad.pareto import dominates, hypervolume_2d, non_dominated_mask


def _brute(F, G=None):
    n = len(F)
    feas = np.ones(n, bool) if G is None else np.all(G <= 0, axis=1)
    return np.array(
        [feas[i] and not any(feas[j] and dominates(F[j], F[i]) for j in range(n) if j != i) for i in range(n)]
    )


@pytest.mark.parametrize("seed", range(5))
def test_non_dominated_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    F = rng.integers(0, 6, size=(40, 2)).astype(float)  # many ties and duplicates
    G = rng.integers(-1, 2, size=(40, 1)).astype(float)
    assert np.array_equal(non_dominated_mask(F), _brute(F))
    assert np.array_equal(non_dominated_mask(F, G), _brute(F, G))
    F3 = rng.random((20, 3))
    assert np.array_equal(non_dominated_mask(F3), _brute(F3))


def test_negative_control_weak_dominance_differs():
    # a "<= everywhere" (weak) dominance would drop duplicates and equal-f1 points; ours keeps duplicates
    F = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert non_dominated_mask(F).tolist() == [True, True, True, False]
    weak = [not any(np.all(F[j] <= F[i]) for j in range(4) if j != i) for i in range(4)]
    assert weak != non_dominated_mask(F).tolist()


def test_hypervolume_2d_analytic():
    F = np.array([[0.2, 0.6], [0.5, 0.3], [0.6, 0.7]])
    # staircase area within ref (1, 1): (1-0.2)*(1-0.6) + (1-0.5)*(0.6-0.3)
    assert hypervolume_2d(F, (1.0, 1.0)) == pytest.approx(0.8 * 0.4 + 0.5 * 0.3)
    assert hypervolume_2d(np.array([[2.0, 2.0]]), (1.0, 1.0)) == 0.0
