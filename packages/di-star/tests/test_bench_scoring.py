"""The benchmark scores faithfulness with the evaluation-only verifier, reports the training reward's
verifier beside it, compares the two for reward hacking, and aggregates training seeds."""

from __future__ import annotations

import pytest
import torch

from diffalign.di_star import bench


class _Reward:
    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _scores(overall):
    return {"overall": overall, "per_skill": {"color": overall}, "fid": 10.0}


def test_row_faithfulness_comes_from_the_evaluation_verifier(monkeypatch):
    import diffalign.core.shapes as shapes

    seen = []

    class _Result:
        def as_dict(self):
            return {"overall": 0.25, "per_skill": {"color": 0.25}}

    def fake_faithfulness(images, prompts, verifier=None):
        seen.append(verifier)
        return _Result()

    monkeypatch.setattr(shapes, "faithfulness", fake_faithfulness)
    sentinel = object()
    images = torch.zeros(2, 3, 32, 32)
    row = bench._with_reward_and_diversity(_scores(0.9), images, ["a", "b"], _Reward(), None, sentinel)
    assert seen == [sentinel]
    assert row["faithfulness"] == 0.25 and row["faithfulness_train_verifier"] == 0.9
    assert row["per_skill"] == {"color": 0.25} and row["per_skill_train_verifier"] == {"color": 0.9}


def _row(eval_f, train_f, reward=0.5, diversity=1.0):
    return {
        "faithfulness": eval_f,
        "faithfulness_train_verifier": train_f,
        "reward": reward,
        "diversity": diversity,
        "fid": 100.0,
    }


def test_hacking_check_compares_the_two_verifiers():
    init = _row(0.5, 0.5)
    honest = bench.reward_hacking_check(_row(0.7, 0.72), init)
    assert not honest["suspected"]
    assert honest["faithfulness_gain_vs_init"] == pytest.approx(0.2)
    assert honest["train_verifier_faithfulness_gain_vs_init"] == pytest.approx(0.22)
    # the training verifier is fooled, the evaluation verifier barely moves; the reward is flat
    hacked = bench.reward_hacking_check(_row(0.52, 0.8), init)
    assert hacked["suspected"] and hacked["verifier_gap"] == pytest.approx(0.28)


def test_seed_rows_carry_mean_spread_and_values():
    rows = [dict(_row(f, f + 0.1), seed=s, per_skill={"color": f}) for s, f in enumerate((0.5, 0.6, 0.7))]
    out = bench.aggregate_seeds(rows)
    assert out["faithfulness"] == pytest.approx(0.6) and out["faithfulness_std"] == pytest.approx(0.1)
    assert out["faithfulness_train_verifier"] == pytest.approx(0.7)
    assert out["per_skill"]["color"] == pytest.approx(0.6)
    assert out["n_seeds"] == 3 and [r["seed"] for r in out["per_seed"]] == [0, 1, 2]
    assert bench.aggregate_seeds(rows[:1])["faithfulness_std"] == 0.0


def test_bench_defaults_follow_the_measurements():
    assert bench.SHAPES_RECIPE["generator"]["t_star"] == 599
    assert bench.SHAPES_RECIPE["loss"]["alpha_rew"] == 5.0
    assert bench.SHAPES_RECIPE["generator"]["optimizer"]["lr"] == 1e-4
