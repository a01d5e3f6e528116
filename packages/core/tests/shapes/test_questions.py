import itertools

import pytest
import torch

from diffalign.core.shapes.grammar import kind_index
from diffalign.core.shapes.questions import (
    answer,
    compile_prompt,
    dsg_scores,
    poisson_binomial,
    scene_to_probs,
    score_parsed,
    soft_scores,
)


def test_compile_hand_worked_examples():
    qs = compile_prompt("a yellow triangle to the left of a blue circle")
    assert [q.category for q in qs] == ["entity", "entity", "attribute", "attribute", "relation"]
    assert [q.parents for q in qs] == [(), (), (1,), (2,), (1, 2, 3, 4)]
    assert qs[4].op == ("relation", kind_index("yellow", "triangle"), "left", kind_index("blue", "circle"))
    qs = compile_prompt("exactly three red squares")
    assert [q.op for q in qs] == [
        ("shape", "square"),
        ("kind", kind_index("red", "square")),
        ("count", kind_index("red", "square"), 3),
    ]
    assert qs[2].parents == (1, 2)
    qs = compile_prompt("a green circle with a red triangle")
    assert len(qs) == 4
    assert {q.text for q in qs if q.category == "attribute"} == {
        "is the circle green?",
        "is the triangle red?",
    }


def test_dsg_zeroing_hand_worked():
    qs = compile_prompt("a yellow triangle to the left of a blue circle")
    # the relation is (wrongly) answered yes, but the circle is not blue: the relation must score 0
    answers = {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0}
    scores = dsg_scores(answers, qs)
    assert scores == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0}
    # negative control: without the dependency rule the relation would count, 4/5 instead of 3/5
    assert sum(answers.values()) / 5 == 0.8 and sum(scores.values()) / 5 == 0.6
    # transitive: entity fails -> its attribute is zeroed even if answered yes
    scores = dsg_scores({1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, qs)
    assert scores[3] == 0.0 and scores[5] == 0.0 and scores[4] == 1.0


def test_score_parsed_hand_worked_scenes():
    red_sq, blue_ci, yel_tri = (
        kind_index("red", "square"),
        kind_index("blue", "circle"),
        kind_index("yellow", "triangle"),
    )
    # prompt: yellow triangle left of blue circle; scene has them the other way round
    scene = [(blue_ci, 1, 0), (yel_tri, 1, 2)]
    res = score_parsed(scene_to_probs([scene]), ["a yellow triangle to the left of a blue circle"])
    assert res.per_prompt == [pytest.approx(0.8)]
    # count: two red squares asked, three present -> entity, attribute yes, count no
    scene = [(red_sq, 0, 0), (red_sq, 0, 1), (red_sq, 2, 2)]
    res = score_parsed(scene_to_probs([scene]), ["two red squares"])
    assert res.per_prompt == [pytest.approx(2 / 3)]
    assert res.per_category == {"entity": 1.0, "attribute": 1.0, "count": 0.0}
    # micro average over questions across prompts: 4/5 + 2/3 -> 6/8
    res = score_parsed(
        scene_to_probs([[(blue_ci, 1, 0), (yel_tri, 1, 2)], scene]),
        ["a yellow triangle to the left of a blue circle", "two red squares"],
    )
    assert res.overall == pytest.approx(6 / 8)
    assert res.per_skill == {"spatial": pytest.approx(0.8), "count": pytest.approx(2 / 3)}


def test_poisson_binomial_matches_brute_force():
    q = torch.tensor([0.1, 0.7, 0.4, 0.9])
    got = poisson_binomial(q, 4)
    want = torch.zeros(5)
    for bits in itertools.product([0, 1], repeat=4):
        p = 1.0
        for b, qi in zip(bits, q):
            p *= qi if b else 1 - qi
        want[sum(bits)] += p
    assert torch.allclose(got, want, atol=1e-6)
    # negative control: the binomial with the mean probability is a different distribution
    mean = q.mean()
    binom = torch.tensor(
        [torch.distributions.Binomial(4, mean).log_prob(torch.tensor(float(k))).exp() for k in range(5)]
    )
    assert not torch.allclose(got, binom, atol=1e-3)


def test_soft_relation_matches_brute_force_over_independent_cells():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(1, 9, 13), -1)
    k1, k2 = 3, 7
    op = ("relation", k1, "left", k2)
    from diffalign.core.shapes.questions import _relation_mask

    m = _relation_mask("left")
    want = 1.0
    for i in range(9):
        for j in range(9):
            if m[i, j]:
                want *= 1 - float(p[0, i, 1 + k1]) * float(p[0, j, 1 + k2])
    assert float(answer(op, p)[0]) == pytest.approx(1 - want, abs=1e-6)


def test_soft_scores_equal_hard_scores_on_one_hot_scenes():
    blue_ci, yel_tri = kind_index("blue", "circle"), kind_index("yellow", "triangle")
    scenes = [[(yel_tri, 1, 0), (blue_ci, 1, 2)], [(blue_ci, 1, 0), (yel_tri, 1, 2)], [(yel_tri, 0, 0)]]
    prompts = ["a yellow triangle to the left of a blue circle"] * 3
    p = scene_to_probs(scenes)
    hard = score_parsed(p, prompts).per_prompt
    soft = soft_scores(p, prompts).tolist()
    assert soft == pytest.approx(hard)
    assert hard == pytest.approx([1.0, 0.8, 0.4])


def test_plain_python_scene_scores_match_the_tensor_path():
    import random

    from diffalign.core.shapes.grammar import sample_specs
    from diffalign.core.shapes.questions import scene_scores
    from diffalign.core.shapes.render import random_scene

    rng = random.Random(0)
    specs = sample_specs("all", 150, "train", rng)
    scenes = [random_scene(rng) for _ in specs]
    prompts = [p for _, p in specs]
    assert scene_scores(scenes, prompts) == pytest.approx(
        score_parsed(scene_to_probs(scenes), prompts).per_prompt
    )
