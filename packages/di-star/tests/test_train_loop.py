"""The recipe loop: checkpoints, exact resume, export, and the CLI (train / sample / bad input)."""

from __future__ import annotations

import json

import pytest
import torch
from distar_fixtures import TinyPixelReward, tiny_config
from typer.testing import CliRunner

from diffalign.core import testing
from diffalign.core.checkpoints import StateCheckpoints
from diffalign.core.rewards import register_reward
from diffalign.di_star.cli import app
from diffalign.di_star.train import train

register_reward("distar-test-reward", TinyPixelReward, overwrite=True)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny-sd-v"
    testing.tiny_sd_pipeline(seed=0, prediction_type="v_prediction").save_pretrained(path)
    return path


def _final_generator(run_dir):
    """The generator's weights (accelerate's first prepared model) in the latest checkpoint, and its step."""
    from safetensors.torch import load_file

    ckpt = StateCheckpoints(None, run_dir)
    step = ckpt.latest_step()
    return load_file(ckpt.path_for(step) / "model.safetensors"), step


def test_resume_ends_where_uninterrupted_run_ends(tmp_path, teacher_dir):
    model = {"teacher": str(teacher_dir)}
    straight = tmp_path / "straight"
    out = train(tiny_config(straight, model=model, training={"max_steps": 3, "checkpoint_every": 1}))
    interrupted = tmp_path / "interrupted"
    train(tiny_config(interrupted, model=model, training={"max_steps": 2, "checkpoint_every": 1}))
    train(tiny_config(interrupted, model=model, training={"max_steps": 3, "checkpoint_every": 1}))
    a, step_a = _final_generator(straight)
    b, step_b = _final_generator(interrupted)
    assert step_a == step_b == 3
    assert all(torch.equal(a[k], b[k]) for k in a)
    teacher_unet = testing.tiny_sd_pipeline(seed=0, prediction_type="v_prediction").unet.state_dict()
    assert any(not torch.equal(a[k], teacher_unet[k]) for k in a if k in teacher_unet)  # the generator moved
    assert (out / "di_star.json").exists() and (out / "model_index.json").exists()
    assert json.loads((out / "di_star.json").read_text())["t_star"] == 399
    assert StateCheckpoints(None, straight).latest_step() == 3
    lines = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 3]  # log_every 10: the last step of each run is logged once
    assert (straight / "config.yaml").exists()

    # the exported generator samples through the CLI with the pipeline's own LCMScheduler
    result = CliRunner().invoke(
        app,
        [
            "sample",
            str(out),
            "-p",
            "a red circle",
            "-p",
            "two blue squares",
            "--out",
            str(tmp_path / "samples"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples" / "0001.png").exists() and (tmp_path / "samples" / "grid.png").exists()


def test_cli_train_bad_config_exits_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "bad.yaml"
    run_dir = tmp_path / "run"
    recipe.write_text(f"run_dir: {run_dir}\nloss:\n  alpha_rew: 1.0\n  huber: 2\n")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "huber" in result.output
    assert not run_dir.exists()
    recipe.write_text(f"run_dir: {run_dir}\nloss:\n  timestep_range: [500, 100]\n")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2 and "timestep_range" in result.output
    assert not run_dir.exists()


def test_cli_train_missing_teacher_is_clear(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"run_dir: {tmp_path / 'run'}\nmodel:\n  teacher: {tmp_path / 'nope'}\nloss:\n  alpha_rew: 0\n"
        "data:\n  num_prompts: 4\n"
    )
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2  # a missing model folder is bad input, reported before loading
    assert "nope" in result.output


def test_cli_sample_needs_prompts_and_metadata(tmp_path, teacher_dir):
    result = CliRunner().invoke(app, ["sample", str(teacher_dir)])
    assert result.exit_code == 2 and "no prompts" in result.output
    result = CliRunner().invoke(app, ["sample", str(teacher_dir), "-p", "a red circle"])
    assert result.exit_code == 2 and "di_star.json" in result.output


def test_generator_init_from_existing_one_step_checkpoint(tmp_path, teacher_dir):
    from diffalign.di_star.train import _load_models

    unet = testing.tiny_unet(seed=5)  # stands in for a distilled one-step UNet (e.g. DMD2)
    unet.save_pretrained(tmp_path / "one_step_unet")
    cfg = tiny_config(
        tmp_path / "run",
        model={"teacher": str(teacher_dir), "generator_init": str(tmp_path / "one_step_unet")},
    )
    pipe, gen, fake = _load_models(cfg, "cpu")
    assert fake is None
    ref = unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in gen.state_dict().items())
    assert any(not torch.equal(v, pipe.unet.state_dict()[k]) for k, v in gen.state_dict().items())
    bad = tiny_config(
        tmp_path / "run", model={"teacher": str(teacher_dir), "generator_init": str(tmp_path / "missing")}
    )
    with pytest.raises(FileNotFoundError, match="missing"):
        _load_models(bad, "cpu")
