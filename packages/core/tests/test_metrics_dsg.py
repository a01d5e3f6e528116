"""DSG/TIFA scoring on hand-worked examples, with the no-zeroing negative control."""

import pytest

from diffalign.core.metrics.dsg import (
    Question,
    VQABackend,
    aggregate_dsg,
    dsg_score,
    score_with_backend,
    tifa_score,
)

# "a red circle to the left of a blue square"
QUESTIONS = [
    Question("1", "is there a circle?", "entity"),
    Question("2", "is there a square?", "entity"),
    Question("3", "is the circle red?", "attribute", ("1",)),
    Question("4", "is the square blue?", "attribute", ("2",)),
    Question("5", "is the circle left of the square?", "relation", ("1", "2")),
]


def test_hand_worked_dependency_zeroing():
    # no square drawn, but the VQA model still says the (absent) square is blue and to the right
    answers = {"1": "yes", "2": "no", "3": "yes", "4": "yes", "5": "yes"}
    result = dsg_score(answers, QUESTIONS)
    assert result.per_question == {"1": 1.0, "2": 0.0, "3": 1.0, "4": 0.0, "5": 0.0}
    assert result.score == pytest.approx(2 / 5)
    assert result.per_category == {"attribute": 0.5, "entity": 0.5, "relation": 0.0}
    # negative control: without zeroing the same answers score 4/5
    assert tifa_score(answers, QUESTIONS).score == pytest.approx(4 / 5)
    assert dsg_score(answers, QUESTIONS, dependency_zeroing=False).score != pytest.approx(result.score)


def test_zeroing_uses_raw_parent_answers_unless_transitive():
    chain = [Question("a", "x"), Question("b", "y", parents=("a",)), Question("c", "z", parents=("b",))]
    # DSG reference: c's parent b was answered yes, so c keeps its point although b was zeroed
    assert dsg_score([False, True, True], chain).per_question == {"a": 0.0, "b": 0.0, "c": 1.0}
    assert dsg_score([False, True, True], chain, transitive=True).per_question == {
        "a": 0.0,
        "b": 0.0,
        "c": 0.0,
    }
    assert dsg_score([True, True, True], chain).score == 1.0


def _reference_loop(answers, parents):
    """The DSG evaluation loop written out: score 1 for yes; zero when a direct parent scored 0."""
    scores = {qid: float(a == "yes") for qid, a in answers.items()}
    filtered = dict(scores)
    for qid, parent_ids in parents.items():
        if any(scores[p] == 0 for p in parent_ids):
            filtered[qid] = 0.0
    return sum(filtered.values()) / len(filtered)


def test_matches_reference_loop_on_random_graphs():
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        qs = [
            Question(str(i), f"q{i}", parents=tuple(str(p) for p in range(i) if rng.random() < 0.3))
            for i in range(n)
        ]
        answers = {q.id: rng.choice(["yes", "no"]) for q in qs}
        expected = _reference_loop(answers, {q.id: q.parents for q in qs})
        assert dsg_score(answers, qs).score == pytest.approx(expected)


def test_soft_answers_and_threshold():
    qs = [Question("e", "entity?", "entity"), Question("c", "colour?", "attribute", ("e",))]
    assert dsg_score([0.8, 0.6], qs).score == pytest.approx(0.7)
    # the parent is a "no" at probability 0.4, so the child is zeroed
    assert dsg_score([0.4, 0.9], qs).per_question == {"e": 0.4, "c": 0.0}


def test_micro_average_versus_prompt_mean():
    short = [Question("1", "circle?", "entity")]
    results = [dsg_score(["yes"], short), dsg_score(["yes", "no", "no", "no", "no"], QUESTIONS)]
    pooled = aggregate_dsg(results, [short, QUESTIONS])
    # micro: (1 + 1) / 6 questions; prompt mean: (1 + 1/5) / 2
    assert pooled.score == pytest.approx(2 / 6)
    assert pooled.prompt_mean == pytest.approx(0.6)
    assert pooled.per_category["entity"] == pytest.approx(2 / 3) and pooled.category_counts["entity"] == 3


class _OracleVQA:
    """Answers from a fixed scene: a red circle and nothing else."""

    truth = {"is there a circle?": True, "is the circle red?": True}

    def answer(self, images, questions):
        return [[self.truth.get(q.text, True) for q in qs] for qs in questions]  # hallucinates "yes"


def test_pluggable_backend():
    backend = _OracleVQA()
    assert isinstance(backend, VQABackend)
    pooled, per_image = score_with_backend(backend, ["img"], [QUESTIONS])
    assert per_image[0].score == 1.0  # the backend said yes to everything
    assert pooled.score == 1.0 and pooled.prompt_mean == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown question"):
        dsg_score([True], [Question("1", "x", parents=("9",))])
    with pytest.raises(ValueError, match="cycle"):
        dsg_score([True, True], [Question("1", "x", parents=("2",)), Question("2", "y", parents=("1",))])
    with pytest.raises(ValueError, match="duplicate"):
        dsg_score([True, True], [Question("1", "x"), Question("1", "y")])
    with pytest.raises(ValueError, match="yes/no"):
        dsg_score(["maybe"], [Question("1", "x")])
    with pytest.raises(ValueError, match="probability"):
        dsg_score([1.5], [Question("1", "x")])
    with pytest.raises(ValueError, match="no answer"):
        dsg_score({}, [Question("1", "x")])
    with pytest.raises(ValueError, match="at least one question"):
        dsg_score([], [])


def test_metrics_package_exports_lazily():
    import diffalign.core.metrics as metrics
    from diffalign.core.metrics import dsg

    assert metrics.dsg_score is dsg.dsg_score
    assert set(metrics.__all__) >= {"frechet_distance", "PickScore", "read_rapidata", "ranking_accuracy"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        metrics.nope  # noqa: B018
