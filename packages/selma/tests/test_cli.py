import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffalign.selma.cli import app


class _Brightness:
    name, differentiable, input_range = "selma-test-brightness", False, "[-1,1]"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from diffalign.core.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(path)
    return path


def _recipe(tmp_path, model, **over):
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": str(model),
        "skills": [{"name": "count", "max_words": 12}, {"name": "color", "max_words": 12}],
        "prompts": {"backend": "template", "n_per_skill": 3},
        "images": {"num_inference_steps": 2, "batch_size": 3},
        "train": {
            "rank": 4,
            "alpha": 4,
            "steps": 2,
            "checkpoint_every": 1,
            "batch_size": 2,
            "mixed_steps": 2,
        },
        "merge": {"method": "linear", "export": "both"},
        "eval": {
            "n_per_skill": 2,
            "faithfulness": "none",
            "rewards": ["selma-test-brightness"],
            "models": ["base", "experts", "mixed", "merged"],
            "num_inference_steps": 2,
            "save_grids": False,
        },
    }
    cfg.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_error_exits_2_and_writes_nothing(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, bogus=1)
    res = CliRunner().invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2 and "bogus" in res.output
    assert not (tmp_path / "run").exists()
    recipe = _recipe(tmp_path, tiny_model_dir)
    res = CliRunner().invoke(app, ["train", str(recipe), "--set", "train.rank=0"])
    assert res.exit_code == 2 and not (tmp_path / "run").exists()
    res = CliRunner().invoke(app, ["merge", str(recipe), "--set", "merge.method=svd"])
    assert res.exit_code == 2 and "svd_rank" in res.output


def test_run_all_stages_then_resume_is_a_no_op(tmp_path, tiny_model_dir):
    from diffalign.core.rewards import register_reward

    register_reward("selma-test-brightness", lambda **kw: _Brightness(), overwrite=True)
    recipe = _recipe(tmp_path, tiny_model_dir)
    res = CliRunner().invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    assert (run / "config.yaml").exists()
    for skill in ("count", "color"):
        assert len((run / "prompts" / f"{skill}.jsonl").read_text().splitlines()) == 3
        assert (run / "experts" / skill / "pytorch_lora_weights.safetensors").exists()
    assert len((run / "images" / "metadata.jsonl").read_text().splitlines()) == 6
    assert (run / "experts" / "_mixed" / "pytorch_lora_weights.safetensors").exists()
    merged = json.loads((run / "merged" / "linear" / "merge.json").read_text())
    assert merged["weights"] == [0.5, 0.5] and merged["lora"]["relative_error"] < 1e-5
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert set(results) == {"base", "expert:count", "expert:color", "mixed", "merged:linear"}
    assert set(results["base"]["rewards"]["selma-test-brightness"]["per_skill"]) == {"count", "color"}
    # the fused pipeline on disk samples like the in-memory merge
    from diffusers import StableDiffusionPipeline

    fused = StableDiffusionPipeline.from_pretrained(run / "merged" / "linear" / "pipeline")
    fused.set_progress_bar_config(disable=True)
    from diffalign.core.config import load_config
    from diffalign.selma.config import SelmaConfig
    from diffalign.selma.stages import build_model

    cfg = load_config(SelmaConfig, recipe)
    mem = build_model(cfg, "merged:linear")
    kw = dict(num_inference_steps=2, output_type="pt")
    a = fused(prompt="two red circles", generator=torch.Generator().manual_seed(0), **kw).images
    b = mem(prompt="two red circles", generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the mixed LoRA at the merge's update size: its fused weight change has the merge's Frobenius norm
    from diffalign.core.models import network_of
    from diffalign.selma.lora import load_adapter

    base_sd = {k: v.double() for k, v in network_of(build_model(cfg, "base")).state_dict().items()}

    def change(pipe) -> float:
        sd = network_of(pipe).state_dict()
        return sum(float((sd[k].double() - v).pow(2).sum()) for k, v in base_sd.items()) ** 0.5

    merged_norm = change(mem)
    assert change(build_model(cfg, "mixed:matched:linear")) == pytest.approx(merged_norm, rel=1e-2)
    mixed_norm = sum(
        float(d.pow(2).sum()) for d in load_adapter(run / "experts" / "_mixed").deltas().values()
    )
    assert mixed_norm**0.5 != pytest.approx(merged_norm, rel=0.05)  # unscaled, the sizes differ
    # rerunning resumes everything from disk (no new checkpoints, same results)
    before = sorted(p.name for p in (run / "experts" / "count" / "checkpoints").iterdir())
    res = CliRunner().invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "already holds a finished adapter" in res.output
    assert sorted(p.name for p in (run / "experts" / "count" / "checkpoints").iterdir()) == before
    # merging experts of another base is refused with a clear message
    meta_path = run / "experts" / "color" / "selma_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"] = "some/other-model"
    meta_path.write_text(json.dumps(meta))
    res = CliRunner().invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 1 and "different base models" in res.output


def test_every_shipped_recipe_validates():
    from pathlib import Path

    from diffalign.core.config import load_config
    from diffalign.selma.config import SelmaConfig

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"shapes_unet", "sd14", "sd2", "sdxl"}
    for path in recipes:
        cfg = load_config(SelmaConfig, path)
        if path.stem.startswith("sd"):
            assert (cfg.train.rank, cfg.train.alpha, cfg.train.lr) == (128, 128.0, 3e-4)
            assert (
                cfg.train.targets == ["to_q", "to_k", "to_v", "to_out.0"]
                and cfg.train.lr_scheduler == "constant"
            )
            assert cfg.prompts.rouge_threshold == 0.8 and cfg.merge.weights is None


def test_eval_reward_kwargs_reach_the_reward_factory(tmp_path, tiny_model_dir):
    from diffalign.core.config import load_config
    from diffalign.core.rewards import register_reward
    from diffalign.selma.config import SelmaConfig
    from diffalign.selma.stages import stage_eval

    seen = {}

    class _Stop(Exception):
        pass

    def factory(**kwargs):
        seen.update(kwargs)
        raise _Stop

    register_reward("selma-test-kwargs", factory, overwrite=True)
    recipe = _recipe(tmp_path, tiny_model_dir)
    cfg = load_config(
        SelmaConfig,
        recipe,
        ["eval.rewards=[selma-test-kwargs]", "eval.reward_kwargs={selma-test-kwargs: {threshold: 0.5}}"],
    )
    with pytest.raises(_Stop):
        stage_eval(cfg)
    assert seen == {"threshold": 0.5}
    res = CliRunner().invoke(app, ["eval", str(recipe), "--set", "eval.reward_kwargs={not-listed: {a: 1}}"])
    assert res.exit_code == 2 and "not-listed" in res.output
