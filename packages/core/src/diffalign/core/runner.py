"""One way to run a recipe from a method's CLI: load, check, launch, guard the run directory, train.

:func:`run_recipe` is what a method command calls::

    code = run_recipe(MLCMRecipe, recipe, overrides, method="mlcm", train=train, check=check)
    raise typer.Exit(code)

It

1. loads the recipe with ``--set`` overrides whose values are parsed by the target field's type
   (:func:`typed_overrides`: ``launch.mixed_precision=no`` stays the string ``"no"``, ``flag=no`` on a
   boolean field is ``False``);
2. calls ``check(cfg)``, the method's hook that binds and checks every named component (reward name
   and keyword arguments, model ids, files) before any model loads (:func:`check_reward`,
   :func:`check_model`, :func:`check_file` help);
3. checks the run directory against the recipe (:func:`diffalign.core.rundir.prepare_run_dir`);
4. when the recipe's ``launch`` section asks for a launcher and this process was not started by one,
   re-runs the same command under accelerate or torchrun and returns its exit code; when it was
   started by one (torchrun or ``accelerate launch``), checks that the process count equals
   ``launch.num_processes``;
5. calls ``train(cfg)``.

Exit codes (:data:`EXIT_OK`, :data:`EXIT_RUNTIME`, :data:`EXIT_BAD_INPUT`): ``2`` for bad input found
in steps 1-4, before anything is written; ``1`` for a known runtime failure during training
(``CheckpointError``, ``ModelNotFoundError``, ``NonFiniteError``, ``OSError``, ...). Both print one
line, ``error: <message>``, on stderr (``DIFFALIGN_TRACEBACK=1`` prints the traceback too). Any other
exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from pydantic import BaseModel

from .config import (
    Component,
    ConfigError,
    _accepts,
    _unwrap_model,
    check_components,
    load_config,
    resolve_recipe,
)
from .errors import CheckpointError, NonFiniteError
from .launch import ProcessCountError, build_command, launched_world_size, process_rank, started_by_launcher
from .models import ModelNotFoundError, resolve_model_path
from .rundir import ResumeMode, RunDirError, prepare_run_dir

__all__ = [
    "AllowChangedOption",
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "BadInputError",
    "ResumeOption",
    "check_components_or_raise",
    "check_file",
    "check_model",
    "check_reward",
    "load_recipe",
    "run_recipe",
    "typed_overrides",
]

T = TypeVar("T", bound=BaseModel)

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2

# the launcher relaunch marks its children so they never relaunch again, and tells them where to
# report the error of a failed rank (so the parent can print it once, with its exit code)
LAUNCHED_ENV = "DIFFALIGN_LAUNCHED"
ERROR_FILE_ENV = "DIFFALIGN_ERROR_FILE"


# typer options for a method command that calls run_recipe (resume=..., allow_changed=...)
ResumeOption = typer.Option(
    "auto",
    "--resume",
    help="auto: resume the run in run_dir if there is one; never: start fresh (run_dir must be empty); "
    "always: fail unless there is a run to resume",
)
AllowChangedOption = typer.Option(
    None,
    "--allow-changed",
    help="Recipe key allowed to differ from the run being resumed (repeatable; a section allows all its keys)",
)


class BadInputError(ValueError):
    """Raised by a ``check`` hook: the recipe names something unusable. Exit code 2."""


INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    BadInputError,
    RunDirError,
    ProcessCountError,
    ModelNotFoundError,
    FileNotFoundError,
    ValueError,
    KeyError,
)
RUNTIME_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    NonFiniteError,
    ModelNotFoundError,
    RunDirError,
    ProcessCountError,
    OSError,
)


# --------------------------------------------------------------------------- typed overrides


def _field_annotation(cls: type[BaseModel], parts: Sequence[str]) -> Any:
    """The annotation of the field at ``parts`` in ``cls``, or ``Any`` where it cannot be followed."""
    current: Any = cls
    for index, part in enumerate(parts):
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return Any
        annotation = fields[part].annotation
        if index == len(parts) - 1:
            return annotation
        current = _unwrap_model(annotation)
        if current is None:
            return Any
    return Any


def typed_overrides(cls: type[BaseModel], overrides: Iterable[str]) -> list[str]:
    """Rewrite ``key=value`` overrides so each value reaches ``cls`` with the field's type.

    A value is read as YAML when that gives the field's type exactly (``steps=10``, ``betas=[0.9,
    0.99]``, ``flag=no`` on a bool); otherwise, when the field takes the text as it is (a string, a
    string literal such as ``mixed_precision=no``, a float written ``1e-4``), it is passed as that text;
    otherwise as YAML, and validation names the key. Malformed overrides are left for
    :func:`~diffalign.core.config.load_config` to report.
    """
    out = []
    for item in overrides:
        if "=" not in item:
            out.append(item)
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        annotation = _field_annotation(cls, parts)
        try:
            as_yaml = yaml.safe_load(raw)
        except yaml.YAMLError:
            as_yaml = raw
        if annotation is Any or _accepts(annotation, as_yaml, strict=True):
            out.append(item)
        elif _accepts(annotation, raw, strict=False):
            out.append(f"{key}={json.dumps(raw)}")  # a JSON string is a YAML string: kept verbatim
        else:
            out.append(item)
    return out


def load_recipe(
    cls: type[T], path: str | os.PathLike | None, overrides: Iterable[str] = (), *, method: str | None = None
) -> T:
    """:func:`~diffalign.core.config.load_config` with :func:`typed_overrides`; raises ``ConfigError``.

    With ``method``, ``path`` may also name one of that method's built-in recipes (``shapes_unet``).
    """
    text = str(path) if path is not None else ""
    if (
        path is not None
        and method is not None
        and not Path(path).exists()
        and "/" not in text
        and os.sep not in text
    ):
        path = resolve_recipe(method, path)
    if path is not None and Path(path).is_dir():
        raise ConfigError(f"recipe path is a directory, expected a .yaml/.yml/.toml/.json file: {path}")
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"recipe file not found: {path}")
    return load_config(cls, path, typed_overrides(cls, list(overrides)))


# --------------------------------------------------------------------------- component checks


def check_file(path: str | os.PathLike | None, what: str) -> None:
    """Raise :class:`BadInputError` unless ``path`` is an existing, non-empty file."""
    if path is None:
        return
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise BadInputError(f"{what} is empty: {path}")


def check_model(source: str | os.PathLike | None, what: str = "model") -> None:
    """Resolve a model id or directory without loading it; a missing model is bad input (exit 2)."""
    if source is None:
        return
    try:
        resolve_model_path(source)
    except ModelNotFoundError as err:
        raise BadInputError(f"{what}: {err}") from None


def check_components_or_raise(components: Iterable[Component]) -> None:
    """Raise :class:`BadInputError` listing every problem :func:`~diffalign.core.config.check_components`
    finds with the named models and rewards (unknown reward, missing reward argument, missing folder)."""
    problems = check_components(components, files=True)
    if problems:
        raise BadInputError("; ".join(problems))


def check_reward(name: str | None, kwargs: dict[str, Any] | None = None) -> None:
    """Check that reward ``name`` exists and that its factory takes ``kwargs``, without building it."""
    if name is None:
        return
    from . import rewards

    factory = rewards._REGISTRY.get(name)
    if factory is None:
        entry = rewards._entry_points().get(name)
        if entry is None:
            raise BadInputError(
                f"unknown reward {name!r}; available rewards: {', '.join(rewards.list_rewards()) or 'none'}"
            )
        factory = entry.load()
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C factory: nothing to check
        return
    try:
        signature.bind(**(kwargs or {}))
    except TypeError as err:
        accepted = [p.name for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        raise BadInputError(
            f"reward {name!r}: {err}; it takes {', '.join(accepted) or 'no arguments'}"
        ) from None


# --------------------------------------------------------------------------- running


def _say(message: str, err: BaseException | None = None) -> None:
    rank = process_rank()
    prefix = f"[rank {rank}] " if rank else ""
    print(f"{prefix}error: {_one_line(message)}", file=sys.stderr, flush=True)
    if err is not None and os.environ.get("DIFFALIGN_TRACEBACK") == "1":
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def _report_to_parent(code: int, message: str) -> None:
    target = os.environ.get(ERROR_FILE_ENV)
    if not target:
        return
    path = Path(f"{target}.{process_rank()}")
    try:
        path.write_text(json.dumps({"code": code, "message": message}), encoding="utf-8")
    except OSError:  # pragma: no cover - the parent then reports the launcher's exit code
        pass


def _fail(code: int, err: BaseException) -> int:
    message = _one_line(str(err)) or type(err).__name__
    if os.environ.get(ERROR_FILE_ENV):  # a relaunched rank: the parent prints the error once
        _report_to_parent(code, message)
        if os.environ.get("DIFFALIGN_TRACEBACK") == "1":
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    else:
        _say(message, err)
    return code


def _current_command() -> tuple[str, list[str], bool]:
    """This process's command as (module or script, args, is_script) for a relaunch."""
    argv = list(getattr(sys, "orig_argv", []) or [])
    index = 1
    while index < len(argv) and argv[index].startswith("-"):  # the interpreter's own options
        if argv[index] == "-m":
            return argv[index + 1], argv[index + 2 :], False
        index += 2 if argv[index] in ("-X", "-W") else 1
    return os.path.abspath(sys.argv[0]), list(sys.argv[1:]), True


def _relaunch(launch_cfg: Any, env: dict[str, str] | None = None) -> int:
    """Re-run this command under ``launch_cfg.launcher``; returns the exit code to use."""
    import subprocess

    target, args, is_script = _current_command()
    cmd = build_command(target, args, launch_cfg, script=is_script)
    with tempfile.TemporaryDirectory(prefix="diffalign-launch-") as tmp:
        error_file = str(Path(tmp) / "error")
        child_env = {**os.environ, **(env or {}), LAUNCHED_ENV: "1", ERROR_FILE_ENV: error_file}
        result = subprocess.run(cmd, env=child_env, check=False)
        if result.returncode == 0:
            return EXIT_OK
        reports = sorted(Path(tmp).glob("error.*"), key=lambda p: int(p.suffix[1:]))
        if reports:
            report = json.loads(reports[0].read_text(encoding="utf-8"))
            print(f"error: {report['message']}", file=sys.stderr, flush=True)
            return int(report["code"])
    print(
        f"error: the {launch_cfg.launcher} launcher exited with code {result.returncode}: {' '.join(cmd)}",
        file=sys.stderr,
    )
    return EXIT_RUNTIME


def _dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def run_recipe(
    recipe_cls: type[T],
    recipe: str | os.PathLike | None,
    overrides: Iterable[str] = (),
    *,
    method: str,
    train: Callable[[T], Any],
    check: Callable[[T], None] | None = None,
    components: Callable[[T], Iterable[Component]] | None = None,
    run_dir: str | os.PathLike | None = None,
    run_name: str | None = None,
    resume: ResumeMode = "auto",
    allow_changed: Iterable[str] | None = (),
    fingerprint_ignore: Iterable[str] = ("run_dir",),
    run_dir_field: str | None = "run_dir",
    launch_field: str | None = "launch",
    input_errors: tuple[type[BaseException], ...] = (),
    runtime_errors: tuple[type[BaseException], ...] = (),
    on_success: Callable[[Any], None] | None = None,
) -> int:
    """Run ``train(cfg)`` for a recipe file and overrides; returns the process exit code.

    ``method`` names the method (its built-in recipes) and, unless ``run_name`` is given (a method
    with several kinds of run, such as SFT and GRPO), the run in its run directory. ``fingerprint_ignore`` lists recipe keys that may
    differ on resume (``launch`` is a good candidate when a method's result does not depend on the
    process layout); ``allow_changed`` is the user's explicit permission for others. ``input_errors``
    and ``runtime_errors`` add method-specific exception types to the two exit codes.
    ``on_success(result)`` runs on the main process after training (print where the output went).
    ``recipe`` is a file or the name of one of ``method``'s built-in recipes; ``run_dir`` (the
    ``--run-dir`` option) overrides the recipe's ``run_dir_field``. ``components(cfg)`` lists the models
    and rewards the recipe names (:class:`~diffalign.core.config.Component`); they are checked with
    :func:`check_components_or_raise` before ``check(cfg)``.
    """
    bad_input = INPUT_ERRORS + input_errors
    overrides = list(overrides or ())
    if run_dir is not None and run_dir_field:
        overrides.append(f"{run_dir_field}={run_dir}")
    try:
        cfg = load_recipe(recipe_cls, recipe, overrides, method=method)
        if components is not None:
            check_components_or_raise(components(cfg))
        if check is not None:
            check(cfg)
        launch_cfg = getattr(cfg, launch_field, None) if launch_field else None
        world = launched_world_size()
        relaunch = (
            launch_cfg is not None
            and launch_cfg.launcher != "none"
            and not started_by_launcher()
            and os.environ.get(LAUNCHED_ENV) != "1"
        )
        expected = launch_cfg.num_processes if launch_cfg is not None else 1
        if not relaunch and (world or 1) != expected:
            raise ProcessCountError(
                f"the recipe asks for launch.num_processes={expected} but this run was started with "
                f"{world or 1} process(es); launch it with {expected} or set "
                f"--set launch.num_processes={world or 1}"
                + (" --set launch.launcher=accelerate" if (world or 1) > 1 and expected == 1 else "")
            )
        target_dir = _dotted(cfg, run_dir_field) if run_dir_field else None
        if target_dir is not None and process_rank() == 0:
            prepare_run_dir(
                target_dir,
                run_name or method,
                cfg,
                resume=resume,
                allow_changed=allow_changed or (),
                ignore=fingerprint_ignore,
                write=not relaunch,
            )
    except bad_input as err:
        return _fail(EXIT_BAD_INPUT, err)

    if relaunch:
        return _relaunch(launch_cfg)

    try:
        result = train(cfg)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except RUNTIME_ERRORS + runtime_errors as err:
        return _fail(EXIT_RUNTIME, err)
    if on_success is not None and process_rank() == 0:
        on_success(result)
    return EXIT_OK
