"""``diffalign selma prompts|images|train|merge|eval|run recipe.yaml`` (also ``diffalign-selma ...``)."""

from __future__ import annotations

import typer

from diffalign.core.cli import (
    method_app,
    recipe_argument,
    set_option,
)
from diffalign.core.config import Component
from diffalign.core.runner import AllowChangedOption, BadInputError, ResumeOption, run_recipe

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


# keys that never change what the training stages compute: merge and eval settings are re-read on every
# command (``merge --method`` changes merge.method), logging and checkpoint retention
FINGERPRINT_IGNORE = (
    "run_dir",
    "merge",
    "eval",
    "train.log_every",
    "train.keep_checkpoints",
    "launch.log_with",
)


def check_prompt_backend(cfg) -> None:
    """The openai backend refuses to start without its key (before anything is written)."""
    import os

    o = cfg.prompts.openai
    if cfg.prompts.backend == "openai" and o.api_key_env and not os.environ.get(o.api_key_env):
        raise BadInputError(
            f"prompts.backend is 'openai' but the environment variable {o.api_key_env} is empty; export "
            "the key, or set prompts.openai.api_key_env=null for a local server without authentication"
        )


def _run(
    stage,
    recipe: str,
    overrides: list[str] | None,
    run_dir: str | None,
    resume: str,
    allow_changed: list[str] | None,
    *,
    check=None,
    multi_process: bool = True,
) -> None:
    """Run ``stage(cfg)`` through core's recipe runner. Single-process stages (prompts, merge, eval) do not
    use the recipe's launch section."""
    from diffalign.selma.config import SelmaConfig
    from diffalign.selma.lora import AdapterError
    from diffalign.selma.prompts import PromptBackendError

    def save_and_run(cfg):
        from diffalign.core.config import save_config
        from diffalign.core.launch import is_main_process

        if is_main_process():
            save_config(cfg, cfg.run_dir)
        return stage(cfg)

    raise typer.Exit(
        run_recipe(
            SelmaConfig,
            recipe,
            overrides or [],
            method="selma",
            train=save_and_run,
            check=check,
            components=recipe_components,
            run_dir=run_dir,
            resume=resume,
            allow_changed=allow_changed or [],
            fingerprint_ignore=FINGERPRINT_IGNORE,
            launch_field="launch" if multi_process else None,
            runtime_errors=(PromptBackendError, AdapterError, ValueError, RuntimeError),
        )
    )


@app.command()
def prompts(
    recipe: str = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Stage 1: generate skill-specific prompts (self-instruct loop, Rouge-L dedup; resumable)."""
    from diffalign.selma.stages import stage_prompts

    _run(
        stage_prompts,
        recipe,
        set_,
        run_dir,
        resume,
        allow_changed,
        check=check_prompt_backend,
        multi_process=False,
    )


@app.command()
def images(
    recipe: str = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Stage 2: generate one image per prompt into an imagefolder (resumable; shards over the recipe's processes)."""
    from diffalign.selma.stages import stage_images

    _run(stage_images, recipe, set_, run_dir, resume, allow_changed)


@app.command()
def train(
    recipe: str = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    skill: list[str] = typer.Option(None, "--skill", help="Train only these skills (repeatable)"),
    mixed: bool = typer.Option(False, "--mixed", help="Also train the one-LoRA-on-all-skills baseline"),
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Stage 3: one LoRA expert per skill (checkpoints and resume; data-parallel over the recipe's processes)."""
    from diffalign.selma.stages import stage_train

    def stage(cfg):
        return stage_train(cfg, skills=list(skill) if skill else None, mixed=mixed)

    _run(stage, recipe, set_, run_dir, resume, allow_changed)


@app.command()
def merge(
    recipe: str = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    method: str = typer.Option(None, "--method", help="Override merge.method"),
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Stage 4: merge the experts (exact average by default) and export a LoRA and/or fused pipeline."""
    from diffalign.selma.stages import stage_merge

    overrides = list(set_ or []) + ([f"merge.method={method}"] if method else [])
    _run(stage_merge, recipe, overrides, run_dir, resume, allow_changed, multi_process=False)


@app.command("eval")
def eval_(
    recipe: str = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    model: list[str] = typer.Option(
        None, "--model", help="base, expert:<skill>, mixed, merged[:<method>] (repeatable)"
    ),
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Stage 5: per-skill faithfulness (and registered rewards) of base / experts / mixed / merged models."""
    from diffalign.selma.stages import stage_eval

    def stage(cfg):
        return stage_eval(cfg, models=list(model) if model else None)

    _run(stage, recipe, set_, run_dir, resume, allow_changed, multi_process=False)


@app.command()
def run(
    recipe: str = RecipeArg,
    set_: list[str] = SetOpt,
    run_dir: str = RunDirOpt,
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """All stages in order; each one resumes from what is already on disk (images and training use the
    recipe's processes, the other stages run on the main one)."""
    from diffalign.selma.stages import run_all

    _run(run_all, recipe, set_, run_dir, resume, allow_changed, check=check_prompt_backend)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
