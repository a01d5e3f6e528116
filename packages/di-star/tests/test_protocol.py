"""The paper's two-stage protocol (reward-free one-step model, then DI* / continued SIM from it), the
starting-checkpoint checks, and the per-term gradient-norm diagnostic."""

from __future__ import annotations

import pytest
import torch
from distar_fixtures import TinyPixelReward, tiny_config

from diffalign.core import testing
from diffalign.core.models import load_unet
from diffalign.core.rewards import register_reward
from diffalign.di_star.train import DiStarTrainer, _load_models, train

register_reward("distar-test-reward", TinyPixelReward, overwrite=True)
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny-sd-v"
    testing.tiny_sd_pipeline(seed=0, prediction_type="v_prediction").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, teacher_dir):
    """A one-step reward-free (SIM-like) stage-1 run from the teacher, exported."""
    run = tmp_path_factory.mktemp("stage1")
    cfg = tiny_config(
        run, model={"teacher": str(teacher_dir)}, loss={"alpha_rew": 0.0}, training={"max_steps": 1}
    )
    return train(cfg)


def test_stage2_starts_from_the_stage1_export(tmp_path, teacher_dir, stage1):
    exported = load_unet(stage1).state_dict()
    cfg = tiny_config(tmp_path, model={"teacher": str(teacher_dir), "generator_init": str(stage1)})
    pipe, gen, fake = _load_models(cfg, "cpu")
    assert fake is None
    assert all(torch.equal(v, exported[k]) for k, v in gen.state_dict().items())
    # stage 1 trained: the start is not the teacher
    assert any(not torch.equal(v, pipe.unet.state_dict()[k]) for k, v in gen.state_dict().items())
    trainer = DiStarTrainer(cfg, pipe, TinyPixelReward(), PROMPTS, generator_unet=gen)
    got = trainer._unwrap(trainer.generator).state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in got.items())
    assert torch.isfinite(torch.tensor(trainer.train_step(0)["loss_generator"]))


def test_missing_stage1_checkpoint_is_refused_clearly(tmp_path, teacher_dir):
    cfg = tiny_config(tmp_path, model={"teacher": str(teacher_dir), "generator_init": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="stage-1"):
        _load_models(cfg, "cpu")


def test_checkpoint_of_another_architecture_is_refused(tmp_path, teacher_dir):
    testing.tiny_unet(seed=1, cross_attention_dim=16).save_pretrained(tmp_path / "other")
    for field in ("generator_init", "fake_init"):
        cfg = tiny_config(tmp_path, model={"teacher": str(teacher_dir), field: str(tmp_path / "other")})
        with pytest.raises(ValueError, match=f"model.{field}.*different architecture.*cross_attention_dim"):
            _load_models(cfg, "cpu")


def test_stage1_export_at_another_t_star_is_refused(tmp_path, teacher_dir, stage1):
    cfg = tiny_config(
        tmp_path,
        model={"teacher": str(teacher_dir), "generator_init": str(stage1)},
        generator={"t_star": 599},
    )
    with pytest.raises(ValueError, match="t\\* = 399"):
        _load_models(cfg, "cpu")


def _norms(alpha_rew):
    pipe = testing.tiny_sd_pipeline(seed=0)
    cfg = tiny_config(loss={"alpha_rew": alpha_rew}, training={"max_steps": 1, "log_grad_norms": True})
    trainer = DiStarTrainer(cfg, pipe, TinyPixelReward(), PROMPTS)
    rnd = trainer.randomness(0, "generator", 0, cfg.loss.timestep_range)
    return trainer.term_grad_norms(trainer.generator_losses(rnd)), trainer


def test_grad_norm_diagnostic_separates_reward_and_divergence():
    one, trainer = _norms(1.0)
    three, _ = _norms(3.0)
    assert one["grad_norm_reward"] > 0 and one["grad_norm_divergence"] > 0
    assert three["grad_norm_reward"] == pytest.approx(3 * one["grad_norm_reward"], rel=1e-4)
    assert three["grad_norm_divergence"] == pytest.approx(one["grad_norm_divergence"], rel=1e-4)
    logs = trainer.generator_step(0)
    assert {"grad_norm_reward", "grad_norm_divergence"} <= set(logs)
