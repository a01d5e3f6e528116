"""ECAD's schedule search with the listener-reward judge as its quality objective.

ecad never imports listener-reward: the recipe names the reward ``listener-judge`` and core's registry
finds it through the ``diffalign.rewards`` entry point that listener-reward declares. The judge is a tiny
untrained VLM (the trained shapes judge is not needed to prove the wiring); the pipeline a tiny PixArt.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def pixart_pipe():
    from diffalign.core.testing import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _recipe(run_dir, judge_source):
    from diffalign.ecad.config import EcadRecipe

    return EcadRecipe.model_validate(
        {
            "run_dir": str(run_dir),
            "model": {"source": "unused: the test passes the pipeline"},
            "sampling": {"num_inference_steps": 3, "guidance_scale": 4.5, "height": 16, "width": 16},
            "calibration": {"prompts": PROMPTS, "num_prompts": 2, "num_seeds": 1},
            "quality": {
                "reward": "listener-judge",
                "reward_kwargs": {"source": str(judge_source), "max_new_tokens": 4, "num_anchors": 2},
            },
            "search": {"population_size": 4, "generations": 2, "seed": 0, "choose_at_flop_ratios": [0.9]},
        }
    )


def test_ecad_search_scores_schedules_with_the_listener_judge(
    pixart_pipe, judge_models_dir, judge_calls, tmp_path
):
    from diffalign.core.report import to_pil
    from diffalign.core.rewards import get_reward, list_rewards
    from diffalign.ecad.hooks import apply_schedule, remove_schedule
    from diffalign.ecad.sampling import generate
    from diffalign.ecad.search import run_search
    from diffalign.listener_reward.judge import ListenerJudgeReward

    assert "listener-judge" in list_rewards()
    cfg = _recipe(tmp_path / "search", judge_models_dir / "judge")
    result = run_search(cfg, pipe=pixart_pipe, show_progress=False)  # the reward is loaded by name

    # a non-empty front of feasible cached schedules, written to disk
    assert len(result.front) >= 1
    summary = json.loads((tmp_path / "search" / "front.json").read_text())
    assert len(summary["front"]) == len(result.front)
    assert all(e["num_cached"] >= 1 and 0 < e["flop_ratio"] < 1 for e in summary["front"])

    # the judge scored every candidate (one call per evaluated schedule, on all calibration prompts), plus the
    # no-cache reference and the validation re-scoring of the front
    assert len(judge_calls) >= len(result.X) + 1 and len(result.X) >= 4
    assert all(c["prompts"] == PROMPTS for c in judge_calls)
    rewards = np.array([r["reward"] for r in result.records])
    assert np.all((rewards > 0) & (rewards < 1))  # mean win probabilities against the anchors
    judged = np.array([float(c["scores"].mean()) for c in judge_calls])
    assert all(np.abs(judged - r).min() < 1e-6 for r in rewards)  # every recorded reward is a judge score

    # each front point's quality is the judge's score of the images that schedule produces
    judge = get_reward("listener-judge", **cfg.quality.reward_kwargs)
    assert isinstance(judge, ListenerJudgeReward)
    sc = cfg.sampling
    seeds = [0] * len(PROMPTS)
    images = {}
    for schedule in result.front_schedules()[:2]:
        apply_schedule(pixart_pipe, schedule)
        try:
            images[schedule.name] = generate(
                pixart_pipe, PROMPTS, seeds, sc.num_inference_steps, sc.guidance_scale, sc.height, sc.width
            )
        finally:
            remove_schedule(pixart_pipe)
        rescored = float(judge.score(to_pil(images[schedule.name]), PROMPTS).mean())
        assert rescored == pytest.approx(schedule.metadata["reward"], abs=1e-6)

    # negative control: the same search under a constant reward reports different quality numbers
    class Constant:
        name, differentiable, input_range = "constant", False, "[-1,1]"

        def score(self, images, prompts):
            return torch.full((len(prompts),), 0.25)

    const = run_search(
        _recipe(tmp_path / "const", judge_models_dir / "judge"),
        pixart_pipe,
        reward=Constant(),
        show_progress=False,
    )
    assert {r["reward"] for r in const.records} == {0.25}
    assert not np.allclose(rewards, 0.25)
