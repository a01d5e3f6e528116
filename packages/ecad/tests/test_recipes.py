from pathlib import Path

import pytest

from diffalign.core.config import ConfigError, load_config
from diffalign.ecad.config import RECIPE_CONFIG

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {
        "shapes_dit.yaml",
        "pixart_alpha_256.yaml",
        "pixart_sigma_256.yaml",
        "flux_dev_256.yaml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    cfg = load_config(RECIPE_CONFIG, path)
    assert cfg.search.crossover_points == 4 and cfg.search.mutation_prob == 0.05
    assert cfg.sampling.num_inference_steps == 20


def test_unknown_key_and_bad_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="populaton_size"):
        load_config(RECIPE_CONFIG, RECIPES[0], ["search.populaton_size=3"])
    with pytest.raises(ConfigError):
        load_config(RECIPE_CONFIG, RECIPES[0], ["search.population_size=1"])
    p = tmp_path / "r.yaml"
    p.write_text("calibration:\n  prompts: [a]\n  prompt_file: x.txt\n")
    with pytest.raises(ConfigError, match="either"):
        load_config(RECIPE_CONFIG, p)
