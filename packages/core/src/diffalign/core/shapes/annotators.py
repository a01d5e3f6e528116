"""Simulated annotators: pairwise preferences from a hidden utility with annotator noise.

For a prompt, candidate images are renders of the prompt's scene or of a near miss (wrong colour,
wrong shape, count off by one, relation reversed, object missing), each degraded by a random amount
(blur, noise and blotch artefacts). The hidden utility of a candidate is

    u = faithfulness(true scene, prompt) + QUALITY_WEIGHT * (1 - degradation)

with faithfulness the exact DSG score of the true scene. Each simulated annotator prefers A with
probability sigmoid((u_A - u_B) / TEMPERATURE) (independent draws); TEMPERATURE is set so that two
annotators agree on about 70% of pairs (65-75% is the range of real inter-annotator agreement).

Splits: ``in_distribution`` (train-split prompts, blur/noise/blotch degradations) and ``ood``
(held-out prompts, and a different image generator: pixelation, colour quantisation and shifts,
shape-size changes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .grammar import KINDS, sample_specs
from .questions import scene_scores
from .render import GRID, render_scenes, scene_for_spec

QUALITY_WEIGHT = 0.5
TEMPERATURE = 0.2
SPLITS = ("in_distribution", "ood")
VARIANTS = ("match", "color", "shape", "count", "relation", "missing")


@dataclass
class PreferencePairs:
    prompts: list[str]
    images_a: torch.Tensor  # [N, 3, 32, 32] in [-1, 1]
    images_b: torch.Tensor
    votes_a: torch.Tensor  # [N] number of annotators preferring A
    votes_b: torch.Tensor
    label: torch.Tensor  # [N] 1 = A preferred, 0 = B preferred, 0.5 = tie
    utility_a: torch.Tensor
    utility_b: torch.Tensor
    split: str

    def __len__(self) -> int:
        return len(self.prompts)

    def records(self) -> list[dict]:
        """Plain records (images as tensors) ``{prompt, image_a, image_b, votes_a, votes_b, label}``."""
        lab = {1.0: "a", 0.0: "b", 0.5: "tie"}
        return [
            {
                "prompt": self.prompts[i],
                "image_a": self.images_a[i],
                "image_b": self.images_b[i],
                "votes_a": int(self.votes_a[i]),
                "votes_b": int(self.votes_b[i]),
                "label": lab[float(self.label[i])],
            }
            for i in range(len(self))
        ]


def near_miss(scene, spec, variant: str, rng: random.Random):
    """A scene that differs from ``scene`` (the prompt's scene) in one way."""
    scene = list(scene)
    free = [(r, c) for r in range(GRID) for c in range(GRID) if all((r, c) != (o[1], o[2]) for o in scene)]
    i = rng.randrange(len(scene))
    k, r, c = scene[i]
    color, shape = KINDS[k]
    if variant == "match":
        return scene
    if variant == "color":
        new = rng.choice([j for j, (cc, ss) in enumerate(KINDS) if ss == shape and cc != color])
        scene[i] = (new, r, c)
    elif variant == "shape":
        new = rng.choice([j for j, (cc, ss) in enumerate(KINDS) if cc == color and ss != shape])
        scene[i] = (new, r, c)
    elif variant == "count":
        if (len(scene) > 1 and rng.random() < 0.5) or not free:
            scene.pop(i)
        else:
            scene.append((k, *rng.choice(free)))
    elif variant == "relation":
        if len(scene) == 2:
            (k0, r0, c0), (k1, r1, c1) = scene
            scene = [(k0, r1, c1), (k1, r0, c0)]
        else:
            scene[i] = (k, *rng.choice(free)) if free else scene[i]
    elif variant == "missing":
        scene.pop(i)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return scene


def degrade(images: torch.Tensor, level: torch.Tensor, gen: torch.Generator, family: str) -> torch.Tensor:
    """Degrade images in [-1, 1] by per-image level in [0, 1]."""
    lv = level.view(-1, 1, 1, 1)
    x = images
    if family == "in_distribution":
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = (1 - lv) * x + lv * blur
        x = x + torch.randn(x.shape, generator=gen) * 0.35 * lv
        blot = (torch.rand(x.shape[0], 1, 8, 8, generator=gen) < 0.15 * lv.view(-1, 1, 1, 1)).float()
        blot = F.interpolate(blot, size=32, mode="nearest")
        tint = torch.rand(x.shape[0], 3, 1, 1, generator=gen) * 2 - 1
        x = x * (1 - blot) + tint * blot
    elif family == "ood":
        small = F.avg_pool2d(x, 4)
        pix = F.interpolate(small, size=32, mode="nearest")
        x = (1 - lv) * x + lv * pix
        levels = 4 + (1 - lv) * 60
        x = torch.round((x + 1) / 2 * levels) / levels * 2 - 1
        x = x + (torch.rand(x.shape[0], 3, 1, 1, generator=gen) * 2 - 1) * 0.4 * lv
    else:
        raise ValueError(f"unknown split {family!r}; expected one of {SPLITS}")
    return x.clamp(-1, 1)


def annotator_votes(u_a: torch.Tensor, u_b: torch.Tensor, n_annotators: int, gen: torch.Generator):
    """Votes for A of n independent noisy annotators (Bradley-Terry with TEMPERATURE)."""
    p = torch.sigmoid((u_a - u_b) / TEMPERATURE)
    draws = torch.rand(u_a.shape[0], n_annotators, generator=gen) < p[:, None]
    return draws.sum(1)


def make_preference_pairs(
    n: int, split: str = "in_distribution", seed: int = 0, n_annotators: int = 3, with_images: bool = True
):
    """n pairs with labels from ``n_annotators`` simulated annotators (majority, odd count: no ties)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if n_annotators < 1:
        raise ValueError("n_annotators must be >= 1")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    prompt_split = "train" if split == "in_distribution" else "heldout"
    specs = sample_specs("all", n, prompt_split, rng)
    prompts = [p for _, p in specs]
    scenes = {"a": [], "b": []}
    for spec, _ in specs:
        base = scene_for_spec(spec, rng)
        va, vb = rng.sample(VARIANTS, 2) if rng.random() < 0.7 else (rng.choice(VARIANTS),) * 2
        scenes["a"].append(near_miss(base, spec, va, rng))
        scenes["b"].append(near_miss(base, spec, vb, rng))
    scale = 0.15 if split == "ood" else 0.0
    imgs, util = {}, {}
    for side in ("a", "b"):
        level = torch.rand(n, generator=gen) ** 1.5
        if with_images:
            clean = render_scenes(scenes[side], gen, scale_jitter=scale)
            imgs[side] = degrade(clean, level, gen, split)
        else:
            imgs[side] = torch.empty(n, 0)
        faith = torch.tensor(scene_scores(scenes[side], prompts))
        util[side] = faith + QUALITY_WEIGHT * (1 - level)
    votes_a = annotator_votes(util["a"], util["b"], n_annotators, gen)
    votes_b = n_annotators - votes_a
    label = torch.where(votes_a > votes_b, 1.0, torch.where(votes_a < votes_b, 0.0, 0.5))
    return PreferencePairs(
        prompts, imgs["a"], imgs["b"], votes_a, votes_b, label, util["a"], util["b"], split
    )


def annotator_agreement(n: int = 4000, split: str = "in_distribution", seed: int = 1) -> float:
    """Fraction of pairs on which two independent simulated annotators agree."""
    pairs = make_preference_pairs(n, split, seed, n_annotators=1, with_images=False)
    gen = torch.Generator().manual_seed(seed + 1)
    other = annotator_votes(pairs.utility_a, pairs.utility_b, 1, gen)
    return float((other == pairs.votes_a).float().mean())


def write_preference_sets(out_dir: str | Path, n: int = 200, seed: int = 0, n_annotators: int = 5) -> dict:
    """Write in-distribution and OOD pairs as PNGs plus the ImageReward-test (``imagereward.json``),
    HPDv2-test (``hpdv2.json``) and Rapidata (``rapidata.jsonl``) formats, read back by
    ``diffalign.core.metrics.preference_data``."""
    from PIL import Image

    from diffalign.core.metrics import preference_data as pdata

    from ._util import to_uint8, write_json

    out_dir = Path(out_dir)
    written = {}
    for i, split in enumerate(SPLITS):
        pairs = make_preference_pairs(n, split, seed + i, n_annotators=n_annotators)
        d = out_dir / split
        (d / "images").mkdir(parents=True, exist_ok=True)
        a8, b8 = to_uint8(pairs.images_a), to_uint8(pairs.images_b)
        ranked, voted = [], []
        for j in range(len(pairs)):
            pa, pb = d / "images" / f"{j:05d}_a.png", d / "images" / f"{j:05d}_b.png"
            Image.fromarray(a8[j]).save(pa)
            Image.fromarray(b8[j]).save(pb)
            va, vb = int(pairs.votes_a[j]), int(pairs.votes_b[j])
            ranks = [1, 2] if va > vb else ([2, 1] if vb > va else [1, 1])
            ranked.append(pdata.PreferenceRecord(pairs.prompts[j], [pa, pb], ranks=ranks, id=f"{j:06d}"))
            voted.append(
                pdata.PreferenceRecord(pairs.prompts[j], [pa, pb], votes=[va, vb], models=["a", "b"])
            )
        pdata.write_imagereward(d / "imagereward.json", ranked)
        hpd = [pdata.PreferenceRecord(r.prompt, r.images, ranks=[x - 1 for x in r.ranks]) for r in ranked]
        pdata.write_hpdv2(d / "hpdv2.json", hpd)
        pdata.write_rapidata(d / "rapidata.jsonl", voted)
        written[split] = {"n": len(pairs), "dir": str(d), "annotators": n_annotators}
    write_json(written, out_dir / "index.json")
    return written
