"""Prompt grammar of the shapes world.

Four skills, each with several paraphrases:

- ``object``:  one object of a colour and shape ("a red circle")
- ``count``:   one to three objects of one kind ("two blue squares")
- ``color``:   attribute binding of two objects ("a red circle and a green square")
- ``spatial``: two objects in a relation ("a yellow triangle to the left of a blue circle")

Every prompt string of the grammar is enumerated once (a few thousand) so that parsing is an exact
lookup and prompts outside the grammar are rejected. Train and held-out splits are disjoint: for
``count``, ``color`` and ``spatial`` the split is decided by the prompt's *content* (so a held-out
prompt asks for a combination never seen in training, in any phrasing); for ``object`` (only 12
contents) it is decided per prompt string.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
KINDS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
SKILLS: tuple[str, ...] = ("object", "count", "color", "spatial")
SPLITS: tuple[str, ...] = ("train", "heldout")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
HELDOUT_MODULUS = 5  # one content (or object string) in five is held out

_REL_PHRASES = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def kind_index(color: str, shape: str) -> int:
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


@dataclass(frozen=True)
class Entity:
    color: str
    shape: str

    def words(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """The content a prompt asks for (independent of its phrasing).

    ``entities`` lists the distinct entities; ``count`` is set for the count skill; ``relation`` is
    ``(i, rel, j)`` meaning entity i is ``rel`` of entity j, with rel normalised to left/above.
    """

    skill: str
    entities: tuple[Entity, ...]
    count: int | None = None
    relation: tuple[int, str, int] | None = None

    def key(self) -> str:
        ents = ";".join(e.words() for e in self.entities)
        return f"{self.skill}|{ents}|{self.count}|{self.relation}"


def _heldout(key: str) -> bool:
    digest = hashlib.md5(key.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % HELDOUT_MODULUS == 0


def _object_strings(e: Entity) -> list[str]:
    w = e.words()
    return [
        f"a {w}",
        f"a single {w}",
        f"a picture of a {w}",
        f"there is a {w}",
        f"an image of a {w}",
        f"a {w} on a white background",
    ]


def _count_strings(e: Entity, n: int) -> list[str]:
    num = NUMBER_WORDS[n]
    noun = e.shape if n == 1 else PLURALS[e.shape]
    be = "is" if n == 1 else "are"
    phrase = f"{num} {e.color} {noun}"
    return [
        phrase,
        f"exactly {phrase}",
        f"a picture of {phrase}",
        f"there {be} {phrase}",
        f"an image showing {phrase}",
    ]


def _color_strings(a: Entity, b: Entity) -> list[str]:
    out = []
    for x, y in ((a, b), (b, a)):
        out += [
            f"a {x.words()} and a {y.words()}",
            f"a {x.words()} with a {y.words()}",
            f"a picture of a {x.words()} and a {y.words()}",
            f"there is a {x.words()} and a {y.words()}",
        ]
    return out


def _spatial_strings(a: Entity, rel: str, b: Entity) -> list[str]:
    """Phrasings of "a is rel of b"; the last quarter says it the other way round."""
    out = []
    for x, r, y in ((a, rel, b), (b, _OPPOSITE[rel], a)):
        for phrase in _REL_PHRASES[r]:
            out += [
                f"a {x.words()} {phrase} a {y.words()}",
                f"there is a {x.words()} {phrase} a {y.words()}",
                f"a picture of a {x.words()} {phrase} a {y.words()}",
            ]
    return out


@lru_cache(maxsize=1)
def _universe() -> dict:
    """All prompt strings -> (spec, split), plus per skill/split lists of (spec, [strings])."""
    table: dict[str, tuple[PromptSpec, str]] = {}
    by_split: dict[tuple[str, str], list[tuple[PromptSpec, list[str]]]] = {
        (s, sp): [] for s in SKILLS for sp in SPLITS
    }

    def add(spec: PromptSpec, strings: list[str], per_string: bool) -> None:
        groups: dict[str, list[str]] = {"train": [], "heldout": []}
        for text in strings:
            key = spec.key() + "|" + text if per_string else spec.key()
            split = "heldout" if _heldout(key) else "train"
            if text in table:
                raise RuntimeError(f"grammar is ambiguous: {text!r}")
            table[text] = (spec, split)
            groups[split].append(text)
        for split, texts in groups.items():
            if texts:
                by_split[(spec.skill, split)].append((spec, texts))

    ents = [Entity(c, s) for c, s in KINDS]
    for e in ents:
        add(PromptSpec("object", (e,)), _object_strings(e), per_string=True)
    for e in ents:
        for n in (1, 2, 3):
            add(PromptSpec("count", (e,), count=n), _count_strings(e, n), per_string=False)
    for i, a in enumerate(ents):
        for b in ents[i + 1 :]:
            if a.color == b.color or a.shape == b.shape:
                continue
            add(PromptSpec("color", (a, b)), _color_strings(a, b), per_string=False)
    for a in ents:
        for b in ents:
            if a == b:
                continue
            for rel in ("left", "above"):
                spec = PromptSpec("spatial", (a, b), relation=(0, rel, 1))
                add(spec, _spatial_strings(a, rel, b), per_string=False)
    return {"table": table, "by_split": by_split}


def normalize_prompt(prompt: str) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return " ".join(prompt.lower().strip().rstrip(".").split())


def parse_prompt(prompt: str) -> PromptSpec:
    """The content of a grammar prompt; ValueError for a prompt outside the shapes grammar."""
    text = normalize_prompt(prompt)
    hit = _universe()["table"].get(text)
    if hit is None:
        raise ValueError(
            f"prompt {prompt!r} is not in the shapes-world grammar (examples: 'a red circle', "
            "'two blue squares', 'a red circle and a green square', "
            "'a yellow triangle to the left of a blue circle')"
        )
    return hit[0]


def prompt_split(prompt: str) -> str:
    parse_prompt(prompt)
    return _universe()["table"][normalize_prompt(prompt)][1]


def all_prompts(skill: str | None = None, split: str | None = None) -> list[str]:
    """Every grammar prompt, optionally restricted to one skill and/or split (sorted)."""
    if skill is not None and skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    out = [
        t
        for t, (spec, sp) in _universe()["table"].items()
        if (skill is None or spec.skill == skill) and (split is None or sp == split)
    ]
    return sorted(out)


def sample_specs(skill: str, n: int, split: str = "train", seed: int | random.Random = 0):
    """n (spec, prompt) pairs: content uniform over the split's contents, then a paraphrase."""
    if skill not in SKILLS and skill != "all":
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS} or 'all'")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    by_split = _universe()["by_split"]
    out = []
    for _ in range(n):
        sk = rng.choice(SKILLS) if skill == "all" else skill
        spec, texts = rng.choice(by_split[(sk, split)])
        out.append((spec, rng.choice(texts)))
    return out


def sample_prompts(skill: str, n: int, split: str = "train", seed: int | random.Random = 0) -> list[str]:
    """n prompts of a skill ('object', 'count', 'color', 'spatial' or 'all') from a split."""
    return [p for _, p in sample_specs(skill, n, split, seed)]


def eval_prompts(n_per_skill: int = 25, seed: int = 1234, skills: Sequence[str] | None = None) -> list[str]:
    """The fixed held-out evaluation set: n_per_skill prompts of each skill (default all, in SKILLS order).

    Skill ``k`` is drawn with seed ``seed + SKILLS.index(k)``, so a subset of skills gets exactly the
    prompts it has in the full set."""
    chosen = list(SKILLS if skills is None else skills)
    unknown = [k for k in chosen if k not in SKILLS]
    if unknown:
        raise ValueError(f"unknown skill {unknown[0]!r}; expected one of {SKILLS}")
    out: list[str] = []
    for skill in chosen:
        out += sample_prompts(skill, n_per_skill, "heldout", seed=seed + SKILLS.index(skill))
    return out


def vocabulary() -> list[str]:
    words = set()
    for text in _universe()["table"]:
        words.update(text.split())
    return sorted(words)
