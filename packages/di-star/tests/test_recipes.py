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
    assert cfg.generator.t_star == 399


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
