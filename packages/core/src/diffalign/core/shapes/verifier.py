"""Scene-parser verifier of the shapes world.

A small CNN maps a 32x32 image to a per-cell class map on the world's 3x3 grid: for each cell,
probabilities over {empty} and the 12 colour-shape kinds (12 density maps at the grid's
resolution: a kind's count is the sum of its map, an object's position is its cell). Questions are
answered exactly from the parsed scene (``questions.answer``); the penultimate 576-d layer gives
FID features.

Two verifiers are committed: ``verifier.safetensors`` (seed 0), behind the rewards
``shapes-faithfulness`` / ``shapes-reward``, and ``eval_verifier.safetensors`` (seed 1, heavier
augmentation), for evaluation only (``load_eval_verifier``). A benchmark that optimises the reward
scores with both, so that gains on the reward's own verifier that the other does not see (reward
hacking) show up. The evaluation verifier carries ``role=evaluation`` in its metadata and the reward
classes refuse it.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grammar import SKILLS, sample_specs
from .questions import CATEGORIES, N_CELLS, N_CLASSES, answer, compile_spec, scene_to_probs
from .render import perturb, random_scene, render_scenes, scene_for_spec, scene_targets

FEATURE_DIM = 64 * N_CELLS  # penultimate per-cell features, flattened
ASSETS = Path(__file__).parent / "assets"
EVAL_VERIFIER_SEED = 1
EVAL_PERTURB_FRAC = 0.75  # the evaluation verifier sees more perturbed renders than the reward's (0.5)
ROLES = ("reward", "evaluation")


class EvaluationOnlyError(ValueError):
    """The evaluation verifier was asked to act as a reward."""


class SceneParser(nn.Module):
    """Convolutional body, average-pooled onto the 3x3 grid, then a per-cell head shared by all
    cells (1x1 convolutions). The penultimate per-cell features, flattened, are the FID features."""

    def __init__(self, width: int = 16, head_dim: int = 64):
        super().__init__()
        w = width

        def block(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(3, w),
            block(w, w),
            block(w, 2 * w, 2),
            block(2 * w, 2 * w),
            block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.cell = nn.Conv2d(4 * w, head_dim, 1)
        self.head = nn.Conv2d(head_dim, N_CLASSES, 1)
        self.num_features = head_dim * N_CELLS
        self.role = "reward"  # "evaluation" for the evaluation-only verifier (set by load_verifier)

    def cell_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.cell(self.pool(self.body(x))))  # [B, head_dim, 3, 3]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, num_features] of images in [-1, 1]."""
        return self.cell_features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell logits [B, 9, 13] of images in [-1, 1] (cells in row-major order)."""
        return self.head(self.cell_features(x)).flatten(2).transpose(1, 2)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(-1)


def _training_batch(rng: random.Random, gen: torch.Generator, n: int, perturb_frac: float = 0.5):
    """Random scenes (half of them prompt scenes) with light geometric and photometric noise."""
    scenes = []
    for _ in range(n):
        if rng.random() < 0.5:
            scenes.append(random_scene(rng))
        else:
            spec, _ = sample_specs("all", 1, "train", rng)[0]
            scenes.append(scene_for_spec(spec, rng))
    images = render_scenes(scenes, gen, position_jitter=1.5, color_jitter=20.0, scale_jitter=0.12)
    k = int(n * perturb_frac)
    if k:
        images[:k] = perturb(images[:k], gen)
    return images, scene_targets(scenes)


def train_verifier(
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
    log=print,
    progress=None,
    perturb_frac: float = 0.5,
) -> SceneParser:
    """Train a scene parser on fresh renders; ``perturb_frac`` of each batch gets image noise."""
    if not 0.0 <= perturb_frac <= 1.0:
        raise ValueError(f"perturb_frac must be in [0, 1], got {perturb_frac}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SceneParser(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    it = range(steps) if progress is None else progress(range(steps), total=steps, desc="verifier")
    for step in it:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30) * (0.05 + 0.95 * (1 - step / steps))
        images, targets = _training_batch(rng, gen, batch_size, perturb_frac)
        logits = model(images)
        loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            acc = (logits.argmax(-1) == targets).all(-1).float().mean().item()
            log(f"verifier step {step} loss {loss.item():.4f} scene acc {acc:.3f}")
    return model.eval()


def save_verifier(model: SceneParser, path: str | Path, role: str = "reward") -> Path:
    """Write the weights; ``role="evaluation"`` marks an evaluation-only verifier (never a reward)."""
    from safetensors.torch import save_file

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    width = model.body[0][0].out_channels
    meta = {"width": str(width), "head_dim": str(model.cell.out_channels), "role": role}
    save_file(state, str(path), metadata=meta)
    return path


def load_verifier(path: str | Path) -> SceneParser:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"verifier weights not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = SceneParser(int(meta.get("width", 16)), int(meta.get("head_dim", 64)))
    model.load_state_dict(load_file(str(path)))
    model.role = meta.get("role", "reward")
    model.requires_grad_(False)
    return model.eval()


def eval_verifier_path() -> Path:
    return ASSETS / "eval_verifier.safetensors"


@lru_cache(maxsize=1)
def _eval_verifier(path: str) -> SceneParser:
    model = load_verifier(path)
    if model.role != "evaluation":
        raise RuntimeError(f"{path} is not marked as an evaluation verifier (role {model.role!r})")
    return model


def load_eval_verifier() -> SceneParser:
    """The evaluation-only verifier (seed 1, heavier augmentation): same interface as the reward's
    verifier (pass it as ``verifier=`` to ``faithfulness``, ``fid`` or ``evaluate_pipeline``), never
    usable as a reward. Frozen, eval mode, cached."""
    path = eval_verifier_path()
    if not path.exists():
        raise FileNotFoundError(
            f"evaluation verifier not found at {path}; build it with `diffalign world build` "
            "(stage eval_verifier.safetensors)"
        )
    return _eval_verifier(str(path))


def check_reward_verifier(model: SceneParser) -> SceneParser:
    """Raise ``EvaluationOnlyError`` if ``model`` is the evaluation-only verifier."""
    if getattr(model, "role", "reward") == "evaluation":
        raise EvaluationOnlyError(
            "the evaluation verifier scores benchmarks only and cannot back a reward; "
            "use the default verifier (verifier_path=None)"
        )
    return model


@torch.no_grad()
def evaluate_verifier(model: SceneParser, n: int = 1000, seed: int = 10_000, perturbed: bool = False) -> dict:
    """Accuracy on held-out renders: exact scene, and per question type (exists / colour / count /
    relation) over the questions of held-out prompts asked of matched and of mismatched scenes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    per_skill = n // len(SKILLS)
    specs = []
    for i, skill in enumerate(SKILLS):
        specs += [s for s, _ in sample_specs(skill, per_skill, "heldout", seed + i)]
    scenes = [scene_for_spec(s, rng) for s in specs]
    # mismatched pairs: each spec is also asked of another spec's scene
    others = scenes[1:] + scenes[:1]
    all_scenes = scenes + others + [random_scene(rng) for _ in range(len(specs))]
    images = render_scenes(all_scenes, gen)
    if perturbed:
        images = perturb(images, gen)
    probs = torch.cat([model.probs(images[i : i + 256]) for i in range(0, len(images), 256)])
    parsed = F.one_hot(probs.argmax(-1), N_CLASSES).float()
    truth = scene_to_probs(all_scenes)
    scene_acc = (parsed.argmax(-1) == truth.argmax(-1)).all(-1).float().mean().item()
    names = {"entity": "exists", "attribute": "colour", "count": "count", "relation": "relation"}
    hits: dict[str, list[float]] = {names[c]: [] for c in CATEGORIES}
    for idx, spec in enumerate(specs + specs):
        qs = compile_spec(spec)
        for q in qs:
            a_true = float(answer(q.op, truth[idx : idx + 1])[0]) >= 0.5
            a_pred = float(answer(q.op, parsed[idx : idx + 1])[0]) >= 0.5
            hits[names[q.category]].append(float(a_true == a_pred))
    out = {"scene_accuracy": scene_acc, "n_images": len(all_scenes)}
    out.update({f"{k}_accuracy": sum(v) / len(v) for k, v in hits.items() if v})
    out["n_questions"] = sum(len(v) for v in hits.values())
    return out


@torch.no_grad()
def verifier_agreement(images: torch.Tensor, prompts: list[str], a: SceneParser, b: SceneParser) -> dict:
    """How two verifiers agree on the same images: per question type, the fraction of hard answers
    they give alike; per prompt, the fraction of DSG scores equal; and each one's faithfulness."""
    from .grammar import parse_prompt
    from .questions import score_parsed

    pa = torch.cat([a.probs(images[i : i + 256]) for i in range(0, len(images), 256)])
    pb = torch.cat([b.probs(images[i : i + 256]) for i in range(0, len(images), 256)])
    ha = F.one_hot(pa.argmax(-1), N_CLASSES).float()
    hb = F.one_hot(pb.argmax(-1), N_CLASSES).float()
    names = {"entity": "exists", "attribute": "colour", "count": "count", "relation": "relation"}
    same: dict[str, list[float]] = {names[c]: [] for c in CATEGORIES}
    for idx, prompt in enumerate(prompts):
        for q in compile_spec(parse_prompt(prompt)):
            ya = float(answer(q.op, ha[idx : idx + 1])[0]) >= 0.5
            yb = float(answer(q.op, hb[idx : idx + 1])[0]) >= 0.5
            same[names[q.category]].append(float(ya == yb))
    ra, rb = score_parsed(pa, prompts), score_parsed(pb, prompts)
    all_same = [x for v in same.values() for x in v]
    out = {
        "n_images": len(prompts),
        "answer_agreement": sum(all_same) / len(all_same),
        "prompt_score_agreement": sum(float(x == y) for x, y in zip(ra.per_prompt, rb.per_prompt))
        / len(prompts),
        "scene_agreement": (ha.argmax(-1) == hb.argmax(-1)).all(-1).float().mean().item(),
        "faithfulness_a": ra.overall,
        "faithfulness_b": rb.overall,
        "per_skill_a": ra.per_skill,
        "per_skill_b": rb.per_skill,
    }
    out.update({f"{k}_agreement": sum(v) / len(v) for k, v in same.items() if v})
    return out
