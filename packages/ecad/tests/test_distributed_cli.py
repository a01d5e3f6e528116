"""End to end through the CLI: a 1-process and a 2-process (torchrun, CPU) search give the same front."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffalign.ecad.cli import app

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def saved_pixart(tmp_path_factory, pixart_pipe):
    path = tmp_path_factory.mktemp("pixart") / "model"
    pixart_pipe.save_pretrained(path)
    return path


def _recipe(tmp_path, model, run_dir, launcher="none", n=1):
    data = {
        "run_dir": str(run_dir),
        "model": {"source": str(model)},
        "sampling": {
            "num_inference_steps": 3,
            "guidance_scale": 4.5,
            "height": 16,
            "width": 16,
            "batch_size": 2,
        },
        "calibration": {"prompts": ["a red circle", "two blue squares"], "num_prompts": 2, "num_seeds": 1},
        "quality": {"reward": "ecad_test_support:make_reward"},
        "search": {"population_size": 4, "generations": 2, "seed": 0, "num_threads": 1},
        "launch": {"launcher": launcher, "num_processes": n},
    }
    path = tmp_path / f"recipe_{launcher}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args):
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "DIFFALIGN_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "diffalign.ecad.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_two_process_search_gives_the_same_front(tmp_path, saved_pixart):
    one = _cli("search", str(_recipe(tmp_path, saved_pixart, tmp_path / "one")))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("search", str(_recipe(tmp_path, saved_pixart, tmp_path / "two", "torchrun", 2)))
    assert two.returncode == 0, two.stderr[-3000:]
    f1 = json.loads((tmp_path / "one" / "front.json").read_text())
    f2 = json.loads((tmp_path / "two" / "front.json").read_text())
    strip = lambda f: [{k: v for k, v in e.items() if k != "path"} for e in f["front"]]  # noqa: E731
    assert strip(f1) == strip(f2) and len(f1["front"]) >= 1
    assert f1["evaluations"] == f2["evaluations"]


def test_cli_front_info_apply(tmp_path, pixart_pipe, monkeypatch):
    from ecad_test_support import make_reward, tiny_recipe

    from diffalign.ecad.search import run_search

    run_search(
        tiny_recipe(tmp_path / "one", generations=1),
        pipe=pixart_pipe,
        reward=make_reward(),
        show_progress=False,
    )
    f1 = json.loads((tmp_path / "one" / "front.json").read_text())
    monkeypatch.setattr("diffalign.core.models.load_pipeline", lambda *a, **k: pixart_pipe)
    runner = CliRunner()
    res = runner.invoke(app, ["front", str(tmp_path / "one")])
    assert res.exit_code == 0 and "flop_ratio" in res.output
    chosen = next(iter(f1["front"]))["path"]
    res = runner.invoke(app, ["info", str(tmp_path / "one" / chosen)])
    assert res.exit_code == 0 and "reused" in res.output
    out = tmp_path / "grid.png"
    res = runner.invoke(
        app,
        [
            "apply",
            "--model",
            "tiny-pixart",
            "--schedule",
            str(tmp_path / "one" / chosen),
            "--prompt",
            "a red circle",
            "--out",
            str(out),
            "--height",
            "16",
            "--width",
            "16",
        ],
    )
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0


def test_cli_config_errors_exit_2_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "search": {"populaton_size": 4}}))
    res = CliRunner().invoke(app, ["search", str(bad)])
    assert res.exit_code == 2
    assert "populaton_size" in res.output
    assert not (tmp_path / "run").exists()
    res = CliRunner().invoke(app, ["info", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "not found" in res.output
