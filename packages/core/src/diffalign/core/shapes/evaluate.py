"""Measure a shapes teacher: per-skill DSG faithfulness and verifier-feature FID on held-out prompts."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .grammar import eval_prompts


def load_shapes_pipeline(path: str | Path):
    """Load a shapes teacher folder (StableDiffusionPipeline or PixArtAlphaPipeline) in float32."""
    import json

    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    cls = (
        PixArtAlphaPipeline if index.get("_class_name") == "PixArtAlphaPipeline" else StableDiffusionPipeline
    )
    pipe = cls.from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_pipeline(
    pipe,
    n_per_skill: int = 25,
    steps: tuple[int, ...] = (50, 4),
    guidance: float = 4.0,
    seed: int = 0,
    verifier=None,
    grid_path: str | Path | None = None,
    log=print,
    reference: str = "renders",
) -> dict:
    """Faithfulness (overall, per skill, per category) and FID for each number of sampling steps."""
    from ._util import save_grid
    from .scoring import faithfulness, fid
    from .teachers import sample_pipeline

    prompts = eval_prompts(n_per_skill)
    pipe.set_progress_bar_config(disable=True)
    out = {"n_prompts": len(prompts), "guidance": guidance, "steps": {}}
    for s in steps:
        t0 = time.time()
        images = sample_pipeline(pipe, prompts, steps=s, guidance=guidance, seed=seed)
        res = faithfulness(images, prompts, verifier)
        row = res.as_dict()
        row["fid"] = fid(images, reference, verifier) if len(prompts) >= 2 else float("nan")
        row["seconds"] = round(time.time() - t0, 1)
        out["steps"][str(s)] = row
        log(
            f"{s} steps: overall {row['overall']:.3f} skill mean {row['skill_mean']:.3f} "
            + " ".join(f"{k} {v:.2f}" for k, v in row["per_skill"].items())
            + f" FID {row['fid']:.1f}"
        )
        if grid_path is not None:
            save_grid(images[:32], Path(grid_path).with_name(f"{Path(grid_path).stem}_{s}steps.png"), nrow=8)
    return out


def render_baselines(n_per_skill: int = 25, seed: int = 0, verifier=None, reference: str = "renders") -> dict:
    """Reference points: matched renders (should be ~1) and mismatched renders (chance, ~0.28)."""
    import random

    from .grammar import parse_prompt
    from .render import render_scenes, scene_for_spec
    from .scoring import faithfulness, fid

    prompts = eval_prompts(n_per_skill)
    rng = random.Random(seed)
    images = render_scenes([scene_for_spec(parse_prompt(p), rng) for p in prompts], seed)
    matched = faithfulness(images, prompts, verifier).as_dict()
    matched["fid"] = fid(images, reference, verifier)
    shifted = prompts[1:] + prompts[:1]
    mismatched = faithfulness(images, shifted, verifier).as_dict()
    return {"matched_renders": matched, "mismatched_renders": mismatched}
