"""``diffalign di-star train recipe.yaml`` and ``diffalign di-star sample MODEL``."""

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
    "di-star",
    "Diff-Instruct*: reward post-training of one-step generators with a score-divergence regulariser.",
)


def recipe_components(cfg) -> list[Component]:
    """The models and the reward a recipe names (checked before anything loads)."""
    comps = [Component("model", "model.teacher", cfg.model.teacher)]
    if cfg.model.generator_init:
        comps.append(Component("model", "model.generator_init", cfg.model.generator_init))
    if cfg.model.fake_init:
        comps.append(Component("model", "model.fake_init", cfg.model.fake_init))
    comps.append(Component("reward", "reward.name", cfg.reward.name, cfg.reward.kwargs, "reward.kwargs"))
    return comps


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


# keys that never change what a run computes, and the step budget, which may grow on resume
FINGERPRINT_IGNORE = (
    "run_dir",
    "training.max_steps",
    "training.log_every",
    "training.keep_last",
    "launch.log_with",
)


def check_recipe(cfg) -> None:
    """Files the recipe names exist and are non-empty (models and rewards: ``recipe_components``)."""
    if cfg.data.prompts != "shapes":
        check_file(cfg.data.prompts, "data.prompts")


@app.command()
def train(
    recipe: str = recipe_argument("di-star"),
    overrides: list[str] = set_option("loss.alpha_rew=10 --set training.max_steps=100"),
    run_dir: Path = RunDirOption,
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Train (or resume) a one-step generator from a recipe; exports RUN_DIR/generator."""
    from .config import DiStarConfig

    def run_training(cfg):
        from .train import train as train_generator

        return train_generator(cfg)

    raise typer.Exit(
        run_recipe(
            DiStarConfig,
            recipe,
            overrides or [],
            method="di-star",
            train=run_training,
            check=check_recipe,
            components=recipe_components,
            run_dir=run_dir,
            resume=resume,
            allow_changed=allow_changed or [],
            fingerprint_ignore=FINGERPRINT_IGNORE,
            runtime_errors=(ValueError,),
            on_success=lambda out: typer.echo(f"generator saved to {out}"),
        )
    )


@app.command()
def sample(
    model: str = typer.Argument(
        ..., help="Exported DI* generator folder (RUN_DIR/generator) or any one-step model"
    ),
    prompts: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt, repeatable"),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="Text file, one prompt a line"),
    out: Path = typer.Option(Path("di_star_samples"), "--out", help="Output folder for PNGs and a grid"),
    t_star: int = typer.Option(None, "--t-star", help="Generator timestep (default: from di_star.json)"),
    seed: int = typer.Option(0, "--seed"),
    resolution: int = typer.Option(
        None, "--resolution", help="Pixel size (default: the model's native size)"
    ),
    device: str = typer.Option(None, "--device"),
) -> None:
    """Sample with one step: LCMScheduler at the single timestep t*, guidance 0, in the model's own pipeline."""
    import torch

    from diffalign.core.models import load_pipeline
    from diffalign.core.report import save_image_grid, to_pil

    from .inference import read_metadata, sample_one_step, to_one_step_pipeline

    texts = list(prompts or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            _fail(f"prompts file not found: {prompts_file}", 2)
        texts += [
            line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if not texts:
        _fail("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE", 2)
    if t_star is None:
        try:
            t_star = int(read_metadata(model)["t_star"])
        except FileNotFoundError as err:
            _fail(str(err), 2)
    try:
        pipe = load_pipeline(model, device=device)
    except FileNotFoundError as err:
        _fail(str(err), 2)
    to_one_step_pipeline(pipe)
    images = sample_one_step(
        pipe,
        texts,
        t_star,
        generator=torch.Generator().manual_seed(seed),
        resolution=resolution,
        output_type="pt",
    )
    out.mkdir(parents=True, exist_ok=True)
    pil = to_pil(images * 2 - 1)
    for i, image in enumerate(pil):
        image.save(out / f"{i:04d}.png")
    save_image_grid(images * 2 - 1, out / "grid.png", captions=texts)
    typer.echo(f"{len(pil)} images written to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
