"""Every shipped recipe validates; the paper recipe carries the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffalign.core.config import ConfigError, load_config
from diffalign.di_star.config import RECIPE_CONFIG, DiStarConfig

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    cfg = load_config(DiStarConfig, path)
    assert cfg.generator.t_star == (599 if path.name.startswith("shapes") else 399)


def _recipe(name):
    return load_config(DiStarConfig, Path(__file__).parents[1] / "recipes" / name)


def test_shapes_recipe_carries_the_measured_defaults():
    cfg = _recipe("shapes_unet.yaml")
    assert cfg.generator.t_star == 599 and cfg.loss.alpha_rew == 5.0
    assert cfg.generator.optimizer.lr == 1e-4 and cfg.fake_score.optimizer.lr == 1e-4


def test_two_stage_protocol_recipes():
    stage1 = _recipe("shapes_stage1_sim.yaml")
    di, sim = _recipe("shapes_stage2_di_star.yaml"), _recipe("shapes_stage2_sim.yaml")
    assert stage1.loss.alpha_rew == 0 and stage1.model.generator_init is None
    assert di.loss.alpha_rew == 5.0 and sim.loss.alpha_rew == 0
    for cfg in (di, sim):
        assert Path(cfg.model.generator_init) == stage1.run_dir / "generator"
        assert cfg.generator.t_star == stage1.generator.t_star
    # same checkpoint, same budget: the two stage-2 recipes differ only in the reward weight and run_dir
    a, b = di.model_dump(mode="json"), sim.model_dump(mode="json")
    for d in (a, b):
        d.pop("run_dir"), d["loss"].pop("alpha_rew")
    assert a == b and di.run_dir != sim.run_dir


def test_paper_recipe_settings():
    cfg = load_config(DiStarConfig, Path(__file__).parents[1] / "recipes" / "sdxl_paper.yaml")
    assert (cfg.loss.alpha_rew, cfg.loss.cfg_scale, cfg.loss.cfg_mode) == (100.0, 7.5, "in")
    assert cfg.loss.distance == "pseudo_huber" and cfg.loss.regulariser == "score"
    assert cfg.generator.optimizer.lr == 5e-7 and cfg.fake_score.updates_per_generator_step == 5
    assert cfg.generator.optimizer.max_grad_norm == 10.0


def test_bad_values_are_rejected_with_the_key():
    assert RECIPE_CONFIG is DiStarConfig
    with pytest.raises(ConfigError, match="cfg_mode"):
        load_config(DiStarConfig, overrides=["loss.cfg_mode=inside"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(DiStarConfig, overrides=["launch.gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config(DiStarConfig, overrides=["loss.regulariser=none", "loss.alpha_rew=0"])
