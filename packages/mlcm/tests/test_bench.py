"""The benchmark's seed aggregation: differences, spreads and targets against hand-computed values."""

import pytest

from diffalign.mlcm import bench
from diffalign.mlcm.bench import aggregate, differences, shapes_recipe
from diffalign.mlcm.study import seed_from_parent


def fake_report(seed, teacher50, mlcm, lcm):
    """``mlcm`` / ``lcm``: {(sampler, steps): faithfulness}."""
    rows = [{"method": "teacher-ddim", "sampler": "ddim", "steps": 50, "faithfulness": teacher50, "fid": 1.0}]
    for method, table in (("mlcm", mlcm), ("lcm-single-segment", lcm)):
        for (sampler, steps), value in table.items():
            rows.append(
                {"method": method, "sampler": sampler, "steps": steps, "faithfulness": value, "fid": 2.0}
            )
    return {"seed": seed, "results": rows}


def table(d2, d4, r2, r4):
    return {("deterministic", 2): d2, ("deterministic", 4): d4, ("renoise", 2): r2, ("renoise", 4): r4}


REPORTS = [
    # seed 0: MLCM loses at 2 steps (deterministic), wins at 4
    fake_report(0, 0.90, table(0.62, 0.87, 0.60, 0.84), table(0.73, 0.76, 0.70, 0.72)),
    # seed 1: MLCM wins at 2 steps by 0.02
    fake_report(1, 0.80, table(0.75, 0.78, 0.50, 0.70), table(0.73, 0.70, 0.55, 0.71)),
]


def test_differences_pair_the_same_sampler_and_seed():
    diff = differences(REPORTS)
    d2 = diff["mlcm2_minus_lcm2 (deterministic)"]
    assert d2["seed0"] == pytest.approx(0.62 - 0.73) and d2["seed1"] == pytest.approx(0.75 - 0.73)
    assert d2["mean"] == pytest.approx(((0.62 - 0.73) + (0.75 - 0.73)) / 2, abs=1e-4)
    assert d2["min"] == pytest.approx(-0.11) and d2["max"] == pytest.approx(0.02)
    assert d2["std"] == pytest.approx(abs(-0.11 - 0.02) / 2**0.5, abs=1e-4)  # sample std of two values
    assert d2["holds_on_every_seed"] is False
    ratio = diff["mlcm4_over_teacher50 (renoise)"]
    assert ratio["seed0"] == pytest.approx(0.84 / 0.90, abs=1e-4)
    assert ratio["seed1"] == pytest.approx(0.70 / 0.80, abs=1e-4)
    assert ratio["holds_on_every_seed"] is False  # 0.933 and 0.875 are both under 0.95
    d4 = diff["mlcm4_minus_lcm4 (deterministic)"]
    assert d4["seed0"] == pytest.approx(0.11) and d4["seed1"] == pytest.approx(0.08)
    assert d4["holds_on_every_seed"] is True
    # each sampler is paired with itself (the best-of-two would give 0.62 - 0.73 here too, not -0.10)
    assert diff["mlcm2_minus_lcm2 (renoise)"]["seed0"] == pytest.approx(0.60 - 0.70)


def test_aggregate_rows_carry_mean_spread_and_every_seed():
    rows = {(r["method"], r["sampler"], r["steps"]): r for r in aggregate(REPORTS)}
    row = rows[("mlcm", "deterministic", 2)]
    assert row["faithfulness"] == pytest.approx((0.62 + 0.75) / 2)
    assert (row["min"], row["max"], row["seed0"], row["seed1"]) == (0.62, 0.75, 0.62, 0.75)
    assert rows[("teacher-ddim", "ddim", 50)]["faithfulness"] == pytest.approx(0.85)
    assert len(rows) == 9


def test_recipe_seed_and_overrides_reach_the_recipe(tmp_path):
    cfg = shapes_recipe("shapes/unet", tmp_path, False, seed=2, overrides={"stage2": {"lr": 1e-4}})
    assert cfg.seed == 2 and cfg.stage2.lr == 1e-4
    assert cfg.stage2.iterations == bench.STAGE2_ITERATIONS  # merged into the section (default: 2000)
    lcm = shapes_recipe("shapes/unet", tmp_path, False, single_segment=True, iterations=(200, 60))
    assert (lcm.stage1.iterations, lcm.stage1.num_segments, lcm.stage2.iterations) == (260, 1, 0)


def test_seed_from_parent_copies_the_last_checkpoint_once(tmp_path):
    parent, child = tmp_path / "parent", tmp_path / "child"
    (parent / "checkpoints").mkdir(parents=True)
    for step, text in ((100, "old"), (200, "new")):
        (parent / "checkpoints" / f"step_{step:08d}.pt").write_text(text)
    seed_from_parent(child, parent)
    assert [p.name for p in (child / "checkpoints").iterdir()] == ["step_00000200.pt"]
    assert (child / "checkpoints" / "step_00000200.pt").read_text() == "new"
    (parent / "checkpoints" / "step_00000300.pt").write_text("newer")
    seed_from_parent(child, parent)  # the child has its own checkpoint now: left alone
    assert sorted(p.name for p in (child / "checkpoints").iterdir()) == ["step_00000200.pt"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        seed_from_parent(tmp_path / "other", tmp_path / "empty")


def test_run_aggregates_every_seed_into_one_report(tmp_path, monkeypatch):
    import argparse
    import json

    reports = {r["seed"]: r for r in REPORTS}
    for r in REPORTS:
        r.setdefault("evaluation", {"n_prompts": 100, "noise_seed": r["seed"]})
        r.setdefault("training", {"mlcm": {"iterations": 350}, "lcm-single-segment": {"iterations": 350}})
    monkeypatch.setattr(bench, "run_seed", lambda args, seed: reports[seed])
    out = tmp_path / "mlcm.json"
    args = argparse.Namespace(
        seeds=[0, 1],
        model="shapes/unet",
        out=str(out),
        quick=False,
        skip_toy=True,
        argv=["--seeds", "0", "1"],
    )
    report = bench.run(args)
    saved = json.loads(out.read_text())
    assert saved["differences"] == report["differences"]
    assert saved["seeds"] == "0 1" and set(saved["training"]) == {
        "mlcm seed0", "lcm-single-segment seed0", "mlcm seed1", "lcm-single-segment seed1"
    }  # fmt: skip
    # best-of-two samplers per seed: seed 0 loses at 2 steps (0.62 < 0.73), so not on every seed
    assert saved["targets"]["beats_lcm_at_2_on_every_seed"] is False
    assert saved["targets"]["beats_lcm_at_4_on_every_seed"] is True
    assert saved["targets"]["student4_over_teacher50"] == pytest.approx(
        (0.87 / 0.90 + 0.78 / 0.80) / 2, abs=1e-4
    )
