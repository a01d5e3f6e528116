from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffalign.core.config import ConfigError, load_config
from diffalign.listener_reward.cli import app
from diffalign.listener_reward.config import RECIPE_CONFIG

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_validate(recipe):
    cfg = load_config(RECIPE_CONFIG, recipe)
    assert (cfg.reward.format_weight, cfg.reward.accuracy_weight, cfg.reward.listener_weight) == (
        1.0,
        0.5,
        0.5,
    )


def test_config_errors_are_specific():
    with pytest.raises(ConfigError, match="bogus"):
        load_config(RECIPE_CONFIG, None, ["grpo.bogus=1"])
    with pytest.raises(ConfigError, match="listener_url"):
        load_config(RECIPE_CONFIG, None, ["reward.listener_backend=http"])
    with pytest.raises(ConfigError, match="divide"):
        load_config(RECIPE_CONFIG, None, ["grpo.num_generations=3", "grpo.per_device_batch_size=8"])
    with pytest.raises(ConfigError, match="prompt"):
        load_config(RECIPE_CONFIG, None, ["prompts.reasoner_prefix=no placeholder"])


def test_cli_help_and_bad_config_writes_nothing(tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("sft", "train", "eval", "judge", "build-models"):
        assert command in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  nonsense: 1\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_shapes_model_error_names_the_fix(tmp_path, monkeypatch):
    from diffalign.listener_reward.modeling import resolve_source

    monkeypatch.setenv("DIFFALIGN_LISTENER_SHAPES_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="build-models"):
        resolve_source("shapes/listener")


def test_shapes_models_dir_is_independent_of_the_working_directory(monkeypatch, tmp_path):
    from diffalign.listener_reward.modeling import SHAPES_DIR_ENV, shapes_models_dir

    monkeypatch.setenv(SHAPES_DIR_ENV, str(tmp_path / "mine"))
    assert shapes_models_dir() == tmp_path / "mine"
    monkeypatch.delenv(SHAPES_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert shapes_models_dir() == tmp_path / "cache" / "diffalign" / "listener-reward" / "shapes-models"
    assert shapes_models_dir().is_absolute()


def test_judge_and_eval_commands_on_tiny_models(tiny_dirs, pairs, tmp_path):
    import json

    shapes = Path(__file__).resolve().parents[1] / "recipes" / "shapes.yaml"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    pairs[0].images()[0].save(a)
    pairs[0].images()[1].save(b)
    sets = [
        "--set",
        f"model.listener={tiny_dirs['listener']}",
        "--set",
        "judge.max_new_tokens=4",
        "--set",
        "data.num_eval=4",
        "--set",
        f"eval.output={tmp_path / 'eval.json'}",
        "--set",
        "eval.bootstrap=20",
    ]
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["judge", str(shapes), "--prompt", pairs[0].prompt, "--image-a", str(a), "--image-b", str(b)]
        + ["--checkpoint", tiny_dirs["reasoner"], *sets],
    )
    assert res.exit_code == 0, res.output
    verdict = json.loads(res.output[res.output.index("{") :])
    assert verdict["choice"] in (1, 2) and 0.5 <= verdict["probability"] <= 1
    res = runner.invoke(app, ["eval", str(shapes), "--checkpoint", tiny_dirs["reasoner"], *sets])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["checkpoint"] == tiny_dirs["reasoner"]
    assert {"test_id", "test_ood"} <= set(report) and report["test_id"]["n"] == 4
