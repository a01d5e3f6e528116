import json
import subprocess
import sys
from typing import Literal

import pytest

from diffalign.core.config import Config, ConfigError, apply_overrides, load_config, save_config


class Optim(Config):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)


class Recipe(Config):
    name: str = "run"
    steps: int = 10
    mode: Literal["full", "lora"] = "full"
    optim: Optim = Optim()


def test_yaml_toml_and_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("steps: 5\noptim:\n  lr: 0.01\n")
    (tmp_path / "r.toml").write_text("steps = 5\n[optim]\nlr = 0.01\n")
    for f in ("r.yaml", "r.toml"):
        cfg = load_config(Recipe, tmp_path / f, ["optim.lr=1e-4", "mode=lora"])
        assert cfg.steps == 5 and cfg.optim.lr == pytest.approx(1e-4) and cfg.mode == "lora"


def test_unknown_key_names_key_and_allowed_values(tmp_path):
    (tmp_path / "r.yaml").write_text("optim:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, tmp_path / "r.yaml")
    msg = str(err.value)
    assert "optim.lrr" in msg and "betas, lr" in msg and "r.yaml" in msg


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(ConfigError, match="steps"):
        load_config(Recipe, None, ["steps=many"])
    with pytest.raises(ConfigError, match="'full' or 'lora'"):
        load_config(Recipe, None, ["mode=half"])


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Recipe, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(Recipe, None, ["steps"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_save_config_round_trip(tmp_path):
    cfg = load_config(Recipe, None, ["optim.lr=0.5"])
    path = save_config(cfg, tmp_path / "run")
    assert load_config(Recipe, path) == cfg


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path):
    """A typer command built on load_config_or_exit: bad key -> exit 2, one message, no run dir."""
    script = tmp_path / "cmd.py"
    script.write_text(
        "import typer\n"
        "from diffalign.core.cli import load_config_or_exit\n"
        "from diffalign.core.config import Config, save_config\n"
        "class R(Config):\n    steps: int = 1\n"
        "def main(path: str, out: str):\n"
        "    cfg = load_config_or_exit(R, path, [])\n"
        "    save_config(cfg, out)\n"
        "typer.run(main)\n"
    )
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "bad.yaml"), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown key 'stepz'" in proc.stderr and "allowed keys here: steps" in proc.stderr
    assert not out.exists()


def test_schema_is_json():
    schema = Recipe.model_json_schema()
    assert json.loads(json.dumps(schema))["properties"]["mode"]["enum"] == ["full", "lora"]
