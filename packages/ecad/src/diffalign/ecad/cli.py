"""``diffalign ecad ...`` / ``diffalign-ecad ...``: search, apply and inspect caching schedules."""

from __future__ import annotations

from pathlib import Path

import typer

from diffalign.core.cli import (
    method_app,
    recipe_argument,
    set_option,
)
from diffalign.core.config import Component
from diffalign.core.runner import AllowChangedOption, ResumeOption, run_recipe

app = method_app(
    "ecad",
    "ECAD: evolutionary search of per-model feature-caching schedules for diffusion transformers.",
)


def recipe_components(cfg) -> list[Component]:
    """The transformer and the quality reward a recipe names (checked before anything loads)."""
    return [
        Component("model", "model.source", cfg.model.source),
        Component(
            "reward", "quality.reward", cfg.quality.reward, cfg.quality.reward_kwargs, "quality.reward_kwargs"
        ),
    ]


@app.command()
def search(
    recipe: str = recipe_argument("ecad"),
    overrides: list[str] = set_option("search.generations=5"),
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory (overrides the recipe's run_dir)"),
    resume: str = ResumeOption,
    allow_changed: list[str] = AllowChangedOption,
) -> None:
    """Run (or resume) an NSGA-II schedule search; writes front.json, front.png and chosen/ schedules."""
    from .config import FINGERPRINT_IGNORE, EcadRecipe

    def run(cfg):
        from .search import run_search

        accelerator = None
        if cfg.launch.launcher != "none":  # a rank of the launch the recipe asked for
            from diffalign.core.launch import make_accelerator

            accelerator = make_accelerator(cfg.launch, cfg.run_dir)
        return cfg, run_search(cfg, accelerator=accelerator)

    def done(out) -> None:
        cfg, result = out
        typer.echo(
            f"{len(result.X)} schedules evaluated; {len(result.front)} on the front -> {cfg.run_dir}/front.json"
        )

    raise typer.Exit(
        run_recipe(
            EcadRecipe,
            recipe,
            overrides or [],
            method="ecad",
            train=run,
            components=recipe_components,
            run_dir=run_dir,
            resume=resume,
            allow_changed=allow_changed or [],
            fingerprint_ignore=FINGERPRINT_IGNORE,
            runtime_errors=(ValueError, RuntimeError),  # ScheduleError is a ValueError
            on_success=done,
        )
    )


@app.command()
def front(run_dir: Path = typer.Argument(..., help="A search run directory")) -> None:
    """Print the Pareto front of a search run as a table (front.png sits beside front.json)."""
    import json

    from diffalign.core.report import markdown_table

    path = run_dir / "front.json"
    if not path.is_file():
        typer.echo(f"error: {path} not found; is {run_dir} an ecad search run?", err=True)
        raise typer.Exit(2)
    data = json.loads(path.read_text())
    rows = [
        {k: e[k] for k in ("name", "generation", "reward", "flop_ratio", "num_cached") if k in e}
        for e in data["front"]
    ]
    typer.echo(f"baseline (no cache) reward: {data.get('baseline_reward')}")
    typer.echo(markdown_table(rows))
    for budget, e in data.get("chosen", {}).items():
        typer.echo(
            f"chosen at FLOP ratio <= {budget}: {e['path']} (reward {e['reward']:.4f}, ratio {e['flop_ratio']:.3f})"
        )


@app.command()
def info(
    schedule: Path = typer.Argument(..., help="Schedule JSON (this package's or the official layout)"),
) -> None:
    """Summarise a schedule: architecture, shape, cached fraction per step and per component."""
    from .schedule import Schedule, ScheduleError

    try:
        s = Schedule.load(schedule)
    except ScheduleError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    eff = s.effective()
    typer.echo(repr(s))
    labels = s.spec.component_labels()
    for c, label in enumerate(labels):
        typer.echo(f"  {label:>22}: {float((~eff[..., c]).float().mean()):.3f} reused")
    typer.echo(
        "  reused per step: " + " ".join(f"{float((~eff[t]).float().mean()):.2f}" for t in range(s.num_steps))
    )


@app.command()
def apply(
    model: str = typer.Option(..., "--model", help="hub id, local diffusers folder or shapes/dit"),
    schedule: Path = typer.Option(..., "--schedule", help="Schedule JSON"),
    prompts: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)"),
    out: Path = typer.Option(Path("ecad_images.png"), "--out", help="Image grid to write"),
    seed: int = typer.Option(0, "--seed"),
    guidance_scale: float = typer.Option(4.5, "--guidance-scale"),
    height: int = typer.Option(None, "--height"),
    width: int = typer.Option(None, "--width"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Generate images with a schedule applied (the step count comes from the schedule)."""
    from diffalign.core.models import load_pipeline
    from diffalign.core.report import save_image_grid

    from .hooks import apply_schedule, remove_schedule
    from .sampling import generate
    from .schedule import Schedule, ScheduleError

    try:
        s = Schedule.load(schedule)
        pipe = load_pipeline(model, device=device)
        apply_schedule(pipe, s)
    except (ScheduleError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    seeds = [seed + i for i in range(len(prompts))]
    try:
        images = generate(pipe, prompts, seeds, s.num_steps, guidance_scale, height, width, device=device)
    finally:
        remove_schedule(pipe)
    save_image_grid(images, out, captions=list(prompts))
    typer.echo(f"wrote {out} ({s.name}, {s.num_cached()} reused sub-module evaluations)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
