import json
import sys
from typing import Any, Literal

import pytest
from pydantic import Field, ValidationError

from diffalign.core.config import Config, ConfigError
from diffalign.core.launch import LaunchConfig
from diffalign.core.models import ModelNotFoundError
from diffalign.core.rewards import register_reward, unregister_reward
from diffalign.core.rundir import RUN_MARKER
from diffalign.core.runner import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RUNTIME,
    BadInputError,
    check_file,
    check_model,
    check_reward,
    load_recipe,
    run_recipe,
    typed_overrides,
)
from diffalign.core.training import CheckpointError


class Reward(Config):
    name: str = "toy-reward"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Recipe(Config):
    run_dir: str = "unset"
    steps: int = 3
    lr: float = 1e-3
    flag: bool = False
    tag: str = "a"
    note: str | None = None
    mode: Literal["no", "yes", "fast"] = "fast"
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.99])
    reward: Reward = Field(default_factory=Reward)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\nsteps: 3\n")
    return path


@pytest.fixture(autouse=True)
def _not_launched(monkeypatch):
    for var in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "ACCELERATE_DYNAMO_BACKEND",
        "DIFFALIGN_LAUNCHED",
        "DIFFALIGN_ERROR_FILE",
    ):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- typed overrides


def test_typed_overrides_follow_the_field_type(recipe_file):
    cfg = load_recipe(
        Recipe,
        recipe_file,
        [
            "launch.mixed_precision=no",  # YAML 1.1 would make this False
            "mode=no",
            "flag=no",  # a bool field: YAML's no is False
            "tag=123",  # a str field keeps the text
            "note=null",
            "steps=7",
            "lr=1e-4",  # PyYAML reads 1e-4 as a string; the float field parses it
            "betas=[0.5, 0.6]",
            "reward.kwargs.scale=2",  # free-form dict: plain YAML
            "reward.kwargs.on=yes",
        ],
    )
    assert cfg.launch.mixed_precision == "no" and cfg.mode == "no"
    assert cfg.flag is False and cfg.tag == "123" and cfg.note is None
    assert cfg.steps == 7 and cfg.lr == 1e-4 and cfg.betas == [0.5, 0.6]
    assert cfg.reward.kwargs == {"scale": 2, "on": True}


def test_recipe_file_values_follow_the_field_type_like_overrides(tmp_path):
    """YAML 1.1 reads no/yes/on/off as booleans; a recipe file keeps them as text where a string is asked."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "launch:\n  mixed_precision: no\n"  # the string "no", not False
        "mode: no\n"  # a Literal of strings
        "flag: on\n"  # a bool field: YAML 1.1's reading
        "tag: off\n"  # a str field keeps the text
        "reward:\n  kwargs:\n    on: yes\n    plain: false\n"  # free-form dict: YAML 1.1 as before
    )
    cfg = load_recipe(Recipe, path)
    assert cfg.launch.mixed_precision == "no" and cfg.mode == "no" and cfg.tag == "off"
    assert cfg.flag is True
    assert cfg.reward.kwargs == {"on": True, "plain": False}
    # the same values as a plain YAML load would see them: the negative control of this test
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert raw["launch"]["mixed_precision"] is False and raw["tag"] is False
    with pytest.raises(ValidationError, match="mixed_precision"):
        Recipe.model_validate(raw)


def test_typed_overrides_leave_bad_values_for_validation(recipe_file):
    assert typed_overrides(Recipe, ["steps=abc", "nokey", "unknown.x=1"]) == [
        "steps=abc",
        "nokey",
        "unknown.x=1",
    ]
    with pytest.raises(ConfigError, match="steps"):
        load_recipe(Recipe, recipe_file, ["steps=abc"])
    with pytest.raises(ConfigError, match="unknown key 'unknown'"):
        load_recipe(Recipe, recipe_file, ["unknown=1"])
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(Recipe, recipe_file.parent / "missing.yaml")
    with pytest.raises(ConfigError, match="recipe path is a directory"):
        load_recipe(Recipe, recipe_file.parent)


# --------------------------------------------------------------------------- component checks


def _toy_reward(scale: float = 1.0, mode: str = "soft"):
    raise AssertionError("check_reward must not build the reward")


@pytest.fixture
def toy_reward():
    register_reward("toy-reward", _toy_reward, overwrite=True)
    yield
    unregister_reward("toy-reward")


def test_check_reward_binds_kwargs_without_building(toy_reward):
    check_reward("toy-reward", {"scale": 2.0})
    with pytest.raises(
        BadInputError, match="toy-reward.*unexpected keyword argument 'temperature'.*takes scale, mode"
    ):
        check_reward("toy-reward", {"temperature": 2.0})
    with pytest.raises(BadInputError, match="unknown reward 'nope'"):
        check_reward("nope")


def test_check_model_and_file(tmp_path):
    with pytest.raises(BadInputError, match="teacher: model directory not found"):
        check_model(str(tmp_path / "absent"), "teacher")
    check_model(str(tmp_path))
    with pytest.raises(BadInputError, match="prompt file not found"):
        check_file(tmp_path / "p.txt", "prompt file")
    (tmp_path / "p.txt").write_text("")
    with pytest.raises(BadInputError, match="prompt file is empty"):
        check_file(tmp_path / "p.txt", "prompt file")


# --------------------------------------------------------------------------- exit codes


def _run(recipe, overrides=(), train=None, **kwargs):
    calls = []

    def default_train(cfg):
        calls.append(cfg)
        return "ok"

    code = run_recipe(Recipe, recipe, overrides, method="toy", train=train or default_train, **kwargs)
    return code, calls


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_success_writes_marker_and_calls_on_success(recipe_file, tmp_path):
    done = []
    code, calls = _run(recipe_file, ["steps=5"], on_success=done.append)
    assert code == EXIT_OK and calls[0].steps == 5 and done == ["ok"]
    assert json.loads((tmp_path / "run" / RUN_MARKER).read_text())["method"] == "toy"


@pytest.mark.parametrize(
    "overrides",
    [
        ["steps=abc"],
        ["nosuchkey=1"],
        ["launch.mixed_precision=fp8"],
        ["launch.launcher=none", "launch.num_processes=2"],
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(recipe_file, tmp_path, capsys, overrides):
    code, calls = _run(recipe_file, overrides)
    assert code == EXIT_BAD_INPUT and calls == []
    _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_missing_recipe_exits_2(tmp_path, capsys):
    code, calls = _run(tmp_path / "missing.yaml")
    assert code == EXIT_BAD_INPUT and calls == []
    assert "recipe file not found" in _one_error_line(capsys)


def test_check_hook_runs_before_training_and_maps_to_2(recipe_file, tmp_path, capsys, toy_reward):
    def check(cfg):
        check_reward(cfg.reward.name, cfg.reward.kwargs)

    code, calls = _run(recipe_file, ["reward.kwargs.temperature=1"], check=check)
    assert code == EXIT_BAD_INPUT and calls == []
    assert "temperature" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    code, calls = _run(recipe_file, ["reward.kwargs.scale=3"], check=check)
    assert code == EXIT_OK and calls[0].reward.kwargs == {"scale": 3}


def test_changed_recipe_and_other_method_exit_2(recipe_file, tmp_path, capsys):
    assert _run(recipe_file)[0] == EXIT_OK
    code, calls = _run(recipe_file, ["steps=9", "lr=0.5"])
    assert code == EXIT_BAD_INPUT and calls == []
    line = _one_error_line(capsys)
    assert "steps (3 -> 9)" in line and "lr (0.001 -> 0.5)" in line
    code, calls = _run(recipe_file, ["steps=9", "lr=0.5"], allow_changed=["steps", "lr"])
    assert code == EXIT_OK and calls
    code, calls = (
        run_recipe(Recipe, recipe_file, ["steps=9", "lr=0.5"], method="other", train=lambda c: 0),
        [],
    )
    assert code == EXIT_BAD_INPUT and "holds a 'toy' run" in _one_error_line(capsys)
    code, calls = _run(recipe_file, ["steps=9", "lr=0.5"], resume="never")
    assert code == EXIT_BAD_INPUT and "needs an empty run_dir" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "error",
    [
        CheckpointError("checkpoint step_3.pt is truncated or corrupt"),
        ModelNotFoundError("model 'org/missing' is not available locally"),
        OSError("No space left on device"),
    ],
)
def test_runtime_failures_exit_1_with_one_line(recipe_file, capsys, error):
    def train(cfg):
        raise error

    code, _ = _run(recipe_file, train=train)
    assert code == EXIT_RUNTIME
    assert _one_error_line(capsys) == f"error: {error}"


def test_multiline_messages_become_one_line(recipe_file, capsys):
    def train(cfg):
        raise CheckpointError("first line\n  second line\n")

    assert _run(recipe_file, train=train)[0] == EXIT_RUNTIME
    assert _one_error_line(capsys) == "error: first line second line"


def test_unexpected_errors_keep_their_traceback(recipe_file):
    def train(cfg):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        _run(recipe_file, train=train)


def test_method_specific_error_types(recipe_file, capsys):
    class SearchDiverged(Exception):
        pass

    def train(cfg):
        raise SearchDiverged("replay diverged at generation 3")

    code, _ = _run(recipe_file, train=train, runtime_errors=(SearchDiverged,))
    assert code == EXIT_RUNTIME and "generation 3" in _one_error_line(capsys)


def test_process_count_mismatch_under_a_launcher_exits_2(recipe_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, calls = _run(recipe_file)
    assert code == EXIT_BAD_INPUT and calls == []
    line = _one_error_line(capsys)
    assert "launch.num_processes=1" in line and "started with 2" in line
    assert not (tmp_path / "run").exists()
    # the same launch with a matching recipe is accepted and not relaunched
    code, calls = _run(recipe_file, ["launch.launcher=torchrun", "launch.num_processes=2"])
    assert code == EXIT_OK and len(calls) == 1


def test_other_ranks_do_not_touch_the_run_dir(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, calls = _run(recipe_file, ["launch.launcher=torchrun", "launch.num_processes=2"])
    assert code == EXIT_OK and calls and not (tmp_path / "run").exists()


def test_relaunch_runs_the_launcher_and_returns_its_code(recipe_file, tmp_path, monkeypatch, capsys):
    import diffalign.core.runner as runner

    seen = {}

    def fake_relaunch(launch_cfg, env=None):
        seen["launcher"] = launch_cfg.launcher
        return 5

    monkeypatch.setattr(runner, "_relaunch", fake_relaunch)
    code, calls = _run(recipe_file, ["launch.launcher=accelerate", "launch.num_processes=2"])
    assert code == 5 and calls == [] and seen == {"launcher": "accelerate"}
    assert not (tmp_path / "run").exists()  # the parent only checks; rank 0 of the launch writes
    monkeypatch.setenv("DIFFALIGN_LAUNCHED", "1")  # a child of a relaunch never relaunches again
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, calls = _run(recipe_file, ["launch.launcher=accelerate", "launch.num_processes=2"])
    assert code == EXIT_OK and calls


def test_single_process_accelerate_launch_is_not_relaunched(recipe_file, monkeypatch):
    import diffalign.core.runner as runner

    monkeypatch.setattr(runner, "_relaunch", lambda *a, **k: pytest.fail("relaunched inside a launcher"))
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # set by `accelerate launch`, even for 1 process
    code, calls = _run(recipe_file, ["launch.launcher=accelerate", "launch.deepspeed=zero2"])
    assert code == EXIT_OK and calls


def test_a_relaunched_rank_reports_to_the_parent_instead_of_printing(
    recipe_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DIFFALIGN_LAUNCHED", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("DIFFALIGN_ERROR_FILE", str(tmp_path / "error"))

    def train(cfg):
        raise CheckpointError("corrupt\ncheckpoint")

    code, _ = _run(recipe_file, ["launch.launcher=torchrun", "launch.num_processes=2"], train=train)
    assert code == EXIT_RUNTIME and capsys.readouterr().err == ""
    assert json.loads((tmp_path / "error.1").read_text()) == {"code": 1, "message": "corrupt checkpoint"}


def test_a_typer_command_with_the_shared_options(recipe_file, tmp_path):
    import typer
    from typer.testing import CliRunner

    from diffalign.core.runner import AllowChangedOption, ResumeOption

    app = typer.Typer()

    @app.command()
    def train(
        recipe: str,
        overrides: list[str] = typer.Option(None, "--set"),
        resume: str = ResumeOption,
        allow_changed: list[str] = AllowChangedOption,
    ) -> None:
        raise typer.Exit(
            run_recipe(
                Recipe,
                recipe,
                overrides or [],
                method="toy",
                train=lambda c: None,
                resume=resume,
                allow_changed=allow_changed,
            )
        )

    cli = CliRunner()
    assert cli.invoke(app, [str(recipe_file)]).exit_code == EXIT_OK
    changed = cli.invoke(app, [str(recipe_file), "--set", "steps=4"])
    assert changed.exit_code == EXIT_BAD_INPUT and "steps (3 -> 4)" in changed.output
    assert (
        cli.invoke(app, [str(recipe_file), "--set", "steps=4", "--allow-changed", "steps"]).exit_code
        == EXIT_OK
    )
    fresh = cli.invoke(app, [str(recipe_file), "--resume", "never"])
    assert fresh.exit_code == EXIT_BAD_INPUT and "needs an empty run_dir" in fresh.output
    bad = cli.invoke(app, [str(recipe_file), "--resume", "maybe"])
    assert bad.exit_code == EXIT_BAD_INPUT and "resume must be" in bad.output


def test_relaunch_repeats_this_command(monkeypatch):
    import diffalign.core.runner as runner
    from diffalign.core.launch import build_command

    monkeypatch.setattr(
        sys, "orig_argv", ["py", "-X", "utf8", "-m", "diffalign.mlcm.cli", "distill", "r.yaml"]
    )
    assert runner._current_command() == ("diffalign.mlcm.cli", ["distill", "r.yaml"], False)
    monkeypatch.setattr(sys, "orig_argv", ["py", "/venv/bin/diffalign", "mlcm", "distill", "r.yaml"])
    monkeypatch.setattr(sys, "argv", ["/venv/bin/diffalign", "mlcm", "distill", "r.yaml"])
    target, args, script = runner._current_command()
    assert (target, args, script) == ("/venv/bin/diffalign", ["mlcm", "distill", "r.yaml"], True)
    monkeypatch.setattr(sys, "orig_argv", ["py", "-W", "ignore", "/venv/bin/diffalign", "x", "-m", "y"])
    monkeypatch.setattr(sys, "argv", ["/venv/bin/diffalign", "x", "-m", "y"])
    assert runner._current_command() == ("/venv/bin/diffalign", ["x", "-m", "y"], True)
    cfg = LaunchConfig(launcher="torchrun", num_processes=2)
    cmd = build_command(target, args, cfg, python="py", script=True)
    assert cmd[-4:] == ["/venv/bin/diffalign", "mlcm", "distill", "r.yaml"] and "-m" not in cmd[-5:]
    cmd = build_command(
        "diffalign.mlcm.cli", ["distill"], LaunchConfig(launcher="accelerate", num_processes=2)
    )
    assert cmd[-3:] == ["-m", "diffalign.mlcm.cli", "distill"] and "--multi_gpu" in cmd
