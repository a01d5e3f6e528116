"""Question-answer faithfulness: DSG-style scoring with dependencies, and TIFA-style accuracy.

A prompt compiles to yes/no :class:`Question` s with ids, a category and parent ids (DSG's
entity -> attribute / count -> relation graph). A VQA backend answers them for an image. DSG rules:

* an answer counts 1 when it is "yes" (or, for soft answers, its probability of "yes");
* a question counts 0 whenever any of its *direct* parents was answered "no" (**dependency
  zeroing**), so "is the circle red?" earns nothing when "is there a circle?" failed. As in the DSG
  reference, parents are judged on their raw answers, so zeroing does not chain through a parent
  that was answered "yes" but zeroed itself (DSG graphs list every ancestor as a parent);
  ``transitive=True`` chains it;
* the overall score is the **micro-average** over all questions pooled (the DSG reference prints
  this), with per-category micro-averages; the per-prompt mean is also reported.

TIFA-style scoring is plain accuracy per prompt (no dependencies), averaged over prompts.

Any object with ``answer(images, questions) -> list[list[bool | float]]`` (one list per image) is a
:class:`VQABackend`; ``True``/``"yes"``/1.0 mean yes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DSGResult",
    "Question",
    "VQABackend",
    "aggregate_dsg",
    "dsg_score",
    "score_with_backend",
    "tifa_score",
]


@dataclass(frozen=True)
class Question:
    """One yes/no question about an image; ``parents`` are ids of questions it depends on."""

    id: str
    text: str
    category: str = "other"
    parents: tuple[str, ...] = ()


@runtime_checkable
class VQABackend(Protocol):
    def answer(self, images: Any, questions: Sequence[Sequence[Question]]) -> list[list[Any]]: ...


@dataclass
class DSGResult:
    """Scores for one image (or, from :func:`aggregate_dsg`, for a set of images)."""

    score: float
    per_question: dict[str, float] = field(default_factory=dict)
    per_category: dict[str, float] = field(default_factory=dict)
    category_counts: dict[str, int] = field(default_factory=dict)
    num_questions: int = 0
    prompt_mean: float | None = None


def _as_yes(value: Any, qid: str) -> float:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("yes", "y", "true"):
            return 1.0
        if text in ("no", "n", "false"):
            return 0.0
        raise ValueError(f"answer to question {qid!r} must be yes/no, got {value!r}")
    if isinstance(value, bool):
        return float(value)
    try:
        prob = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"answer to question {qid!r} must be yes/no, a bool or a probability, got {value!r}"
        ) from None
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"answer to question {qid!r} must be a probability in [0, 1], got {prob}")
    return prob


def _check_graph(questions: Sequence[Question]) -> dict[str, Question]:
    by_id: dict[str, Question] = {}
    for q in questions:
        if q.id in by_id:
            raise ValueError(f"duplicate question id {q.id!r}")
        by_id[q.id] = q
    for q in questions:
        for parent in q.parents:
            if parent not in by_id:
                raise ValueError(f"question {q.id!r} depends on unknown question {parent!r}")
    # reject cycles: walk ancestors with a visiting set
    state: dict[str, int] = {}

    def visit(qid: str) -> None:
        if state.get(qid) == 1:
            raise ValueError(f"question dependencies form a cycle through {qid!r}")
        if state.get(qid) == 2:
            return
        state[qid] = 1
        for parent in by_id[qid].parents:
            visit(parent)
        state[qid] = 2

    for qid in by_id:
        visit(qid)
    return by_id


def _answers_by_id(
    answers: Mapping[str, Any] | Sequence[Any], questions: Sequence[Question]
) -> dict[str, float]:
    if isinstance(answers, Mapping):
        missing = [q.id for q in questions if q.id not in answers]
        if missing:
            raise ValueError(f"no answer for question(s) {missing}")
        return {q.id: _as_yes(answers[q.id], q.id) for q in questions}
    if len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    return {q.id: _as_yes(a, q.id) for q, a in zip(questions, answers, strict=True)}


def dsg_score(
    answers: Mapping[str, Any] | Sequence[Any],
    questions: Sequence[Question],
    *,
    dependency_zeroing: bool = True,
    threshold: float = 0.5,
    transitive: bool = False,
) -> DSGResult:
    """DSG score of one image: mean over its questions after dependency zeroing.

    A parent counts as failed when its answer (probability of yes) is below ``threshold``; with
    ``transitive`` also when it was zeroed itself. ``dependency_zeroing=False`` gives the TIFA-style
    plain mean.
    """
    if not questions:
        raise ValueError("no questions: a prompt must compile to at least one question")
    by_id = _check_graph(questions)
    raw = _answers_by_id(answers, questions)
    passed: dict[str, bool] = {}

    def ok(qid: str) -> bool:
        if qid not in passed:
            passed[qid] = raw[qid] >= threshold and (not transitive or all(ok(p) for p in by_id[qid].parents))
        return passed[qid]

    per_question = {}
    for q in questions:
        zeroed = dependency_zeroing and not all(ok(p) for p in q.parents)
        per_question[q.id] = 0.0 if zeroed else raw[q.id]
    return _summarise([(by_id[qid].category, v) for qid, v in per_question.items()], per_question)


def _summarise(items: list[tuple[str, float]], per_question: dict[str, float]) -> DSGResult:
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for category, value in items:
        sums[category] += value
        counts[category] += 1
    total = sum(v for _, v in items)
    return DSGResult(
        score=total / len(items),
        per_question=per_question,
        per_category={c: sums[c] / counts[c] for c in sorted(sums)},
        category_counts=dict(sorted(counts.items())),
        num_questions=len(items),
    )


def tifa_score(answers: Mapping[str, Any] | Sequence[Any], questions: Sequence[Question]) -> DSGResult:
    """TIFA-style accuracy of one image: the plain mean of answers, no dependencies."""
    return dsg_score(answers, questions, dependency_zeroing=False)


def aggregate_dsg(results: Sequence[DSGResult], questions: Sequence[Sequence[Question]]) -> DSGResult:
    """Pool per-image results: micro-average over all questions, per-category micro-averages, and
    ``prompt_mean`` (mean of per-image scores, the TIFA convention)."""
    if not results:
        raise ValueError("no results to aggregate")
    if len(results) != len(questions):
        raise ValueError(f"{len(results)} results for {len(questions)} question lists")
    items = []
    for result, qs in zip(results, questions, strict=True):
        items += [(q.category, result.per_question[q.id]) for q in qs]
    pooled = _summarise(items, {})
    pooled.prompt_mean = sum(r.score for r in results) / len(results)
    return pooled


def score_with_backend(
    backend: VQABackend,
    images: Any,
    questions: Sequence[Sequence[Question]],
    *,
    dependency_zeroing: bool = True,
) -> tuple[DSGResult, list[DSGResult]]:
    """Ask ``backend`` every question for every image; return the aggregate and per-image results."""
    if len(questions) == 0:
        raise ValueError("empty question list")
    answers = backend.answer(images, questions)
    if len(answers) != len(questions):
        raise ValueError(f"VQA backend returned {len(answers)} answer lists for {len(questions)} images")
    per_image = [
        dsg_score(a, qs, dependency_zeroing=dependency_zeroing)
        for a, qs in zip(answers, questions, strict=True)
    ]
    return aggregate_dsg(per_image, questions), per_image
