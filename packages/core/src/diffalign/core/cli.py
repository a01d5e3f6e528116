"""The umbrella ``diffalign`` command.

Method packages register their typer apps under the entry-point group ``diffalign.cli`` and their recipe
config classes under ``diffalign.configs``; installing a method adds its subcommand
(``diffalign mlcm distill recipe.yaml``). Core contributes ``info``, ``config schema`` and ``world``.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, distributions, entry_points, version
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel

from .config import ConfigError, load_config

__all__ = ["app", "main", "load_config_or_exit", "SetOption", "ConfigArgument", "RunDirOption"]

T = TypeVar("T", bound=BaseModel)

CLI_GROUP = "diffalign.cli"
CONFIG_GROUP = "diffalign.configs"

SetOption = typer.Option(
    None, "--set", "-s", help="Dotted override, repeatable: --set optim.lr=1e-4 --set train.steps=100"
)
ConfigArgument = typer.Argument(..., help="Recipe file (.yaml, .yml, .toml or .json)")
RunDirOption = typer.Option(None, "--run-dir", help="Run directory (overrides the recipe's run_dir)")


def load_config_or_exit(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load a config; on any problem print one clear message to stderr and exit with code 2."""
    try:
        return load_config(cls, path, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None


app = typer.Typer(
    name="diffalign",
    help="Align text-to-image diffusion models with human preferences and make them cheaper to run.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect recipe configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _config_classes() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=CONFIG_GROUP)}


@config_app.command("schema")
def config_schema_cmd(method: str = typer.Argument(..., help="Method name, e.g. mlcm")) -> None:
    """Print the JSON schema of a method's recipe config."""
    eps = _config_classes()
    if method not in eps:
        typer.echo(
            f"error: unknown method {method!r}; installed methods: {', '.join(sorted(eps)) or 'none'}",
            err=True,
        )
        raise typer.Exit(code=2)
    cls = eps[method].load()
    typer.echo(json.dumps(cls.model_json_schema(), indent=2))


def _version_of(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


@app.command("info")
def info() -> None:
    """Versions of diffalign packages and the libraries they build on, and available devices."""
    import torch

    names = sorted(
        {d.metadata["Name"] for d in distributions() if (d.metadata["Name"] or "").startswith("diffalign-")}
    )
    typer.echo("diffalign packages:")
    for name in names:
        typer.echo(f"  {name:<28} {_version_of(name)}")
    typer.echo("libraries:")
    for lib in ("torch", "diffusers", "transformers", "peft", "accelerate", "deepspeed", "trl", "pymoo"):
        typer.echo(f"  {lib:<28} {_version_of(lib)}")
    typer.echo("devices:")
    typer.echo(f"  cpu threads                  {torch.get_num_threads()}")
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        for i in range(torch.cuda.device_count()):
            typer.echo(f"  cuda:{i:<23} {torch.cuda.get_device_name(i)}")
    else:
        typer.echo("  cuda                         not available")
    from .rewards import list_rewards

    typer.echo(f"rewards: {', '.join(list_rewards()) or 'none'}")


_REGISTERED = False


def register_method_apps() -> None:
    """Add ``world`` and every installed method's app (entry-point group ``diffalign.cli``), once.

    Done when the command runs, not at import: a method's ``cli`` module imports this module, and
    registering at import time would load that method's half-initialised module again.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    try:
        from .shapes.cli import app as world_app

        app.add_typer(world_app, name="world", help="The shapes world: build, sample, info.")
    except ImportError as err:  # pragma: no cover - shapes ships with core
        print(f"warning: the shapes world CLI is unavailable: {err}", file=sys.stderr)
    for ep in sorted(entry_points(group=CLI_GROUP), key=lambda e: e.name):
        try:
            sub = ep.load()
        except Exception as err:  # a broken plugin must not take the whole CLI down
            print(
                f"warning: could not load the {ep.name!r} command ({type(err).__name__}: {err})",
                file=sys.stderr,
            )
            continue
        app.add_typer(sub, name=ep.name)


def main() -> None:
    register_method_apps()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
