"""Every method's training/search command goes through core's recipe runner: the same run-directory
guards, exit codes and one-line errors in mlcm, di-star, selma, listener-reward and ecad.

A run directory is prepared the way a previous run of the command leaves it (core's ``prepare_run_dir``),
so no model is loaded: each case fails (or is stopped) before training starts.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffalign.core.rundir import RUN_MARKER, prepare_run_dir
from diffalign.core.runner import load_recipe
from diffalign.core.training import CheckpointError


@dataclass
class Method:
    name: str  # the run name recorded in the run directory
    cli: str  # module of the typer app
    command: list[str]  # the training command
    config: str  # "module:Class" of the recipe
    recipe: dict  # a minimal recipe; {run} is the run directory
    run_key: str  # recipe key of the run directory
    changed: str  # an override that changes the run (refused on resume)
    missing_file: str  # an override naming a missing file (bad input)
    stage: str  # "module:function" the command runs (patched to fail at run time)
    ignore: str  # "module:NAME" of the keys the command leaves out of the fingerprint


METHODS = [
    Method(
        "mlcm",
        "diffalign.mlcm.cli",
        ["distill"],
        "diffalign.mlcm.config:MLCMRecipe",
        {"run_dir": "{run}", "model": {"source": "shapes/unet"}, "stage1": {"iterations": 2}},
        "run_dir",
        "stage1.iterations=3",
        "data.prompts_file={missing}",
        "diffalign.mlcm.train:train",
        "diffalign.mlcm.cli:FINGERPRINT_IGNORE",
    ),
    Method(
        "di-star",
        "diffalign.di_star.cli",
        ["train"],
        "diffalign.di_star.config:DiStarConfig",
        {"run_dir": "{run}", "model": {"teacher": "shapes/unet"}, "loss": {"alpha_rew": 0.0}},
        "run_dir",
        "loss.alpha_rew=2.0",
        "data.prompts={missing}",
        "diffalign.di_star.train:train",
        "diffalign.di_star.cli:FINGERPRINT_IGNORE",
    ),
    Method(
        "selma",
        "diffalign.selma.cli",
        ["train"],
        "diffalign.selma.config:SelmaConfig",
        {"run_dir": "{run}", "model": "shapes/unet", "skills": [{"name": "count"}]},
        "run_dir",
        "train.rank=8",
        "model={missing}",
        "diffalign.selma.stages:stage_train",
        "diffalign.selma.cli:FINGERPRINT_IGNORE",
    ),
    Method(
        "listener-reward grpo",
        "diffalign.listener_reward.cli",
        ["train"],
        "diffalign.listener_reward.config:ListenerRewardRecipe",
        {"grpo": {"output_dir": "{run}", "num_generations": 2, "per_device_batch_size": 2}},
        "grpo.output_dir",
        "grpo.beta=0.5",
        "data.train_path={missing}",
        "diffalign.listener_reward.train:run_grpo",
        "diffalign.listener_reward.cli:GRPO_IGNORE",
    ),
    Method(
        "ecad",
        "diffalign.ecad.cli",
        ["search"],
        "diffalign.ecad.config:EcadRecipe",
        {"run_dir": "{run}", "model": {"source": "shapes/dit"}},
        "run_dir",
        "search.population_size=6",
        "model.source={missing}",
        "diffalign.ecad.search:run_search",
        "diffalign.ecad.config:FINGERPRINT_IGNORE",
    ),
]


def _load(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _fill(node, run: Path):
    if isinstance(node, dict):
        return {k: _fill(v, run) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, run) for v in node]
    return str(run) if node == "{run}" else node


def _recipe(tmp_path: Path, m: Method) -> tuple[Path, Path]:
    run = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_fill(m.recipe, run)))
    return path, run


def _previous_run(m: Method, recipe: Path, run: Path, name: str | None = None) -> dict[str, bytes]:
    """Leave ``run`` as an earlier run of this command (or of ``name``) did: its marker and a file."""
    cfg = load_recipe(_load(m.config), recipe)
    prepare_run_dir(run, name or m.name, cfg, ignore=_load(m.ignore))
    (run / "config.yaml").write_text("earlier\n")
    return _snapshot(run)


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())} if run.exists() else {}


def _invoke(m: Method, *args: str):
    app = importlib.import_module(m.cli).app
    return CliRunner().invoke(app, [*m.command, *args])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(params=METHODS, ids=lambda m: m.name.split()[0])
def method(request, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "DIFFALIGN_LAUNCHED", "DIFFALIGN_ERROR_FILE"):
        monkeypatch.delenv(var, raising=False)
    m = request.param

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"{m.stage} ran although the command should have stopped before it")

    module, _, attr = m.stage.partition(":")
    monkeypatch.setattr(importlib.import_module(module), attr, must_not_run)
    return m


def test_changed_recipe_is_refused_naming_the_key_and_writes_nothing(method, tmp_path):
    recipe, run = _recipe(tmp_path, method)
    before = _previous_run(method, recipe, run)
    result = _invoke(method, str(recipe), "--set", method.changed)
    key = method.changed.split("=")[0]
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], lines
    assert _snapshot(run) == before


def test_an_allowed_change_passes_the_guard(method, tmp_path):
    recipe, run = _recipe(tmp_path, method)
    _previous_run(method, recipe, run)
    key = method.changed.split("=")[0]
    result = _invoke(method, str(recipe), "--set", method.changed, "--allow-changed", key)
    # past the run-directory guard, the (patched) stage is reached: a bug-style failure, not a refusal
    assert isinstance(result.exception, AssertionError) and "ran although" in str(result.exception)
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["history"][-1]["changed"] == [key]


def test_resume_never_needs_an_empty_run_dir(method, tmp_path):
    recipe, run = _recipe(tmp_path, method)
    before = _previous_run(method, recipe, run)
    result = _invoke(method, str(recipe), "--resume", "never")
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and "never" in lines[0] and "empty" in lines[0]
    assert _snapshot(run) == before


def test_a_run_dir_of_another_method_is_refused(method, tmp_path):
    recipe, run = _recipe(tmp_path, method)
    before = _previous_run(method, recipe, run, name="some-other-method")
    result = _invoke(method, str(recipe))
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and "some-other-method" in lines[0]
    assert _snapshot(run) == before


def test_a_missing_file_is_bad_input_in_one_line(method, tmp_path):
    recipe, run = _recipe(tmp_path, method)
    missing = tmp_path / "no-such-file"
    result = _invoke(method, str(recipe), "--set", method.missing_file.format(missing=missing))
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-file" in lines[0], lines
    assert not run.exists()


def test_a_runtime_failure_exits_1_in_one_line(method, tmp_path, monkeypatch):
    recipe, run = _recipe(tmp_path, method)

    def corrupt(*args, **kwargs):
        raise CheckpointError("checkpoint file step_3 is truncated or corrupt\ndelete it to resume")

    module, _, attr = method.stage.partition(":")
    monkeypatch.setattr(importlib.import_module(module), attr, corrupt)
    result = _invoke(method, str(recipe))
    assert result.exit_code == 1, result.output
    lines = _error_lines(result)
    assert lines == ["error: checkpoint file step_3 is truncated or corrupt delete it to resume"]
    assert json.loads((run / RUN_MARKER).read_text())["method"] == method.name


def test_python_m_runs_every_method_cli():
    """``python -m diffalign.<m>.cli`` (what ``accelerate launch -m`` runs on each rank) is the CLI."""
    import subprocess
    import sys

    for m in METHODS:
        done = subprocess.run(
            [sys.executable, "-m", m.cli, *m.command, "--help"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and "--resume" in done.stdout and "--allow-changed" in done.stdout, m.cli
