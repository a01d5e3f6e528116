"""Deterministic, resumable build of the shapes world.

Stages (each skipped when its output exists; teachers resume from their checkpoints):

1. ``tokenizer/``              word-level tokenizer
2. ``vae/``                    tiny AutoencoderKL trained on renders
3. ``verifier.safetensors``    scene parser (+ ``verifier_eval.json``)
3b. ``eval_verifier.safetensors``  evaluation-only scene parser, seed 1, heavier augmentation
                               (+ ``eval_verifier.json``: accuracy per question type)
4. ``fid_reference.safetensors``  verifier-feature statistics of held-out renders
5. ``teacher_<kind>/``         training runs (checkpoints, sample grids, log)
6. ``unet/``, ``dit/``          exported diffusers folders (EMA weights, fp16)
7. ``world_info.json``         measured numbers

``--micro`` builds a tiny world end to end in seconds (quality not meaningful).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._util import write_json

# Cosine horizons of the committed teachers. The runs behind them first trained under a 30,000-step
# horizon and were resumed with these (at 3,910 / 5,679 steps); annealing the learning rate to its
# floor is what took 50-step faithfulness from ~0.6-0.75 to ~0.9 (shapes README).
DEFAULT_TEACHER_STEPS = {"unet": 8000, "dit": 11000}


@dataclass
class BuildPlan:
    vae_steps: int = 500
    decoder_steps: int = 1500
    verifier_steps: int = 800
    eval_verifier: bool = True
    teacher_steps: int | None = None  # None: DEFAULT_TEACHER_STEPS per teacher
    eval_per_skill: int = 25
    eval_steps: tuple[int, ...] = (50, 4)
    micro: bool = False

    @classmethod
    def micro_plan(cls) -> BuildPlan:
        return cls(
            vae_steps=3,
            decoder_steps=2,
            verifier_steps=3,
            teacher_steps=2,
            eval_per_skill=1,
            eval_steps=(2,),
            micro=True,
        )


def _log_to(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def build_world(
    out_dir: str | Path,
    plan: BuildPlan | None = None,
    teachers: tuple[str, ...] = ("unet", "dit"),
    seed: int = 0,
    threads: int | None = None,
    log=None,
) -> dict:
    """Build (or resume building) the shapes world into ``out_dir``; returns the world info."""
    from diffalign.core.training import progress

    from .scoring import compute_reference_stats, save_reference_stats
    from .teachers import TeacherConfig, export_teacher, train_teacher
    from .tokenizer import save_tokenizer
    from .vae import finetune_decoder, train_vae
    from .verifier import evaluate_verifier, load_verifier, save_verifier, train_verifier

    plan = plan or BuildPlan()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or _log_to(out / "build.log")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        save_tokenizer(tok_dir)
        log("tokenizer written")

    vae_dir = out / "vae"
    if not (vae_dir / "config.json").exists():
        if not (out / "vae_base" / "config.json").exists():
            train_vae(
                out / "vae.tmp", steps=plan.vae_steps, seed=seed, micro=plan.micro, log=log, progress=progress
            )
            shutil.rmtree(out / "vae_base", ignore_errors=True)
            (out / "vae.tmp").rename(out / "vae_base")
        # sharpen the decoder with the encoder frozen (the latent space is unchanged)
        finetune_decoder(
            out / "vae_base",
            out / "vae.tmp",
            steps=plan.decoder_steps,
            seed=seed + 1,
            log=log,
            progress=progress,
        )
        shutil.rmtree(vae_dir, ignore_errors=True)
        (out / "vae.tmp").rename(vae_dir)
        vae_info = {"recon_l1": _recon_l1(vae_dir)}
        write_json(vae_info, out / "vae_info.json")

    ver_path = out / "verifier.safetensors"
    if not ver_path.exists():
        model = train_verifier(
            steps=plan.verifier_steps, seed=seed, width=4 if plan.micro else 16, log=log, progress=progress
        )
        save_verifier(model, out / "verifier.tmp.safetensors")
        (out / "verifier.tmp.safetensors").rename(ver_path)
    verifier = load_verifier(ver_path)
    if not (out / "verifier_eval.json").exists():
        n = 40 if plan.micro else 1000
        ev = {
            "clean": evaluate_verifier(verifier, n=n),
            "perturbed": evaluate_verifier(verifier, n=n, perturbed=True),
        }
        write_json(ev, out / "verifier_eval.json")
        log(f"verifier: {json.dumps(ev['clean'])}")

    if plan.eval_verifier:
        build_eval_verifier(out, steps=plan.verifier_steps, micro=plan.micro, log=log, progress=progress)

    ref_path = out / "fid_reference.safetensors"
    if not ref_path.exists():
        mu, sigma = compute_reference_stats(verifier, n=64 if plan.micro else 2000)
        save_reference_stats(ref_path, mu, sigma)

    for kind in teachers:
        export_dir = out / kind
        if (export_dir / "model_index.json").exists():
            continue
        cfg = TeacherConfig(
            kind=kind,
            steps=plan.teacher_steps or DEFAULT_TEACHER_STEPS[kind],
            lr=1e-3 if kind == "unet" else 5e-4,
            seed=seed,
            micro=plan.micro,
            batch_size=4 if plan.micro else TeacherConfig.batch_size,
            sample_every=0 if plan.micro else TeacherConfig.sample_every,
        )
        ema, vae = train_teacher(cfg, out / f"teacher_{kind}", vae_dir, tok_dir, log=log, progress=progress)
        export_teacher(kind, ema, vae, out / f"{kind}.tmp")
        shutil.rmtree(export_dir, ignore_errors=True)
        (out / f"{kind}.tmp").rename(export_dir)
        log(f"{kind} teacher exported to {export_dir}")

    info_path = out / "world_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("verifier", json.loads((out / "verifier_eval.json").read_text()))
    if "renders" not in info:
        from .evaluate import render_baselines

        info["renders"] = render_baselines(plan.eval_per_skill, verifier=verifier, reference=str(ref_path))
    for kind in teachers:
        key = f"teacher_{kind}"
        if key in info:
            continue
        from .evaluate import evaluate_pipeline, load_shapes_pipeline

        pipe = load_shapes_pipeline(out / kind)
        info[key] = evaluate_pipeline(
            pipe,
            plan.eval_per_skill,
            plan.eval_steps,
            verifier=verifier,
            log=lambda m, k=kind: log(f"{k}: {m}"),
            reference=str(ref_path),
        )
        write_json(info, info_path)
    write_json(info, info_path)
    return info


def build_eval_verifier(out_dir: str | Path, steps: int = 800, micro: bool = False, log=print, progress=None):
    """Train (unless present) the evaluation-only verifier into ``out_dir`` and measure it on held-out
    renders (``eval_verifier.json``). Same code as the reward's verifier; another seed, and three
    quarters of each batch perturbed instead of half."""
    from .verifier import (
        EVAL_PERTURB_FRAC,
        EVAL_VERIFIER_SEED,
        evaluate_verifier,
        load_verifier,
        save_verifier,
        train_verifier,
    )

    out = Path(out_dir)
    path = out / "eval_verifier.safetensors"
    if not path.exists():
        model = train_verifier(
            steps=steps,
            seed=EVAL_VERIFIER_SEED,
            width=4 if micro else 16,
            log=log,
            progress=progress,
            perturb_frac=EVAL_PERTURB_FRAC,
        )
        save_verifier(model, out / "eval_verifier.tmp.safetensors", role="evaluation")
        (out / "eval_verifier.tmp.safetensors").rename(path)
    info_path = out / "eval_verifier.json"
    if not info_path.exists():
        model = load_verifier(path)
        n = 40 if micro else 1000
        ev = {
            "seed": EVAL_VERIFIER_SEED,
            "perturb_frac": EVAL_PERTURB_FRAC,
            "steps": steps,
            "clean": evaluate_verifier(model, n=n),
            "perturbed": evaluate_verifier(model, n=n, perturbed=True),
            "size_bytes": path.stat().st_size,
        }
        write_json(ev, info_path)
        log(f"eval verifier: {json.dumps(ev['clean'])}")
    return path


def measure_verifier_agreement(
    models: tuple[str, ...] = ("shapes/unet", "shapes/dit"),
    n_per_skill: int = 25,
    steps: int = 50,
    guidance: float = 4.0,
    seed: int = 0,
    eval_verifier=None,
    log=print,
) -> dict:
    """Agreement of the reward's verifier and the evaluation verifier on teacher samples of the
    held-out evaluation prompts (``verifier.verifier_agreement`` per model)."""
    from diffalign.core.models import resolve_model_path

    from .evaluate import load_shapes_pipeline
    from .grammar import eval_prompts
    from .scoring import get_verifier
    from .teachers import sample_pipeline
    from .verifier import load_eval_verifier, verifier_agreement

    prompts = eval_prompts(n_per_skill)
    v2 = eval_verifier if eval_verifier is not None else load_eval_verifier()
    out = {}
    for m in models:
        pipe = load_shapes_pipeline(resolve_model_path(m))
        images = sample_pipeline(pipe, prompts, steps=steps, guidance=guidance, seed=seed)
        ag = verifier_agreement(images, prompts, get_verifier(), v2)
        ag.update({"steps": steps, "guidance": guidance, "seed": seed})
        out[m] = ag
        log(
            f"{m}: answers agree {ag['answer_agreement']:.3f}, faithfulness {ag['faithfulness_a']:.3f} / "
            f"{ag['faithfulness_b']:.3f}"
        )
    return out


def _recon_l1(vae_dir: Path, n: int = 128) -> float:
    import random

    from .render import random_scene, render_scenes
    from .teachers import load_vae

    vae = load_vae(vae_dir)
    rng = random.Random(4242)
    x = render_scenes([random_scene(rng) for _ in range(n)], 4242)
    with torch.no_grad():
        r = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return float((r - x).abs().mean())


def install_world(build_dir: str | Path, assets_dir: str | Path | None = None) -> Path:
    """Copy a build's shippable parts (verifier, FID statistics, teachers, world_info) into assets."""
    from .scoring import ASSETS

    src = Path(build_dir)
    dst = Path(assets_dir) if assets_dir is not None else ASSETS
    dst.mkdir(parents=True, exist_ok=True)
    for name in (
        "verifier.safetensors",
        "eval_verifier.safetensors",
        "eval_verifier.json",
        "fid_reference.safetensors",
        "world_info.json",
    ):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    for kind in ("unet", "dit"):
        if (src / kind / "model_index.json").exists():
            shutil.rmtree(dst / kind, ignore_errors=True)
            shutil.copytree(src / kind, dst / kind)
    return dst
