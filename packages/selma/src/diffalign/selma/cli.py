"""``diffalign selma prompts|images|train|merge|eval|run recipe.yaml`` (also ``diffalign-selma ...``)."""

from __future__ import annotations

import typer

from diffalign.core.cli import (
    load_recipe_or_exit,
    method_app,
    recipe_argument,
    set_option,
)
from diffalign.core.config import Component

app = method_app(
    "selma",
    "SELMA: skill-specific LoRA experts from auto-generated data, merged into one model.",
)

RecipeArg = recipe_argument("selma")
SetOpt = set_option("train.steps=100")
RunDirOpt = typer.Option(None, "--run-dir", help="Run directory (overrides the recipe's run_dir)")


def recipe_components(cfg) -> list[Component]:
    """The models and rewards a recipe names (checked before anything loads)."""
    comps = [Component("model", "model", cfg.model)]
    if cfg.images.generator:
        comps.append(Component("model", "images.generator", cfg.images.generator))
    if cfg.prompts.backend == "hf":
        comps.append(Component("model", "prompts.hf.model", cfg.prompts.hf.model))
    flt = cfg.images.reward_filter
    if flt.enabled:
        comps.append(
            Component(
                "reward", "images.reward_filter.reward", flt.reward, flt.kwargs, "images.reward_filter.kwargs"
            )
        )
    for name in cfg.eval.rewards:
        comps.append(
            Component(
                "reward",
                "eval.rewards",
                name,
                cfg.eval.reward_kwargs.get(name, {}),
                f"eval.reward_kwargs.{name}",
            )
        )
    return comps


def _load(recipe: str, overrides: list[str] | None, run_dir: str | None):
    from diffalign.selma.config import SelmaConfig

    return load_recipe_or_exit("selma", SelmaConfig, recipe, overrides, run_dir, recipe_components)


def _check_prompt_backend(cfg) -> None:
    """The openai backend refuses to start without its key (before anything is written)."""
    import os

    o = cfg.prompts.openai
    if cfg.prompts.backend == "openai" and o.api_key_env and not os.environ.get(o.api_key_env):
        typer.echo(
            f"error: prompts.backend is 'openai' but the environment variable {o.api_key_env} is empty; export "
            "the key, or set prompts.openai.api_key_env=null for a local server without authentication",
            err=True,
        )
        raise typer.Exit(code=2)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=1)


def _save(cfg) -> None:
    from diffalign.core.config import save_config

    save_config(cfg, cfg.run_dir)


@app.command()
def prompts(recipe: str = RecipeArg, set_: list[str] = SetOpt, run_dir: str = RunDirOpt) -> None:
    """Stage 1: generate skill-specific prompts (self-instruct loop, Rouge-L dedup; resumable)."""
    from diffalign.selma.prompts import PromptBackendError
    from diffalign.selma.stages import stage_prompts

    cfg = _load(recipe, set_, run_dir)
    _check_prompt_backend(cfg)
    _save(cfg)
    try:
        stage_prompts(cfg)
    except (PromptBackendError, RuntimeError, ValueError) as err:
        _fail(err)


@app.command()
def images(recipe: str = RecipeArg, set_: list[str] = SetOpt, run_dir: str = RunDirOpt) -> None:
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
    recipe: str = RecipeArg,
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
    recipe: str = RecipeArg,
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
    recipe: str = RecipeArg,
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
def run(recipe: str = RecipeArg, set_: list[str] = SetOpt, run_dir: str = RunDirOpt) -> None:
    """All stages in order; each one resumes from what is already on disk."""
    from diffalign.selma.lora import AdapterError
    from diffalign.selma.prompts import PromptBackendError
    from diffalign.selma.stages import run_all

    cfg = _load(recipe, set_, run_dir)
    _check_prompt_backend(cfg)
    try:
        run_all(cfg)
    except (PromptBackendError, AdapterError, FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(err)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
