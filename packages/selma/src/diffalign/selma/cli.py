"""``diffalign selma prompts|images|train|merge|eval|run recipe.yaml`` (also ``diffalign-selma ...``)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffalign.core.cli import load_config_or_exit

app = typer.Typer(
    name="selma",
    help="SELMA: skill-specific LoRA experts from auto-generated data, merged into one model.",
    no_args_is_help=True,
    add_completion=False,
)

RecipeArg = typer.Argument(..., help="Recipe file (.yaml/.toml/.json)", exists=False)
SetOpt = typer.Option(None, "--set", "-s", help="Dotted override, repeatable: --set train.steps=100")
RunDirOpt = typer.Option(None, "--run-dir", help="Run directory (overrides the recipe's run_dir)")


def _load(recipe: Path, overrides: list[str] | None, run_dir: str | None):
    from diffalign.selma.config import SelmaConfig

    overrides = list(overrides or [])
    if run_dir:
        overrides.append(f"run_dir={run_dir}")
    if not Path(recipe).exists():
        typer.echo(f"error: recipe file {recipe} does not exist", err=True)
        raise typer.Exit(code=2)
    return load_config_or_exit(SelmaConfig, recipe, overrides)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=1)


def _save(cfg) -> None:
    from diffalign.core.config import save_config

    save_config(cfg, cfg.run_dir)


@app.command()
def prompts(recipe: Path = RecipeArg, set_: list[str] = SetOpt, run_dir: str = RunDirOpt) -> None:
    """Stage 1: generate skill-specific prompts (self-instruct loop, Rouge-L dedup; resumable)."""
    from diffalign.selma.prompts import PromptBackendError
    from diffalign.selma.stages import stage_prompts

    cfg = _load(recipe, set_, run_dir)
    _save(cfg)
    try:
        stage_prompts(cfg)
    except (PromptBackendError, RuntimeError, ValueError) as err:
        _fail(err)


@app.command()
def images(recipe: Path = RecipeArg, set_: list[str] = SetOpt, run_dir: str = RunDirOpt) -> None:
    """Stage 2: generate one image per prompt into an imagefolder (resumable; run under accelerate to shard)."""
    from diffalign.selma.stages import stage_images

    cfg = _load(recipe, set_, run_dir)
    _save(cfg)
    try:
        stage_images(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(err)


@app.command()
def train(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    skill: list[str] = typer.Option(None, "--skill", help="Train only these skills (repeatable)"),
    mixed: bool = typer.Option(False, "--mixed", help="Also train the one-LoRA-on-all-skills baseline"),
) -> None:
    """Stage 3: one LoRA expert per skill (checkpoints and resume)."""
    from diffalign.selma.stages import stage_train

    cfg = _load(recipe, set_, run_dir)
    _save(cfg)
    try:
        stage_train(cfg, skills=list(skill) if skill else None, mixed=mixed)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)


@app.command()
def merge(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    method: str = typer.Option(None, "--method", help="Override merge.method"),
) -> None:
    """Stage 4: merge the experts (exact average by default) and export a LoRA and/or fused pipeline."""
    from diffalign.selma.lora import AdapterError
    from diffalign.selma.stages import stage_merge

    cfg = _load(recipe, list(set_ or []) + ([f"merge.method={method}"] if method else []), run_dir)
    try:
        stage_merge(cfg)
    except (AdapterError, FileNotFoundError) as err:
        _fail(err)


@app.command("eval")
def eval_(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    model: list[str] = typer.Option(
        None, "--model", help="base, expert:<skill>, mixed, merged[:<method>] (repeatable)"
    ),
) -> None:
    """Stage 5: per-skill faithfulness (and registered rewards) of base / experts / mixed / merged models."""
    from diffalign.selma.lora import AdapterError
    from diffalign.selma.stages import stage_eval

    cfg = _load(recipe, set_, run_dir)
    try:
        stage_eval(cfg, models=list(model) if model else None)
    except (AdapterError, FileNotFoundError, ValueError) as err:
        _fail(err)


@app.command()
def run(recipe: Path = RecipeArg, set_: list[str] = SetOpt, run_dir: str = RunDirOpt) -> None:
    """All stages in order; each one resumes from what is already on disk."""
    from diffalign.selma.lora import AdapterError
    from diffalign.selma.prompts import PromptBackendError
    from diffalign.selma.stages import run_all

    cfg = _load(recipe, set_, run_dir)
    try:
        run_all(cfg)
    except (PromptBackendError, AdapterError, FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(err)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
