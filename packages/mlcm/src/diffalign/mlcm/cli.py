"""``diffalign mlcm distill recipe.yaml`` and ``diffalign mlcm sample`` (also ``diffalign-mlcm ...``)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffalign.core.cli import (
    RunDirOption,
    method_app,
    recipe_argument,
    set_option,
)
from diffalign.core.config import Component
from diffalign.core.runner import AllowChangedOption, ResumeOption, check_file, run_recipe

app = method_app(
    "mlcm",
    "Multistep latent consistency distillation (MLCM/TLCM): a 2-8 step student from prompts only.",
)


def recipe_components(cfg) -> list[Component]:
    """The teacher and the optional reward a recipe names (checked before anything loads)."""
    comps = [Component("model", "model.source", cfg.model.source)]
    if cfg.reward.name:
        comps.append(Component("reward", "reward.name", cfg.reward.name, cfg.reward.kwargs, "reward.kwargs"))
    return comps


# keys that never change what a run computes: a resumed run may differ in them
FINGERPRINT_IGNORE = ("run_dir", "log_every", "checkpoint.keep_last", "launch.log_with")


def check_recipe(cfg) -> None:
    """Files the recipe names exist and are non-empty (models and rewards: ``recipe_components``)."""
    check_file(cfg.data.prompts_file, "data.prompts_file")


@app.command()
def distill(
    recipe: str = recipe_argument("mlcm"),
    overrides: list[str] = set_option("stage1.iterations=10"),
    run_dir: str = RunDirOption,
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Distil the recipe's teacher into a multistep student (resumes from the latest checkpoint)."""
    from .config import MLCMRecipe

    def train(cfg):
        from .train import train as run_training

        return run_training(cfg)

    def done(result) -> None:
        typer.echo(
            f"student written to {result.student_dir} ({result.steps} iterations, {result.wall_time_s:.1f}s)"
        )

    raise typer.Exit(
        run_recipe(
            MLCMRecipe,
            recipe,
            overrides or [],
            method="mlcm",
            train=train,
            check=check_recipe,
            components=recipe_components,
            run_dir=run_dir,
            resume=resume,
            allow_changed=allow_changed or [],
            fingerprint_ignore=FINGERPRINT_IGNORE,
            on_success=done,
        )
    )


@app.command()
def sample(
    student: Path = typer.Option(
        ..., "--student", help="Student folder written by `distill` (run_dir/student)"
    ),
    prompts: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt (repeatable)"),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="One prompt per line"),
    base: str = typer.Option(
        None, "--base", help="Base model (default: the teacher recorded in the student)"
    ),
    steps: int = typer.Option(4, "--steps", min=1, max=8, help="Sampling steps (2-8 recommended)"),
    sampler: str = typer.Option(
        None, "--sampler", help="renoise (official) or deterministic (default: the exported one)"
    ),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("mlcm_samples.png"), "--out", help="Image grid to write"),
) -> None:
    """Sample the student with MLCMScheduler and write an image grid."""
    from .inference import load_student, sample_images

    texts = list(prompts or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            typer.echo(f"error: prompts file not found: {prompts_file}", err=True)
            raise typer.Exit(code=2)
        texts += [
            line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if not texts:
        typer.echo("error: give at least one --prompt or a non-empty --prompts-file", err=True)
        raise typer.Exit(code=2)
    if sampler is not None and sampler not in ("renoise", "deterministic"):
        typer.echo(f"error: --sampler must be 'renoise' or 'deterministic', got {sampler!r}", err=True)
        raise typer.Exit(code=2)
    try:
        pipe = load_student(student, base=base, sampler=sampler)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    from diffalign.core.report import save_image_grid

    images = sample_images(pipe, texts, steps, guidance_scale=0.0, seed=seed)
    save_image_grid(images, out, captions=texts)
    typer.echo(f"wrote {len(texts)} images to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
