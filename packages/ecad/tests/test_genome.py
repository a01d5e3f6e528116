import numpy as np
import pytest
import torch

from diffalign.ecad.genome import ComponentCrossover, GenomeCodec, StructuredMutation
from diffalign.ecad.schedule import Schedule, fora, no_cache


@pytest.fixture
def codec():
    return GenomeCodec(no_cache("pixart", 5, 4))  # 5 steps, 4 blocks, 3 components


class _Problem:
    def __init__(self, n_var):
        self.n_var = n_var


def test_genome_has_no_step0_genes_and_keys_on_the_effective_schedule(codec):
    assert codec.n_var == 4 * 4 * 3
    a = fora("pixart", 5, 2, 4)
    b = fora("pixart", 5, 2, 4)
    b.recompute[0] = False  # only step-0 bits differ: runs exactly like a
    assert not torch.equal(a.to_genome(), b.to_genome())  # the raw genome would call them different
    assert np.array_equal(codec.encode(a), codec.encode(b))
    torch.manual_seed(0)
    for _ in range(5):
        s = Schedule.from_genome(torch.rand(5 * 4 * 3) < 0.5, no_cache("pixart", 5, 4))
        assert torch.equal(codec.decode(codec.encode(s)).effective(), s.effective())


def _parents(codec, n=20, seed=0):
    rs = np.random.default_rng(seed)
    return rs.random((2, n, codec.n_var)) < 0.5


def test_component_crossover_moves_whole_units(codec):
    X = _parents(codec)
    op = ComponentCrossover(codec)
    track = codec.units("track")
    kinds = set()
    rs = np.random.default_rng(1)
    Q = op._do(_Problem(codec.n_var), X, random_state=rs)
    for m in range(X.shape[1]):
        assert np.array_equal(Q[0, m] ^ Q[1, m], X[0, m] ^ X[1, m])  # complementary children
        for kind in ("track", "step", "component"):
            ids = codec.units(kind)
            if all(
                np.array_equal(Q[0, m][ids == u], X[0, m][ids == u])
                or np.array_equal(Q[0, m][ids == u], X[1, m][ids == u])
                for u in np.unique(ids)
            ):
                kinds.add(kind)
    assert kinds == {"track", "step", "component"}
    # a child can take one component from each parent (attention from one, feed-forward from the other)
    comp = codec.units("component")
    mixed = [
        m
        for m in range(X.shape[1])
        if np.array_equal(Q[0, m][comp == 0], X[0, m][comp == 0])
        and np.array_equal(Q[0, m][comp == 2], X[1, m][comp == 2])
    ]
    assert mixed
    # negative control: the paper's point crossover on the step-major genome splits (block, component)
    # tracks across parents
    from pymoo.operators.crossover.pntx import PointCrossover

    P = PointCrossover(n_points=4)._do(_Problem(codec.n_var), X, random_state=np.random.default_rng(1))
    split_tracks = sum(
        not (
            np.array_equal(P[0, m][track == u], X[0, m][track == u])
            or np.array_equal(P[0, m][track == u], X[1, m][track == u])
        )
        for m in range(X.shape[1])
        for u in np.unique(track)
    )
    assert split_tracks > 0


def test_structured_mutation_changes_every_child(codec):
    X = _parents(codec, n=50)[0]
    out = StructuredMutation(codec)._do(_Problem(codec.n_var), X, random_state=np.random.default_rng(0))
    assert all(not np.array_equal(a, b) for a, b in zip(out, X))
    # negative control: the paper's BitflipMutation(prob=0.05) leaves almost every child unchanged
    from pymoo.core.population import Population
    from pymoo.operators.mutation.bitflip import BitflipMutation

    pop = BitflipMutation(prob=0.05).do(
        _Problem(codec.n_var), Population.new("X", X.copy()), random_state=np.random.default_rng(0)
    )
    unchanged = sum(np.array_equal(a, b) for a, b in zip(pop.get("X"), X))
    assert unchanged > 40
