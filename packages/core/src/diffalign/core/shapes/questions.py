"""DSG-style questions of shapes prompts, their answers on scenes, and DSG scoring.

Each prompt compiles to yes/no questions with dependencies (entity -> attribute/count ->
relation). A question is answered from a *parsed scene*: per-cell class probabilities ``p`` of
shape [9, 13] (class 0 = empty cell, class 1 + k = object of kind k). The same functions give exact
answers for one-hot scenes and smooth answers for soft scenes (the differentiable reward):

- exists shape s:         1 - prod_cells (1 - sum_{k of shape s} p[cell, 1 + k])
- exists kind k:          1 - prod_cells (1 - p[cell, 1 + k])
- count of kind k == n:   Poisson-binomial probability over cells (exact DP)
- a k1 is rel of a k2:    1 - prod_{valid cell pairs (i, j)} (1 - p[i, 1 + k1] * p[j, 1 + k2])

DSG rules: a question's score is forced to 0 when any parent question scored 0; scores are
micro-averaged over questions, with per-skill and per-category breakdowns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .grammar import KINDS, NUMBER_WORDS, PLURALS, SHAPES, PromptSpec, kind_index, parse_prompt
from .render import GRID, relation_holds

CATEGORIES = ("entity", "attribute", "count", "relation")
N_CELLS = GRID * GRID
N_CLASSES = 1 + len(KINDS)


@dataclass(frozen=True)
class Question:
    qid: int
    category: str  # entity | attribute | count | relation
    text: str
    op: tuple  # ("shape", s) | ("kind", k) | ("count", k, n) | ("relation", k1, rel, k2)
    parents: tuple[int, ...] = ()


def compile_spec(spec: PromptSpec) -> list[Question]:
    """The DSG questions of a prompt content (ids start at 1, parents refer to earlier ids)."""
    qs: list[Question] = []

    def add(category, text, op, parents=()):
        q = Question(len(qs) + 1, category, text, op, tuple(parents))
        qs.append(q)
        return q.qid

    if spec.skill in ("object", "count"):
        e = spec.entities[0]
        k = kind_index(e.color, e.shape)
        if spec.skill == "object":
            q1 = add("entity", f"is there a {e.shape}?", ("shape", e.shape))
            add("attribute", f"is the {e.shape} {e.color}?", ("kind", k), [q1])
        else:
            n = spec.count
            noun = e.shape if n == 1 else PLURALS[e.shape]
            q1 = add("entity", f"is there a {e.shape}?", ("shape", e.shape))
            q2 = add("attribute", f"is there a {e.color} {e.shape}?", ("kind", k), [q1])
            add("count", f"are there exactly {NUMBER_WORDS[n]} {e.color} {noun}?", ("count", k, n), [q1, q2])
        return qs
    if spec.skill in ("color", "spatial"):
        a, b = spec.entities
        ka, kb = kind_index(a.color, a.shape), kind_index(b.color, b.shape)
        qa = add("entity", f"is there a {a.shape}?", ("shape", a.shape))
        qb = add("entity", f"is there a {b.shape}?", ("shape", b.shape))
        qca = add("attribute", f"is the {a.shape} {a.color}?", ("kind", ka), [qa])
        qcb = add("attribute", f"is the {b.shape} {b.color}?", ("kind", kb), [qb])
        if spec.skill == "spatial":
            i, rel, j = spec.relation
            ents = (a, b)
            ks = (ka, kb)
            words = {"left": "to the left of", "above": "above", "right": "to the right of", "below": "below"}
            add(
                "relation",
                f"is the {ents[i].words()} {words[rel]} the {ents[j].words()}?",
                ("relation", ks[i], rel, ks[j]),
                [qa, qb, qca, qcb],
            )
        return qs
    raise ValueError(f"unknown skill {spec.skill!r}")


def compile_prompt(prompt: str) -> list[Question]:
    return compile_spec(parse_prompt(prompt))


@lru_cache(maxsize=8)
def _relation_mask(rel: str) -> torch.Tensor:
    m = torch.zeros(N_CELLS, N_CELLS)
    for i in range(N_CELLS):
        for j in range(N_CELLS):
            if i != j and relation_holds(rel, divmod(i, GRID), divmod(j, GRID)):
                m[i, j] = 1.0
    return m


_SHAPE_KINDS = {s: [k for k, (_, sh) in enumerate(KINDS) if sh == s] for s in SHAPES}


def poisson_binomial(q: torch.Tensor, max_n: int = N_CELLS) -> torch.Tensor:
    """P(sum of independent Bernoulli(q_i) == n) for n = 0..max_n; q of shape [..., cells]."""
    dist = torch.zeros(*q.shape[:-1], max_n + 1, dtype=q.dtype, device=q.device)
    dist[..., 0] = 1.0
    for i in range(q.shape[-1]):
        qi = q[..., i : i + 1]
        shifted = torch.cat([torch.zeros_like(dist[..., :1]), dist[..., :-1]], dim=-1)
        dist = dist * (1 - qi) + shifted * qi
    return dist


def answer(op: tuple, p: torch.Tensor) -> torch.Tensor:
    """Soft (or, for one-hot p, exact) probability of 'yes'; p has shape [B, 9, 13]."""
    kind = op[0]
    if kind == "shape":
        q = p[..., [1 + k for k in _SHAPE_KINDS[op[1]]]].sum(-1).clamp(0, 1)
        return 1 - torch.prod(1 - q, dim=-1)
    if kind == "kind":
        return 1 - torch.prod(1 - p[..., 1 + op[1]], dim=-1)
    if kind == "count":
        return poisson_binomial(p[..., 1 + op[1]])[..., op[2]]
    if kind == "relation":
        _, k1, rel, k2 = op
        pair = p[..., :, 1 + k1, None] * p[..., None, :, 1 + k2]  # [B, 9, 9]
        mask = _relation_mask(rel).to(p.dtype).to(p.device)
        return 1 - torch.prod((1 - pair * mask).flatten(-2), dim=-1)
    raise ValueError(f"unknown question op {op!r}")


def scene_to_probs(scenes) -> torch.Tensor:
    """One-hot per-cell probabilities [B, 9, 13] of scenes given as lists of (kind, row, col)."""
    p = torch.zeros(len(scenes), N_CELLS, N_CLASSES)
    p[:, :, 0] = 1.0
    for i, scene in enumerate(scenes):
        for k, r, c in scene:
            p[i, r * GRID + c] = 0.0
            p[i, r * GRID + c, 1 + k] = 1.0
    return p


def dsg_scores(answers: dict[int, float], questions: list[Question]) -> dict[int, float]:
    """DSG dependency rule: a question scores 0 if any parent (transitively) scored 0."""
    scores: dict[int, float] = {}
    for q in sorted(questions, key=lambda q: q.qid):
        s = 1.0 if answers[q.qid] >= 0.5 else 0.0
        if any(scores[pid] == 0.0 for pid in q.parents):
            s = 0.0
        scores[q.qid] = s
    return scores


def soft_dsg(answers: dict[int, torch.Tensor], questions: list[Question]) -> dict[int, torch.Tensor]:
    """Smooth DSG rule: a question's soft score is its answer times its parents' soft scores."""
    scores: dict[int, torch.Tensor] = {}
    for q in sorted(questions, key=lambda q: q.qid):
        s = answers[q.qid]
        for pid in q.parents:
            s = s * scores[pid]
        scores[q.qid] = s
    return scores


@dataclass
class FaithfulnessResult:
    overall: float  # micro-average over all questions (DSG "Average")
    per_skill: dict[str, float]  # micro-average over the questions of each skill's prompts
    per_category: dict[str, float]  # micro-average per question category
    per_prompt: list[float]  # mean question score of each image/prompt pair
    skill_mean: float  # mean of the per-skill scores present
    n_questions: int

    def as_dict(self) -> dict:
        return {
            "overall": self.overall,
            "skill_mean": self.skill_mean,
            "per_skill": dict(self.per_skill),
            "per_category": dict(self.per_category),
            "n_questions": self.n_questions,
        }


def score_parsed(probs: torch.Tensor, prompts: list[str]) -> FaithfulnessResult:
    """DSG scores of parsed scenes (probs [B, 9, 13]; argmax taken per cell) against prompts."""
    hard = torch.nn.functional.one_hot(probs.argmax(-1), N_CLASSES).float()
    totals: dict[str, list[float]] = {}
    cats: dict[str, list[float]] = {}
    per_prompt = []
    all_scores = []
    for i, prompt in enumerate(prompts):
        spec = parse_prompt(prompt)
        qs = compile_spec(spec)
        ans = {q.qid: float(answer(q.op, hard[i : i + 1])[0]) for q in qs}
        sc = dsg_scores(ans, qs)
        vals = [sc[q.qid] for q in qs]
        per_prompt.append(sum(vals) / len(vals))
        all_scores += vals
        totals.setdefault(spec.skill, []).extend(vals)
        for q in qs:
            cats.setdefault(q.category, []).append(sc[q.qid])
    per_skill = {k: sum(v) / len(v) for k, v in totals.items()}
    return FaithfulnessResult(
        overall=sum(all_scores) / len(all_scores),
        per_skill=per_skill,
        per_category={k: sum(v) / len(v) for k, v in cats.items()},
        per_prompt=per_prompt,
        skill_mean=sum(per_skill.values()) / len(per_skill),
        n_questions=len(all_scores),
    )


def soft_scores(probs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Differentiable per-image faithfulness: mean over a prompt's questions of the soft DSG score."""
    out = []
    for i, prompt in enumerate(prompts):
        qs = compile_prompt(prompt)
        ans = {q.qid: answer(q.op, probs[i : i + 1])[0] for q in qs}
        sc = soft_dsg(ans, qs)
        out.append(torch.stack([sc[q.qid] for q in qs]).mean())
    return torch.stack(out)


def answer_scene(op: tuple, scene) -> bool:
    """Exact answer on a scene given as a list of (kind, row, col) (plain Python, fast)."""
    kind = op[0]
    if kind == "shape":
        return any(KINDS[k][1] == op[1] for k, _, _ in scene)
    if kind == "kind":
        return any(k == op[1] for k, _, _ in scene)
    if kind == "count":
        return sum(k == op[1] for k, _, _ in scene) == op[2]
    if kind == "relation":
        _, k1, rel, k2 = op
        return any(
            relation_holds(rel, (r1, c1), (r2, c2))
            for a, r1, c1 in scene
            if a == k1
            for b, r2, c2 in scene
            if b == k2
        )
    raise ValueError(f"unknown question op {op!r}")


def scene_scores(scenes, prompts: list[str]) -> list[float]:
    """Per-prompt DSG score of known scenes (exact; equals ``score_parsed`` on one-hot scenes)."""
    out = []
    for scene, prompt in zip(scenes, prompts):
        qs = compile_prompt(prompt)
        sc = dsg_scores({q.qid: float(answer_scene(q.op, scene)) for q in qs}, qs)
        out.append(sum(sc.values()) / len(sc))
    return out
