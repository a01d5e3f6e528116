"""Preference pairs: the shapes-world stand-in, real test-set files, and the rows the trainers consume.

A :class:`PairExample` is one judgement: a prompt, two images, the human-preferred index ``label`` (1 or 2)
and, in the shapes world, which image is faithful to the prompt (used for the oracle reasoning of SFT
targets and the listener's training data). Real sets are read with ``diffalign.core.metrics.preference_data``
(ImageReward, HPDv2, Rapidata formats).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffalign.listener_reward.config import DataConfig, PromptsConfig
from diffalign.listener_reward.prompts import format_completion, reasoner_messages

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
# held-out (out-of-distribution) colour-shape combinations: never seen in training pairs
OOD_COMBOS = {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle")}


@dataclass
class PairExample:
    prompt: str
    image_a: object  # PIL image or a path
    image_b: object
    label: int  # 1 or 2: the human-preferred image
    faithful: tuple[bool, bool] | None = None
    votes: tuple[float, float] | None = None
    record_id: str | None = None
    descriptions: tuple[str, str] | None = None  # shapes world: what each image shows ("a red circle")

    def images(self):
        return [_open(self.image_a), _open(self.image_b)]


def _open(image):
    if isinstance(image, (str, Path)):
        from PIL import Image

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return Image.open(path).convert("RGB")
    return image


def oracle_reasoning(faithful: tuple[bool, bool], descriptions: tuple[str, str] | None = None) -> str:
    """The shapes-world reasoning: per image, what it shows (when known) and a verdict against the prompt
    (never the answer itself), e.g. ``image 1 : a red circle , match . image 2 : a blue circle , mismatch .``"""
    parts = ["match" if ok else "mismatch" for ok in faithful]
    if descriptions is not None:
        parts = [f"{d} , {verdict}" for d, verdict in zip(descriptions, parts)]
    return " ".join(f"image {k} : {part} ." for k, part in zip((1, 2), parts))


_VERDICT = re.compile(r"image\s*([12])\s*:[^.]*?\b(match|mismatch)\s*\.", re.I)


def reasoning_verdict(reasoning: str) -> int | None:
    """The image a shapes-world reasoning argues for (the inverse of :func:`oracle_reasoning`): 1 or 2 when
    exactly one image is called ``match`` and the other ``mismatch``, else ``None`` (undecided, repeated or
    missing verdicts). Independent of any listener: a referee for self-contradiction."""
    verdicts: dict[int, str] = {}
    for index, word in _VERDICT.findall(reasoning or ""):
        k = int(index)
        if k in verdicts:
            return None
        verdicts[k] = word.lower()
    if set(verdicts) != {1, 2} or verdicts[1] == verdicts[2]:
        return None
    return 1 if verdicts[1] == "match" else 2


def caption_text(color: str, shape: str) -> str:
    """The description of a one-shape render, worded like the stand-in prompts."""
    return f"a {color} {shape}"


# -------------------------------------------------------------------------------------- shapes stand-in


def render_shape(color: str, shape: str, size: int, rng: random.Random, noise: float):
    """A ``size`` x ``size`` RGB render of one shape on a light background, plus pixel noise."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    extent = max(4, int(size * rng.uniform(0.5, 0.7)))
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(x0 + extent / 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)], fill=fill
        )
    pixels = np.asarray(image).astype(np.float32)
    gen = np.random.default_rng(rng.randrange(2**31))
    pixels = np.clip(pixels + gen.normal(0, 255 * noise, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def shapes_combos(split: str) -> list[tuple[str, str]]:
    combos = [(c, s) for c in COLORS for s in SHAPES]
    if split == "all":
        return combos
    if split in ("train", "test_id"):
        return [cs for cs in combos if cs not in OOD_COMBOS]
    if split == "test_ood":
        return sorted(OOD_COMBOS)
    raise ValueError(f"unknown shapes split {split!r}; choose train, test_id, test_ood or all")


def make_shapes_pairs(
    n: int, split: str = "train", seed: int = 0, image_size: int = 16, annotator_noise: float = 0.15
) -> list[PairExample]:
    """Stand-in for ``diffalign.core.shapes.make_preference_pairs``: one image drawn from the prompt, the
    other from a perturbed prompt (wrong colour or wrong shape), in random order; a simulated annotator
    prefers the faithful image with probability ``1 - annotator_noise``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"{split}-{seed}")
    combos = shapes_combos(split)
    pairs = []
    for i in range(n):
        color, shape = rng.choice(combos)
        if rng.random() < 0.5:
            wrong = (rng.choice([c for c in COLORS if c != color]), shape)
        else:
            wrong = (color, rng.choice([s for s in SHAPES if s != shape]))
        good = render_shape(color, shape, image_size, rng, noise=rng.uniform(0.0, 0.08))
        bad = render_shape(*wrong, image_size, rng, noise=rng.uniform(0.0, 0.08))
        faithful_first = rng.random() < 0.5
        images = (good, bad) if faithful_first else (bad, good)
        descs = (caption_text(color, shape), caption_text(*wrong))
        descs = descs if faithful_first else descs[::-1]
        faithful = (faithful_first, not faithful_first)
        truth = 1 if faithful_first else 2
        label = truth if rng.random() >= annotator_noise else 3 - truth
        pairs.append(
            PairExample(
                caption_text(color, shape), images[0], images[1], label, faithful, None, f"{split}-{i}", descs
            )
        )
    return pairs


def core_shapes_pairs(n: int, split: str = "train", seed: int = 0) -> list[PairExample]:
    """Pairs from core's simulated annotators (``diffalign.core.shapes.make_preference_pairs``: 32x32
    renders, four skills, majority votes). ``train``/``test_id`` -> in-distribution, ``test_ood`` -> ood.
    Vote ties are dropped; ``faithful`` is unknown there, so SFT uses ``target=answer_only``."""
    from PIL import Image

    from diffalign.core.shapes import make_preference_pairs

    core_split = {"train": "in_distribution", "test_id": "in_distribution", "test_ood": "ood"}.get(split)
    if core_split is None:
        raise ValueError(f"unknown shapes split {split!r}; choose train, test_id or test_ood")
    offset = {"train": 0, "test_id": 10_007, "test_ood": 20_011}[split]
    raw = make_preference_pairs(n, core_split, seed + offset)

    def to_pil(t):
        arr = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr)

    out = []
    for i in range(len(raw.prompts)):
        va, vb = float(raw.votes_a[i]), float(raw.votes_b[i])
        if va == vb:
            continue
        out.append(
            PairExample(
                raw.prompts[i],
                to_pil(raw.images_a[i]),
                to_pil(raw.images_b[i]),
                1 if va > vb else 2,
                None,
                (va, vb),
                f"core-{split}-{i}",
            )
        )
    return out


# ------------------------------------------------------------------------------------------- real sets


def pairs_from_records(records) -> list[PairExample]:
    """``PreferenceRecord`` list (core preference_data) -> strict pairs (human ties dropped)."""
    out = []
    for record in records:
        for pair in record.to_pairs():
            votes = (pair.strength_a, pair.strength_b) if record.votes is not None else None
            out.append(
                PairExample(
                    pair.prompt, pair.image_a, pair.image_b, pair.label + 1, None, votes, pair.record_id
                )
            )
    return out


def load_pairs(cfg: DataConfig, split: str) -> list[PairExample]:
    """Pairs of one split: ``train`` or an eval split name."""
    if cfg.source == "shapes":
        n = cfg.num_train if split == "train" else cfg.num_eval
        return make_shapes_pairs(n, split, cfg.seed, cfg.image_size, cfg.annotator_noise)
    if cfg.source == "shapes-core":
        n = cfg.num_train if split == "train" else cfg.num_eval
        return core_shapes_pairs(n, split, cfg.seed)
    from diffalign.core.metrics.preference_data import read_preferences

    if split == "train":
        if not cfg.train_path:
            raise ValueError(f"data.source={cfg.source} needs data.train_path")
        fmt = cfg.source if cfg.source != "jsonl" else "rapidata"
        pairs = pairs_from_records(read_preferences(cfg.train_path, fmt))
        if cfg.train_fraction < 1.0:
            rng = random.Random(cfg.seed)
            pairs = rng.sample(pairs, max(1, int(round(len(pairs) * cfg.train_fraction))))
        return pairs
    if split not in cfg.eval_paths:
        raise ValueError(f"no file for eval split {split!r}: set data.eval_paths.{split}")
    fmt = cfg.eval_formats.get(split, cfg.source if cfg.source != "jsonl" else "rapidata")
    return pairs_from_records(read_preferences(cfg.eval_paths[split], fmt))


def grpo_rows(pairs: list[PairExample], prompts: PromptsConfig) -> list[dict]:
    """Rows for TRL's GRPOTrainer: conversational prompt with two image placeholders + columns used by
    the reward functions (``label``, ``t2i_prompt``) and the ``images`` TRL inserts in order."""
    return [
        {
            "prompt": reasoner_messages(p.prompt, prompts),
            "images": p.images(),
            "label": int(p.label),
            "t2i_prompt": p.prompt,
        }
        for p in pairs
    ]


def sft_target(pair: PairExample, prompts: PromptsConfig, target: str = "oracle") -> str:
    """SFT completion: oracle per-image descriptions and verdicts (shapes world) then the human label; or
    answer only."""
    if target == "oracle":
        if pair.faithful is None:
            raise ValueError("sft.target=oracle needs per-image faithfulness (shapes world); use answer_only")
        reasoning = oracle_reasoning(pair.faithful, pair.descriptions)
    else:
        reasoning = "look at both images ."
    return format_completion(reasoning, pair.label, prompts.answer_format)


__all__ = [
    "PairExample",
    "caption_text",
    "grpo_rows",
    "load_pairs",
    "core_shapes_pairs",
    "make_shapes_pairs",
    "oracle_reasoning",
    "pairs_from_records",
    "reasoning_verdict",
    "render_shape",
    "sft_target",
]
