"""The umbrella ``diffalign`` command.

Method packages register their typer apps under the entry-point group ``diffalign.cli`` and their recipe
config classes under ``diffalign.configs``; installing a method adds its subcommand
(``diffalign mlcm distill shapes_unet``). Core contributes ``info``, ``config schema|validate`` and
``world``. Importing this module (and ``--help``) does not import torch: commands import what they need.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, distributions, entry_points, version
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel

from .config import Component, ConfigError, check_components, list_recipes, load_config, resolve_recipe

__all__ = [
    "app",
    "main",
    "load_config_or_exit",
    "load_recipe_or_exit",
    "recipe_argument",
    "set_option",
    "add_recipes_command",
    "method_app",
    "version_callback",
    "SetOption",
    "ConfigArgument",
    "RunDirOption",
]

T = TypeVar("T", bound=BaseModel)

CLI_GROUP = "diffalign.cli"
CONFIG_GROUP = "diffalign.configs"


def set_option(example: str) -> Any:
    """The ``--set`` option, with an ``example`` override that is valid for the command it is shown on."""
    return typer.Option(
        None, "--set", "-s", help=f"Dotted override of a recipe key, repeatable: --set {example}"
    )


def recipe_argument(method: str) -> Any:
    return typer.Argument(
        ...,
        help=f"Recipe: a file (.yaml/.yml/.toml/.json) or a built-in name (`diffalign {method} recipes`)",
        show_default=False,
    )


SetOption = typer.Option(
    None, "--set", "-s", help="Dotted override of a recipe key, repeatable: --set KEY=VALUE"
)
ConfigArgument = typer.Argument(..., help="Recipe file (.yaml, .yml, .toml or .json) or built-in recipe name")
RunDirOption = typer.Option(None, "--run-dir", help="Run directory (overrides the recipe's run_dir)")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def _fail_each(problems: list[str], code: int = 2) -> None:
    """One ``error:`` line per problem, then exit."""
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(code=code)


def load_config_or_exit(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load a config; on any problem print one clear message to stderr and exit with code 2."""
    try:
        return load_config(cls, path, overrides or [])
    except ConfigError as err:
        _fail(str(err))


def load_recipe_or_exit(
    method: str,
    cls: type[T],
    recipe: str | Path,
    overrides: Iterable[str] | None = None,
    run_dir: str | Path | None = None,
    components: Callable[[T], list[Component]] | None = None,
) -> T:
    """Resolve ``recipe`` (file or built-in name), apply overrides and ``--run-dir``, validate, and check
    that every model and reward it names can be built from what is on this machine; exit 2 with one line
    per problem otherwise. Nothing is loaded and nothing is written."""
    extra = list(overrides or [])
    if run_dir is not None:
        extra.append(f"run_dir={run_dir}")
    try:
        path = resolve_recipe(method, recipe)
        cfg = load_config(cls, path, extra)
    except ConfigError as err:
        _fail(str(err))
    if components is not None:
        problems = check_components(components(cfg), files=True)
        if problems:
            _fail_each(problems)
    return cfg


def add_recipes_command(app: typer.Typer, method: str) -> None:
    """Add ``diffalign <method> recipes``: list the built-in recipes (name, first comment line)."""

    @app.command("recipes")
    def recipes(paths: bool = typer.Option(False, "--paths", help="Also print where each file is")) -> None:
        """List the built-in recipes; give one by name to any command (or copy it and edit)."""
        found = list_recipes(method)
        if not found:
            _fail(f"no built-in recipes found for {method}", 1)
        width = max(len(n) for n in found)
        for name, path in found.items():
            first = ""
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.startswith("#"):
                    first = line.lstrip("# ").strip()
                    break
            where = f"  [{path}]" if paths else ""
            typer.echo(f"{name:<{width}}  {first}{where}")


def _diffalign_version() -> str:
    try:
        return version("diffalign-core")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def version_callback(dist: str) -> Callable[[bool], None]:
    def callback(value: bool) -> None:
        if value:
            try:
                text = version(dist)
            except PackageNotFoundError:  # pragma: no cover
                text = "unknown"
            typer.echo(f"{dist} {text}")
            raise typer.Exit()

    return callback


def method_app(method: str, help: str) -> typer.Typer:
    """The typer app of a method package: its ``--version`` (of ``diffalign-<method>``) and ``recipes``
    command; the package adds its own commands."""
    app = typer.Typer(name=method, help=help, no_args_is_help=True, add_completion=False)

    @app.callback()
    def _root(
        show_version: bool = typer.Option(
            False,
            "--version",
            callback=version_callback(f"diffalign-{method}"),
            is_eager=True,
            help="Print the version.",
        ),
    ) -> None:
        pass

    add_recipes_command(app, method)
    return app


app = typer.Typer(
    name="diffalign",
    help="Align text-to-image diffusion models with human preferences and make them cheaper to run.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=version_callback("diffalign-core"),
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Align text-to-image diffusion models with human preferences and make them cheaper to run."""


config_app = typer.Typer(help="Inspect and check recipe configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _config_classes() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=CONFIG_GROUP)}


def _method_config(method: str) -> Any:
    eps = _config_classes()
    if method not in eps:
        _fail(f"unknown method {method!r}; installed methods: {', '.join(sorted(eps)) or 'none'}")
    return eps[method].load()


def _components_fn(method: str) -> Callable[[Any], list[Component]] | None:
    """The method's ``recipe_components(cfg)`` (in the module of its ``diffalign.cli`` entry point)."""
    for ep in entry_points(group=CLI_GROUP):
        if ep.name == method:
            return getattr(importlib.import_module(ep.module), "recipe_components", None)
    return None


@config_app.command("schema")
def config_schema_cmd(method: str = typer.Argument(..., help="Method name, e.g. mlcm")) -> None:
    """Print the JSON schema of a method's recipe config."""
    cls = _method_config(method)
    typer.echo(json.dumps(cls.model_json_schema(), indent=2))


@config_app.command("validate")
def config_validate_cmd(
    method: str = typer.Argument(..., help="Method name, e.g. mlcm"),
    recipe: str = typer.Argument(..., help="Recipe file or built-in recipe name"),
    overrides: list[str] = SetOption,
    check_files: bool = typer.Option(
        False, "--check-files", help="Also fail when a named local model/reward folder is missing here"
    ),
) -> None:
    """Check a recipe offline: keys and types, and that every named reward gets the arguments its factory
    needs. Missing local folders are listed as notes (errors with --check-files). Loads no model."""
    cls = _method_config(method)
    try:
        cfg = load_config(cls, resolve_recipe(method, recipe), list(overrides or []))
    except ConfigError as err:
        _fail(str(err))
    components = _components_fn(method)
    comps = components(cfg) if components is not None else []
    problems = check_components(comps, files=False)
    if problems:
        _fail_each(problems)
    notes = [p for p in check_components(comps, files=True) if p not in problems]
    if notes and check_files:
        _fail_each(notes)
    for note in notes:
        typer.echo(f"note: {note}")
    names = ", ".join(f"{c.kind} {c.name}" for c in comps) or "no named models or rewards"
    typer.echo(f"ok: {recipe} is a valid {method} recipe ({names})")


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
WORLD_HELP = "The shapes world: build, sample, info."


def _first_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def register_method_apps(argv: list[str] | None = None) -> None:
    """Add ``world`` and every installed method's app (entry-point group ``diffalign.cli``), once.

    Done when the command runs, not at import: a method's ``cli`` module imports this module, and
    registering at import time would load that method's half-initialised module again. With ``argv``
    (the command line), ``world`` is a help-only placeholder unless it is the command being run: the
    shapes package imports torch, which ``diffalign --help`` and ``diffalign mlcm ...`` do not need.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    if argv is not None and _first_command(argv) != "world":
        app.add_typer(typer.Typer(help=WORLD_HELP, no_args_is_help=True), name="world", help=WORLD_HELP)
    else:
        try:
            from .shapes.cli import app as world_app

            app.add_typer(world_app, name="world", help=WORLD_HELP)
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
    register_method_apps(sys.argv[1:])
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
