"""SELMA experts trained on self-generated images filtered by the listener-reward judge, then evaluated
with the judge as a registered reward.

selma never imports listener-reward: the recipe names ``listener-judge`` (images stage: reward filter
with factory kwargs; eval stage: by name only, so the default ``shapes/judge`` resolves through
``DIFFALIGN_LISTENER_SHAPES_DIR``). The judge is a tiny untrained VLM, the base model a tiny SD pipeline.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

SKILLS = ("count", "color")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from diffalign.core.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


def _config(tmp_path, model_dir, judge_dir, threshold: float):
    from diffalign.selma.config import SelmaConfig

    return SelmaConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "seed": 0,
            "model": str(model_dir),
            "skills": [{"name": s, "max_words": 12} for s in SKILLS],
            "prompts": {"backend": "template", "n_per_skill": 3},
            "images": {
                "num_inference_steps": 2,
                "batch_size": 3,
                "reward_filter": {
                    "enabled": True,
                    "reward": "listener-judge",
                    "threshold": threshold,
                    "kwargs": {"source": str(judge_dir), "max_new_tokens": 4},
                },
            },
            "train": {"rank": 4, "alpha": 4, "steps": 2, "checkpoint_every": 2, "batch_size": 2},
            "eval": {
                "n_per_skill": 1,
                "faithfulness": "none",
                "rewards": ["listener-judge"],
                "models": ["base", "experts"],
                "num_inference_steps": 2,
                "batch_size": 4,
                "save_grids": False,
            },
        }
    )


def _metadata(cfg) -> list[dict]:
    lines = cfg.path("images", "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_selma_experts_filtered_and_evaluated_by_the_listener_judge(
    tmp_path, tiny_model_dir, judge_models_dir, judge_calls, monkeypatch
):
    from diffalign.core.rewards import get_reward
    from diffalign.selma.stages import stage_eval, stage_images, stage_prompts, stage_train

    monkeypatch.setenv("DIFFALIGN_LISTENER_SHAPES_DIR", str(judge_models_dir))
    quiet = lambda *args, **kwargs: None  # noqa: E731
    judge_dir = judge_models_dir / "judge"

    # images stage with a threshold every image passes: the judge scores all six images
    cfg = _config(tmp_path, tiny_model_dir, judge_dir, threshold=-1.0)
    stage_prompts(cfg, log=quiet)
    stage_images(cfg, log=quiet)
    everything = _metadata(cfg)
    assert len(everything) == 6 and sorted({r["skill"] for r in everything}) == sorted(SKILLS)
    assert sum(c["n"] for c in judge_calls) == 6
    # the recorded rewards are the judge's scores of the saved (lossless PNG) images
    judge = get_reward("listener-judge", source=str(judge_dir), max_new_tokens=4)
    images = [Image.open(cfg.path("images", r["file_name"])).convert("RGB") for r in everything]
    rescored = judge.score(images, [r["text"] for r in everything]).tolist()
    assert [r["reward"] for r in everything] == pytest.approx(rescored, abs=1e-6)
    rewards = [r["reward"] for r in everything]
    assert all(0 < x < 1 for x in rewards) and len(set(rewards)) > 1

    # rerun the stage with a threshold that keeps each skill's best image but not every image: the images
    # are not generated again, the filter is applied to the judged records
    threshold = min(max(r["reward"] for r in everything if r["skill"] == s) for s in SKILLS)
    judge_calls.clear()
    cfg = _config(tmp_path, tiny_model_dir, judge_dir, threshold=threshold)
    stage_images(cfg, log=quiet)
    assert judge_calls == []
    kept = _metadata(cfg)
    expected = [r for r in everything if r["reward"] >= threshold]
    assert [r["index"] for r in kept] == [r["index"] for r in expected]
    assert 2 <= len(kept) < len(everything)

    # one expert per skill, trained on the kept images only
    outs = stage_train(cfg, log=quiet)
    assert len(outs) == len(SKILLS)
    for skill in SKILLS:
        meta = json.loads(cfg.path("experts", skill, "selma_adapter.json").read_text(encoding="utf-8"))
        assert meta["skill"] == skill and meta["complete"]
        assert meta["num_images"] == sum(r["skill"] == skill for r in kept)

    # evaluation: the judge (found by name, default shapes/judge) scores base and both experts
    judge_calls.clear()
    results = stage_eval(cfg, log=quiet)
    assert set(results) == {"base", "expert:count", "expert:color"}
    assert len(judge_calls) == 3 and all(c["n"] == 2 for c in judge_calls)
    for model, call in zip(("base", "expert:count", "expert:color"), judge_calls):
        scores = results[model]["rewards"]["listener-judge"]
        assert set(scores["per_skill"]) == set(SKILLS)
        assert scores["mean"] == pytest.approx(float(call["scores"].mean()), abs=1e-6)
    saved = json.loads(cfg.path("eval", "results.json").read_text(encoding="utf-8"))
    assert saved["models"]["expert:count"]["rewards"]["listener-judge"]["mean"] == pytest.approx(
        results["expert:count"]["rewards"]["listener-judge"]["mean"]
    )
