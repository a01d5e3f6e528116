"""The shapes world: a small, real text-to-image world measurable on a CPU.

32x32 renders of 1-3 coloured shapes on a 3x3 grid, a prompt grammar with four skills and
disjoint train / held-out splits, a scene-parser verifier giving DSG-style faithfulness, a
differentiable reward and FID features, simulated annotators, and two teachers shipped as
standard diffusers folders (``shapes/unet``: StableDiffusionPipeline, ``shapes/dit``:
PixArtAlphaPipeline, sampled with ``use_resolution_binning=False``), plus ``shapes/unet-web``: the
UNet teacher adapted on web-like misaligned captions (a committed LoRA, fused on first use), and an
evaluation-only verifier (``load_eval_verifier``) that no reward can use.
"""

from __future__ import annotations

from pathlib import Path

from .grammar import (
    COLORS,
    RELATIONS,
    SHAPES,
    SKILLS,
    all_prompts,
    eval_prompts,
    parse_prompt,
    prompt_split,
    sample_prompts,
)
from .questions import FaithfulnessResult, Question, compile_prompt
from .render import random_scene, render_scenes, scene_for_spec

ASSETS = Path(__file__).parent / "assets"
MODELS = ("unet", "dit", "unet-web")


def model_path(name: str) -> Path:
    """Folder of a committed shapes model: ``model_path("unet")``, ``"dit"`` or ``"unet-web"``
    (``"shapes/unet"`` etc. are accepted too). ``unet-web`` is the UNet teacher with the committed
    web-caption LoRA fused in, written once to a cache folder."""
    key = name.split("/", 1)[1] if name.startswith("shapes/") else name
    if key not in MODELS:
        raise ValueError(f"unknown shapes model {name!r}; expected one of {[f'shapes/{m}' for m in MODELS]}")
    if key == "unet-web":
        from .web_captions import web_base_path

        return web_base_path()
    path = ASSETS / key
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"shapes teacher {key!r} is not built at {path}; run `diffalign world build` to build it"
        )
    return path


def load_eval_verifier():
    """The evaluation-only verifier (see ``verifier.load_eval_verifier``)."""
    from .verifier import load_eval_verifier as _load

    return _load()


def render_prompts(prompts: list[str], seed: int = 0):
    """Renders that satisfy the prompts exactly ([B, 3, 32, 32] in [-1, 1])."""
    import random

    rng = random.Random(seed)
    return render_scenes([scene_for_spec(parse_prompt(p), rng) for p in prompts], seed)


def faithfulness(images, prompts, verifier=None) -> FaithfulnessResult:
    from .scoring import faithfulness as _f

    return _f(images, prompts, verifier)


def fid(images, reference: str = "renders") -> float:
    from .scoring import fid as _fid

    return _fid(images, reference)


def make_preference_pairs(n: int, split: str = "in_distribution", seed: int = 0):
    from .annotators import make_preference_pairs as _m

    return _m(n, split, seed)


__all__ = [
    "COLORS",
    "FaithfulnessResult",
    "MODELS",
    "Question",
    "RELATIONS",
    "SHAPES",
    "SKILLS",
    "all_prompts",
    "compile_prompt",
    "eval_prompts",
    "faithfulness",
    "fid",
    "load_eval_verifier",
    "make_preference_pairs",
    "model_path",
    "parse_prompt",
    "prompt_split",
    "random_scene",
    "render_prompts",
    "render_scenes",
    "sample_prompts",
]
