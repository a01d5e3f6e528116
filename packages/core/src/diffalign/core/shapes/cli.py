"""``diffalign world``: build, sample and describe the shapes world."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="The shapes world: build, sample, info.", no_args_is_help=True, add_completion=False)


@app.command()
def build(
    out: Path = typer.Option(Path("runs/world"), "--out", help="Build directory (resumable)."),
    micro: bool = typer.Option(False, "--micro", help="Tiny models and a few steps (seconds; for tests)."),
    teachers: str = typer.Option("unet,dit", "--teachers", help="Comma-separated teachers to build."),
    teacher_steps: int = typer.Option(
        None, "--teacher-steps", help="Steps (cosine horizon) of both teachers; default unet 8000, dit 11000."
    ),
    install: bool = typer.Option(False, "--install", help="Copy the result into the package's assets."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Rebuild the world deterministically; rerun to resume after a stop."""
    from .build import BuildPlan, build_world, install_world

    kinds = tuple(t.strip() for t in teachers.split(",") if t.strip())
    bad = [k for k in kinds if k not in ("unet", "dit")]
    if bad:
        typer.echo(f"error: unknown teacher(s) {bad}; expected unet and/or dit", err=True)
        raise typer.Exit(code=2)
    plan = BuildPlan.micro_plan() if micro else BuildPlan()
    if teacher_steps is not None:
        if teacher_steps < 1:
            typer.echo("error: --teacher-steps must be >= 1", err=True)
            raise typer.Exit(code=2)
        plan.teacher_steps = teacher_steps
    build_world(out, plan, kinds, seed=seed)
    if install:
        typer.echo(f"installed into {install_world(out)}")


@app.command("export-teacher")
def export_teacher_cmd(
    kind: str = typer.Option(..., "--kind", help="unet or dit"),
    run_dir: Path = typer.Option(..., "--run-dir", help="Teacher training run (with checkpoints/)."),
    vae: Path = typer.Option(..., "--vae", help="VAE folder (the build's vae/)."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer folder (the build's tokenizer/)."),
    out: Path = typer.Option(..., "--out", help="Pipeline folder to write."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Measure it and update world_info.json."),
    info_path: Path = typer.Option(None, "--info", help="world_info.json to update (default: assets)."),
    n_per_skill: int = typer.Option(25, "--n-per-skill"),
    note: str = typer.Option("", "--note", help="Free text stored with the numbers (e.g. the step)."),
) -> None:
    """Export the EMA weights of a teacher run's latest checkpoint (and optionally measure them)."""
    from .teachers import TEACHERS, export_from_checkpoint

    if kind not in TEACHERS:
        typer.echo(f"error: --kind must be one of {TEACHERS}", err=True)
        raise typer.Exit(code=2)
    for p in (run_dir, vae, tokenizer):
        if not p.exists():
            typer.echo(f"error: {p} does not exist", err=True)
            raise typer.Exit(code=2)
    export_from_checkpoint(kind, run_dir, vae, tokenizer, out)
    typer.echo(f"exported {kind} to {out}")
    if evaluate:
        from ._util import write_json
        from .evaluate import evaluate_pipeline, load_shapes_pipeline
        from .scoring import ASSETS

        res = evaluate_pipeline(load_shapes_pipeline(out), n_per_skill, grid_path=Path(run_dir) / "eval.png")
        if note:
            res["note"] = note
        info_path = info_path or ASSETS / "world_info.json"
        data = json.loads(info_path.read_text()) if info_path.exists() else {}
        data[f"teacher_{kind}"] = res
        write_json(data, info_path)
        typer.echo(format_info(data))


@app.command()
def sample(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
    model: str = typer.Option("shapes/unet", "--model", help="shapes/unet, shapes/dit or a pipeline folder."),
    out: Path = typer.Option(..., "--out", help="PNG grid to write (its folder is created)."),
    n: int = typer.Option(8, "--n", help="Images per prompt."),
    steps: int = typer.Option(50, "--steps"),
    guidance: float = typer.Option(4.0, "--guidance"),
    seed: int = typer.Option(0, "--seed"),
    score: bool = typer.Option(True, "--score/--no-score", help="Print the DSG faithfulness of the samples."),
) -> None:
    """Sample a teacher into a PNG grid (one row per prompt), with a progress bar per prompt."""
    import torch
    from tqdm.auto import tqdm

    from diffalign.core.models import load_pipeline, resolve_model_path

    from ._util import save_grid
    from .grammar import parse_prompt
    from .teachers import sample_pipeline

    if n < 1 or steps < 1:
        typer.echo("error: --n and --steps must be >= 1", err=True)
        raise typer.Exit(code=2)
    if out.suffix.lower() != ".png" or out.is_dir():
        typer.echo(f"error: --out must be a .png file path, got {out}", err=True)
        raise typer.Exit(code=2)
    try:
        for p in prompt:
            parse_prompt(p)
        path = resolve_model_path(model)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    pipe = load_pipeline(path)  # float32, loading report checked
    prompts = [p for p in prompt for _ in range(n)]
    rows = []
    for row, text in enumerate(tqdm(prompt, desc="sampling", unit="prompt", disable=None)):
        rows.append(sample_pipeline(pipe, [text] * n, steps=steps, guidance=guidance, seed=seed + row * n))
    images = torch.cat(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=n, upscale=4)
    typer.echo(f"wrote {out}")
    if score:
        from .scoring import faithfulness

        res = faithfulness(images, prompts)
        typer.echo(f"faithfulness {res.overall:.3f} " + json.dumps(res.per_skill))


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print the raw JSON.")) -> None:
    """Print the measured qualities of the committed world (verifier, renders, teachers)."""
    from .scoring import ASSETS

    path = ASSETS / "world_info.json"
    if not path.exists():
        typer.echo(f"no world info at {path}; run `diffalign world build --install`", err=True)
        raise typer.Exit(code=1)
    data = load_world_info(ASSETS)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(format_info(data))


def load_world_info(assets: Path) -> dict:
    """``world_info.json`` plus the measurements stored beside the evaluation verifier
    (``eval_verifier.json``) and the web-caption base (``unet_web/info.json``)."""
    data = json.loads((assets / "world_info.json").read_text())
    if (assets / "eval_verifier.json").exists():
        data["eval_verifier"] = json.loads((assets / "eval_verifier.json").read_text())
    if (assets / "unet_web" / "info.json").exists():
        web = json.loads((assets / "unet_web" / "info.json").read_text())
        if "web" in web:
            data["teacher_unet-web"] = web["web"]
        data["unet_web_comparison"] = web
    return data


def format_info(data: dict) -> str:
    lines = ["# shapes world"]
    ver = data.get("verifier", {})
    for k, ev in ver.items():
        if isinstance(ev, dict):
            accs = " ".join(
                f"{n.replace('_accuracy', '')} {v:.3f}" for n, v in ev.items() if n.endswith("accuracy")
            )
            lines.append(f"verifier ({k} held-out renders): {accs}")
    rend = data.get("renders", {})
    for k, r in rend.items():
        if isinstance(r, dict):
            fid = f", FID {r['fid']:.1f}" if "fid" in r else ""
            lines.append(f"{k.replace('_', ' ')}: faithfulness {r['overall']:.3f}, {_skills(r)}{fid}")
        else:
            lines.append(f"{k.replace('_', ' ')}: {r:.1f}")
    for key in sorted(k for k in data if k.startswith("teacher_")):
        t = data[key]
        note = f" ({t['note']})" if "note" in t else ""
        lines.append(f"{key.replace('teacher_', 'shapes/')}{note}:")
        for s, r in t.get("steps", {}).items():
            lines.append(
                f"  {s:>3} steps, CFG {t.get('guidance')}: overall {r['overall']:.3f}, skill mean "
                f"{r['skill_mean']:.3f}, {_skills(r)}, FID {r['fid']:.1f}"
            )
    ev = data.get("eval_verifier")
    if ev:
        for k in ("clean", "perturbed"):
            if isinstance(ev.get(k), dict):
                accs = " ".join(
                    f"{n.replace('_accuracy', '')} {v:.3f}"
                    for n, v in ev[k].items()
                    if n.endswith("accuracy")
                )
                lines.append(f"evaluation verifier, seed {ev.get('seed')} ({k} held-out renders): {accs}")
        for model, ag in ev.get("agreement", {}).items():
            lines.append(
                f"  agreement with the reward's verifier on {model} samples ({ag['n_images']} images): answers "
                f"{ag['answer_agreement']:.3f}, prompt scores {ag['prompt_score_agreement']:.3f}; faithfulness "
                f"{ag['faithfulness_a']:.3f} (reward's) vs {ag['faithfulness_b']:.3f} (evaluation)"
            )
    cmp_ = data.get("unet_web_comparison", {})
    if "clean" in cmp_ and "web" in cmp_:
        lines.append(f"shapes/unet-web vs shapes/unet (same prompts and seeds; {cmp_.get('captions', '')}):")
        for s, r in cmp_["web"].get("steps", {}).items():
            c = cmp_["clean"]["steps"].get(s)
            if c:
                delta = ", ".join(f"{k} {r['per_skill'][k] - v:+.2f}" for k, v in c["per_skill"].items())
                cats = ", ".join(
                    f"{k} {r['per_category'][k] - v:+.2f}" for k, v in c.get("per_category", {}).items()
                )
                lines.append(f"  {s:>3} steps: overall {r['overall'] - c['overall']:+.3f}; {delta}")
                if cats:
                    lines.append(f"       per question type: {cats}")
    for k, v in data.get("protocol", {}).items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines)


def _skills(r: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in r.get("per_skill", {}).items())


def main() -> None:
    app()
