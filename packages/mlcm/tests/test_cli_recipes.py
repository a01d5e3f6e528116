from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffalign.core.config import load_config
from diffalign.mlcm.cli import app
from diffalign.mlcm.config import MLCMRecipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_validate(recipe):
    cfg = load_config(MLCMRecipe, recipe)
    assert cfg.stage1.num_segments == 8 and cfg.stage1.skip == 20 and cfg.stage2.teacher_substeps == 3
    if recipe.name.startswith(("sd15", "sdxl")):
        assert cfg.student.lora_rank == 64 and cfg.distill.guidance_scale == 8.0
        assert (cfg.stage1.iterations, cfg.stage1.lr, cfg.stage2.iterations, cfg.stage2.lr) == (
            12000,
            1e-4,
            2000,
            1e-5,
        )
        assert cfg.reward.iterations == 500


def test_distill_bad_config_exits_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "r.yaml"
    run_dir = tmp_path / "run"
    recipe.write_text(f"run_dir: {run_dir}\nmodel:\n  source: shapes/unet\nstage1:\n  skip: 0\n")
    result = CliRunner().invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2
    assert "skip" in result.output
    assert not run_dir.exists()


def test_distill_missing_model_exits_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nmodel:\n  source: {tmp_path / 'nope'}\n")
    result = CliRunner().invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2 and "not found" in result.output


def test_sample_requires_prompts(tmp_path):
    result = CliRunner().invoke(app, ["sample", "--student", str(tmp_path)])
    assert result.exit_code == 2 and "prompt" in result.output
