"""``diffalign listener-reward sft|train|eval|judge|build-models|serve-listener recipe.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from diffalign.core.cli import (
    load_recipe_or_exit,
    method_app,
    recipe_argument,
    set_option,
)
from diffalign.core.config import Component
from diffalign.core.runner import AllowChangedOption, ResumeOption, check_file, run_recipe

app = method_app(
    "listener-reward",
    "Listener-shaped GRPO for VLM image-preference judges (arXiv 2506.22832).",
)

ConfigArg = recipe_argument("listener-reward")
SetOpt = set_option("grpo.beta=0.0")


def recipe_components(cfg) -> list[Component]:
    """The reasoner and listener VLMs a recipe names (checked before anything loads)."""
    return [
        Component("model", "model.reasoner", cfg.model.reasoner),
        Component("model", "model.listener", cfg.model.listener),
    ]


def _cfg(path, overrides, run_dir_key: str | None = None, run_dir: Path | None = None, check: bool = True):
    from diffalign.listener_reward.config import RECIPE_CONFIG

    extra = list(overrides or [])
    if run_dir is not None and run_dir_key:
        extra.append(f"{run_dir_key}={run_dir}")
    return load_recipe_or_exit(
        "listener-reward", RECIPE_CONFIG, path, extra, None, recipe_components if check else None
    )


def _load_judge(cfg, checkpoint: str | None):
    """The reasoner to judge with: ``checkpoint``, else ``eval.checkpoint``, else the GRPO output."""
    from diffalign.listener_reward.judge import PreferenceJudge

    source = checkpoint or cfg.eval.checkpoint or str(Path(cfg.grpo.output_dir) / "final")
    judge = PreferenceJudge.from_pretrained(
        source,
        cfg.prompts,
        cfg.judge,
        device=cfg.device,
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
    )
    return source, judge


@app.command("build-models")
def build_models(
    recipe: str = ConfigArg,
    overrides: list[str] = SetOpt,
    listener_steps: int = typer.Option(
        2000, help="listener training steps (it starts following the reasoning near 600 x 32)"
    ),
    listener_pairs: int = typer.Option(4000, help="listener training pairs (its own seed)"),
    listener_batch: int = typer.Option(32, help="listener batch size"),
    base_steps: int = typer.Option(
        600, help="captioning pre-training steps of each base VLM (0: random init)"
    ),
) -> None:
    """Shapes world: build the reasoner initialisation (a captioning base VLM) and train the independent
    listener from its own base."""
    from diffalign.core.config import save_config
    from diffalign.listener_reward.modeling import shapes_models_dir
    from diffalign.listener_reward.shapes_models import build_reasoner_init, train_listener

    cfg = _cfg(recipe, overrides, check=False)
    root = shapes_models_dir()
    save_config(cfg, root)
    typer.echo(f"reasoner init: {build_reasoner_init(cfg, root / 'reasoner', base_steps=base_steps)}")
    listener = train_listener(
        cfg,
        root / "listener",
        listener_steps,
        listener_pairs,
        batch_size=listener_batch,
        base_steps=base_steps,
    )
    typer.echo(f"listener: {listener}")


# keys a resumed SFT / GRPO run may change: the other stages' sections, the step budget (the trainer
# resumes and trains on to the new one), logging and saving intervals, trackers
SFT_IGNORE = (
    "sft.output_dir",
    "sft.max_steps",
    "sft.logging_steps",
    "sft.save_steps",
    "grpo",
    "reward",
    "judge",
    "eval",
    "launch.log_with",
)
GRPO_IGNORE = (
    "grpo.output_dir",
    "grpo.max_steps",
    "grpo.logging_steps",
    "grpo.save_steps",
    "sft",
    "judge",
    "eval",
    "launch.log_with",
)


def check_recipe(cfg) -> None:
    """Files the recipe names exist and are non-empty (models: ``recipe_components``)."""
    check_file(cfg.data.train_path, "data.train_path")
    for split, path in cfg.data.eval_paths.items():
        check_file(path, f"data.eval_paths.{split}")


def _train_stage(stage, section: str, ignore, recipe, overrides, run_dir, resume, allow_changed) -> None:
    from diffalign.listener_reward.config import RECIPE_CONFIG

    def run(cfg):
        from diffalign.core.config import save_config
        from diffalign.core.launch import is_main_process

        if is_main_process():
            save_config(cfg, getattr(cfg, section).output_dir)
        return stage(cfg)

    raise typer.Exit(
        run_recipe(
            RECIPE_CONFIG,
            recipe,
            overrides or [],
            method="listener-reward",
            run_name=f"listener-reward {section}",
            train=run,
            check=check_recipe,
            components=recipe_components,
            run_dir=run_dir,
            run_dir_field=f"{section}.output_dir",
            resume=resume,
            allow_changed=allow_changed or [],
            fingerprint_ignore=ignore,
            runtime_errors=(ValueError,),
            on_success=lambda out: typer.echo(f"saved {out}"),
        )
    )


@app.command()
def sft(
    recipe: str = ConfigArg,
    overrides: list[str] = SetOpt,
    run_dir: Path = typer.Option(
        None, "--run-dir", help="Output folder of the SFT run (sets sft.output_dir)"
    ),
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """SFT warm-up of the reasoner (resumes from the last checkpoint)."""
    from diffalign.listener_reward.train import run_sft

    _train_stage(run_sft, "sft", SFT_IGNORE, recipe, overrides, run_dir, resume, allow_changed)


@app.command()
def train(
    recipe: str = ConfigArg,
    overrides: list[str] = SetOpt,
    run_dir: Path = typer.Option(
        None, "--run-dir", help="Output folder of the GRPO run (sets grpo.output_dir)"
    ),
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """GRPO with format + accuracy (+ listener) rewards, TRL GRPOTrainer; resumes from the last checkpoint."""
    from diffalign.listener_reward.train import run_grpo

    _train_stage(run_grpo, "grpo", GRPO_IGNORE, recipe, overrides, run_dir, resume, allow_changed)


@app.command("eval")
def evaluate(
    recipe: str = ConfigArg,
    overrides: list[str] = SetOpt,
    checkpoint: str = typer.Option(None, help="reasoner to evaluate (default eval.checkpoint or grpo final)"),
) -> None:
    """Pairwise accuracy with CIs and listener-disagreement rate on every eval split."""
    from diffalign.listener_reward.data import load_pairs
    from diffalign.listener_reward.evaluate import evaluate_judge
    from diffalign.listener_reward.modeling import load_vlm_and_processor
    from diffalign.listener_reward.rewards import LocalListener

    cfg = _cfg(recipe, overrides)
    source, judge = _load_judge(cfg, checkpoint)
    listener_model, listener_processor = load_vlm_and_processor(
        cfg.model.listener, cfg.model.dtype, cfg.device, cfg.model.min_pixels, cfg.model.max_pixels
    )
    listener = LocalListener(listener_model, listener_processor, cfg.prompts)
    results = {"checkpoint": source}
    for split in cfg.eval.splits:
        pairs = load_pairs(cfg.data, split)[: cfg.eval.max_pairs]
        results[split] = evaluate_judge(
            judge, pairs, listener, cfg.eval.confidence, cfg.eval.bootstrap, cfg.seed
        )
        typer.echo(
            f"{split}: accuracy {results[split]['accuracy']:.3f} "
            f"contradiction {results[split].get('contradiction_rate', float('nan')):.3f}"
        )
    out = Path(cfg.eval.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    typer.echo(f"wrote {out}")


@app.command()
def judge(
    recipe: str = ConfigArg,
    prompt: str = typer.Option(..., help="text-to-image prompt"),
    image_a: Path = typer.Option(..., exists=True, dir_okay=False, help="image 1"),
    image_b: Path = typer.Option(..., exists=True, dir_okay=False, help="image 2"),
    checkpoint: str = typer.Option(None, help="reasoner (default eval.checkpoint or grpo final)"),
    overrides: list[str] = SetOpt,
) -> None:
    """Compare two images for a prompt: prints choice, probability and reasoning as JSON."""
    from PIL import Image

    cfg = _cfg(recipe, overrides)
    _, pj = _load_judge(cfg, checkpoint)
    result = pj.compare(prompt, Image.open(image_a).convert("RGB"), Image.open(image_b).convert("RGB"))
    typer.echo(
        json.dumps(
            {
                "choice": result.choice,
                "probability": result.probability,
                "p_image_a": result.p_image_a,
                "reasoning": result.reasoning,
            },
            indent=2,
        )
    )


@app.command("serve-listener")
def serve(
    recipe: str = ConfigArg,
    overrides: list[str] = SetOpt,
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8765),
) -> None:
    """Serve the frozen listener over HTTP (reward.listener_backend=http, reward.listener_url=...)."""
    from diffalign.listener_reward.modeling import load_vlm_and_processor
    from diffalign.listener_reward.rewards import LocalListener, serve_listener

    cfg = _cfg(recipe, overrides)
    model, processor = load_vlm_and_processor(
        cfg.model.listener, cfg.model.dtype, cfg.device, cfg.model.min_pixels, cfg.model.max_pixels
    )
    server = serve_listener(
        LocalListener(model, processor, cfg.prompts, cfg.reward.listener_batch_size), host, port
    )
    typer.echo(f"listener on http://{host}:{server.server_address[1]}/")
    server.serve_forever()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
