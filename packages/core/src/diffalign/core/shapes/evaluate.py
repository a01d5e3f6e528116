"""The one evaluation path of the shapes world: held-out prompts, sampling noise, faithfulness and FID.

Every shapes benchmark measures a model the same way:

- **prompts**: ``heldout_prompts(n_per_skill)``, ``n_per_skill`` held-out prompts of each skill in the
  order of ``SKILLS``; skill ``k`` is drawn with seed ``EVAL_PROMPT_SEED + SKILLS.index(k)``, so a
  subset of skills gets the same prompts as the full set;
- **noise**: prompt ``i`` is sampled with its own generator, ``noise_generators`` (seed
  ``seed * 1_000_000 + i``), so an image does not depend on the batch size or on the other prompts;
- **scores**: ``score_images`` gives DSG faithfulness (overall, mean over skills, per skill, per
  question category) and FID in verifier-feature space against the committed reference renders.

``sample_images(sample_fn, prompts)`` runs any sampler under that noise contract
(``sample_fn(prompts, generators) -> images in [-1, 1]``); ``pipeline_sampler`` is the one for a
diffusers pipeline; ``evaluate_sampler`` samples, scores and times in one call. ``protocol()`` is the
record a benchmark writes beside its rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .grammar import SKILLS, eval_prompts

EVAL_PROMPTS_PER_SKILL = 25  # 100 held-out prompts: the teacher rows of every benchmark
EVAL_PROMPT_SEED = 1234
EVAL_NOISE_SEED = 0
EVAL_GUIDANCE = 4.0
EVAL_IMAGE_SIZE = 32
NOISE_SEED_STRIDE = 1_000_000

SampleFn = Callable[[list[str], list[torch.Generator]], torch.Tensor]


def heldout_prompts(
    n_per_skill: int = EVAL_PROMPTS_PER_SKILL,
    skills: Sequence[str] | None = None,
    seed: int = EVAL_PROMPT_SEED,
) -> list[str]:
    """The held-out evaluation prompts: ``n_per_skill`` of each skill (default all, in ``SKILLS`` order)."""
    return eval_prompts(n_per_skill, seed=seed, skills=skills)


def heldout_records(
    n_per_skill: int = EVAL_PROMPTS_PER_SKILL,
    skills: Sequence[str] | None = None,
    seed: int = EVAL_PROMPT_SEED,
) -> list[dict]:
    """``heldout_prompts`` as ``{"skill", "text"}`` records (same prompts, same order)."""
    chosen = list(SKILLS if skills is None else skills)
    texts = heldout_prompts(n_per_skill, chosen, seed)
    return [{"skill": chosen[i // n_per_skill], "text": t} for i, t in enumerate(texts)]


def noise_seed(seed: int, index: int) -> int:
    """Seed of the generator that samples prompt ``index`` of a run with noise seed ``seed``."""
    if not 0 <= index < NOISE_SEED_STRIDE:
        raise ValueError(f"prompt index must lie in [0, {NOISE_SEED_STRIDE}), got {index}")
    return seed * NOISE_SEED_STRIDE + index


def noise_generators(n: int, seed: int = EVAL_NOISE_SEED, start: int = 0) -> list[torch.Generator]:
    """One CPU generator per prompt, for prompts ``start .. start + n - 1``."""
    return [torch.Generator().manual_seed(noise_seed(seed, start + i)) for i in range(n)]


def shapes_call_kwargs(pipe) -> dict:
    """Pipeline arguments of a shapes-world sample: 32x32 and, for PixArt, no resolution binning."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    kw: dict = {"height": EVAL_IMAGE_SIZE, "width": EVAL_IMAGE_SIZE}
    if isinstance(pipe, (PixArtAlphaPipeline, PixArtSigmaPipeline)):
        kw.update(use_resolution_binning=False, clean_caption=False, max_sequence_length=20)
    return kw


def pipeline_sampler(pipe, steps: int, guidance: float = EVAL_GUIDANCE, **call_kwargs) -> SampleFn:
    """A ``sample_fn`` calling ``pipe`` with its own scheduler; ``call_kwargs`` override
    ``shapes_call_kwargs(pipe)`` (e.g. ``height``/``width`` for a model of another size)."""
    kwargs = {**shapes_call_kwargs(pipe), **call_kwargs}

    def sample(prompts: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        out = pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pt",
            **kwargs,
        ).images
        return out.float().cpu() * 2 - 1

    return sample


@torch.no_grad()
def sample_images(
    sample_fn: SampleFn,
    prompts: Sequence[str],
    seed: int = EVAL_NOISE_SEED,
    batch_size: int = 50,
    desc: str | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] for ``prompts``; prompt ``i`` gets ``noise_generators`` entry ``i``."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = None
    if desc is not None:
        from diffalign.core.training import progress

        bar = progress(total=len(prompts), desc=desc)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        images = sample_fn(chunk, noise_generators(len(chunk), seed, start))
        if images.shape[0] != len(chunk):
            raise ValueError(f"the sampler returned {images.shape[0]} images for {len(chunk)} prompts")
        out.append(images.float().cpu())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return torch.cat(out).clamp(-1, 1)


def score_images(images, prompts: Sequence[str], verifier=None, reference: str = "renders") -> dict:
    """Faithfulness (overall, skill_mean, per_skill, per_category, n_questions) and FID of images."""
    from .scoring import faithfulness, fid

    prompts = list(prompts)
    row = faithfulness(images, prompts, verifier).as_dict()
    row["fid"] = fid(images, reference, verifier) if len(prompts) >= 2 else float("nan")
    return row


def evaluate_sampler(
    sample_fn: SampleFn,
    prompts: Sequence[str],
    seed: int = EVAL_NOISE_SEED,
    batch_size: int = 50,
    verifier=None,
    reference: str = "renders",
) -> tuple[dict, torch.Tensor]:
    """Sample, score and time: (row, images). The row holds ``score_images`` plus ``seconds`` (wall,
    load-dependent), ``cpu_seconds`` (process CPU time) and ``seconds_per_image``."""
    wall, cpu = time.perf_counter(), time.process_time()
    images = sample_images(sample_fn, prompts, seed, batch_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = score_images(images, prompts, verifier, reference)
    row.update(seconds=round(wall, 2), cpu_seconds=round(cpu, 2), seconds_per_image=wall / len(images))
    return row, images


def protocol(
    n_per_skill: int = EVAL_PROMPTS_PER_SKILL,
    skills: Sequence[str] | None = None,
    prompt_seed: int = EVAL_PROMPT_SEED,
    noise_seed: int = EVAL_NOISE_SEED,
    reference: str = "renders",
    verifier: str = "committed",
) -> dict:
    """What a benchmark writes beside its rows so runs of different packages can be compared."""
    chosen = list(SKILLS if skills is None else skills)
    return {
        "split": "heldout",
        "prompts": "diffalign.core.shapes.evaluate.heldout_prompts",
        "n_per_skill": n_per_skill,
        "skills": chosen,
        "n_prompts": n_per_skill * len(chosen),
        "prompt_seed": prompt_seed,
        "noise_seed": noise_seed,
        "noise": f"prompt i: torch.Generator().manual_seed(noise_seed * {NOISE_SEED_STRIDE} + i)",
        "fid_reference": reference,
        "verifier": verifier,
    }


def load_shapes_pipeline(path: str | Path):
    """Load a shapes teacher folder (StableDiffusionPipeline or PixArtAlphaPipeline) in float32, through
    core's checked loader (missing or unexpected weights are an error)."""
    from diffalign.core.models import load_pipeline

    return load_pipeline(Path(path), dtype=torch.float32)


def evaluate_pipeline(
    pipe,
    n_per_skill: int = EVAL_PROMPTS_PER_SKILL,
    steps: tuple[int, ...] = (50, 4),
    guidance: float = EVAL_GUIDANCE,
    seed: int = EVAL_NOISE_SEED,
    verifier=None,
    grid_path: str | Path | None = None,
    log=print,
    reference: str = "renders",
) -> dict:
    """Faithfulness (overall, per skill, per category) and FID of a pipeline for each number of steps,
    on ``heldout_prompts(n_per_skill)``. ``verifier`` replaces the committed one for scoring."""
    from ._util import save_grid

    prompts = heldout_prompts(n_per_skill)
    pipe.set_progress_bar_config(disable=True)
    out = {"n_prompts": len(prompts), "guidance": guidance, "steps": {}}
    for s in steps:
        row, images = evaluate_sampler(
            pipeline_sampler(pipe, s, guidance), prompts, seed, verifier=verifier, reference=reference
        )
        out["steps"][str(s)] = row
        log(
            f"{s} steps: overall {row['overall']:.3f} skill mean {row['skill_mean']:.3f} "
            + " ".join(f"{k} {v:.2f}" for k, v in row["per_skill"].items())
            + f" FID {row['fid']:.1f}"
        )
        if grid_path is not None:
            save_grid(images[:32], Path(grid_path).with_name(f"{Path(grid_path).stem}_{s}steps.png"), nrow=8)
    return out


def render_baselines(
    n_per_skill: int = EVAL_PROMPTS_PER_SKILL, seed: int = 0, verifier=None, reference: str = "renders"
) -> dict:
    """Reference points: matched renders (should be ~1) and mismatched renders (chance, ~0.28)."""
    import random

    from .grammar import parse_prompt
    from .render import render_scenes, scene_for_spec
    from .scoring import faithfulness

    prompts = heldout_prompts(n_per_skill)
    rng = random.Random(seed)
    images = render_scenes([scene_for_spec(parse_prompt(p), rng) for p in prompts], seed)
    matched = score_images(images, prompts, verifier, reference)
    shifted = prompts[1:] + prompts[:1]
    mismatched = faithfulness(images, shifted, verifier).as_dict()
    return {"matched_renders": matched, "mismatched_renders": mismatched}


def main(argv: list[str] | None = None) -> dict:
    """``python -m diffalign.core.shapes.evaluate --out FILE``: the teacher rows every benchmark shares
    (each teacher with its own scheduler, on this module's prompts and noise)."""
    import argparse
    import json
    import platform

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["shapes/unet", "shapes/dit"])
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 20, 25, 50])
    ap.add_argument("--n-per-skill", type=int, default=EVAL_PROMPTS_PER_SKILL)
    ap.add_argument("--guidance", type=float, default=EVAL_GUIDANCE)
    ap.add_argument("--seed", type=int, default=EVAL_NOISE_SEED)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    from diffalign.core.models import resolve_model_path

    report = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "evaluation": protocol(args.n_per_skill, noise_seed=args.seed),
        "guidance": args.guidance,
        "rows": {},
    }
    for model in args.models:
        pipe = load_shapes_pipeline(resolve_model_path(model))
        res = evaluate_pipeline(pipe, args.n_per_skill, tuple(args.steps), args.guidance, args.seed)
        for steps, row in res["steps"].items():
            report["rows"][f"{model}@{steps}"] = row
            if args.out:  # written after every row
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


__all__ = [
    "EVAL_GUIDANCE",
    "EVAL_IMAGE_SIZE",
    "EVAL_NOISE_SEED",
    "EVAL_PROMPTS_PER_SKILL",
    "EVAL_PROMPT_SEED",
    "evaluate_pipeline",
    "evaluate_sampler",
    "heldout_prompts",
    "heldout_records",
    "main",
    "load_shapes_pipeline",
    "noise_generators",
    "noise_seed",
    "pipeline_sampler",
    "protocol",
    "render_baselines",
    "sample_images",
    "score_images",
    "shapes_call_kwargs",
]


if __name__ == "__main__":
    main()
