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


# ----------------------------------------------------------------------------- the two-stage protocol's summary


def _seeded(seed, eval_f, fid=100.0, train_f=None):
    return dict(_row(eval_f, eval_f if train_f is None else train_f), fid=fid, seed=seed)


def test_paired_differences_match_a_hand_computation():
    a = [_seeded(0, 0.70), _seeded(1, 0.60), _seeded(2, 0.65)]
    b = [_seeded(0, 0.60), _seeded(1, 0.62), _seeded(2, 0.55)]
    out = bench.paired_differences(a, b)
    diffs = [0.10, -0.02, 0.10]
    mean = sum(diffs) / 3
    std = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5  # sample (n - 1) standard deviation
    assert out["per_seed"] == pytest.approx(diffs)
    assert out["mean"] == pytest.approx(mean) and out["std"] == pytest.approx(std)
    assert (out["min"], out["max"], out["n_positive"], out["n"]) == (
        pytest.approx(-0.02),
        pytest.approx(0.1),
        2,
        3,
    )
    # one reference row (a teacher) is subtracted from every seed
    teacher = _row(0.65, 0.65)
    assert bench.paired_differences(a, teacher)["per_seed"] == pytest.approx([0.05, -0.05, 0.0])
    # rows of different seeds are not a pair
    with pytest.raises(ValueError, match="not a pair"):
        bench.paired_differences(a, list(reversed(b)))
    with pytest.raises(ValueError, match="cannot pair"):
        bench.paired_differences(a, b[:2])


def _protocol_rows(di, sim, st1, t4=0.62, t50=0.70, fids=(120.0, 150.0, 100.0)):
    rows = {"teacher_4step": _row(t4, t4), "teacher_50step": dict(_row(t50, t50), fid=fids[2])}
    rows["init_one_step"] = _row(0.5, 0.5)
    for s in range(len(di)):
        rows[f"stage1_seed{s}"] = _seeded(s, st1[s])
        rows[f"di_star_seed{s}"] = _seeded(s, di[s], fid=fids[0])
        rows[f"sim_seed{s}"] = _seeded(s, sim[s], fid=fids[1])
    return rows


def test_summary_targets_follow_the_paired_differences():
    rows = _protocol_rows(di=[0.75, 0.72, 0.74], sim=[0.66, 0.65, 0.70], st1=[0.64, 0.63, 0.69])
    table, comp, targets = bench.summarise(rows, [0, 1, 2])
    assert (
        table["di_star"]["faithfulness"] == pytest.approx((0.75 + 0.72 + 0.74) / 3)
        and table["di_star"]["n_seeds"] == 3
    )
    assert comp["di_star_minus_sim"]["mean"] == pytest.approx((0.09 + 0.07 + 0.04) / 3)
    assert comp["sim_minus_stage1"]["per_seed"] == pytest.approx([0.02, 0.02, 0.01])
    assert comp["fid_ratio_di_star_to_teacher_50step"]["mean"] == pytest.approx(1.2)
    assert targets["di_star_gt_sim"] and targets["di_star_gt_sim_every_seed"]
    assert targets["sim_gt_stage1"] and targets["di_star_ge_teacher_4step"]
    assert targets["di_star_fid_within_1.5x_teacher_50step"]
    assert targets["stretch_di_star_ge_teacher_50step"]  # 0.737 >= 0.70
    assert targets["seeds_compared"] == 3


def test_summary_targets_fail_where_the_method_loses():
    # DI* below SIM on average, one seed below the 4-step teacher, FID 1.6x the teacher's
    rows = _protocol_rows(
        di=[0.60, 0.70, 0.61], sim=[0.66, 0.65, 0.70], st1=[0.67, 0.60, 0.69], fids=(160.0, 150.0, 100.0)
    )
    _, comp, targets = bench.summarise(rows, [0, 1, 2])
    assert not targets["di_star_gt_sim"] and not targets["di_star_gt_sim_every_seed"]
    assert not targets["sim_gt_stage1_every_seed"]
    assert not targets["di_star_ge_teacher_4step_every_seed"]
    assert not targets["di_star_fid_within_1.5x_teacher_50step"]
    # a seed not yet scored in stage 2 is left out of every comparison
    del rows["sim_seed2"]
    table, comp, targets = bench.summarise(rows, [0, 1, 2])
    assert comp["di_star_minus_sim"]["n"] == 2 and targets["seeds_compared"] == 2
    assert table["sim"]["n_seeds"] == 2 and table["di_star"]["n_seeds"] == 3


def test_alpha_sweep_reuses_the_stage2_rows_and_plots(tmp_path):
    assert bench.alpha_row_name(0.0, 0) == "sim_seed0"
    assert bench.alpha_row_name(bench.SHAPES_RECIPE["loss"]["alpha_rew"], 0) == "di_star_seed0"
    assert bench.alpha_row_name(20.0, 0) == "alpha20_seed0"
    rows = _protocol_rows(di=[0.75], sim=[0.66], st1=[0.64])
    rows["alpha20_seed0"] = _seeded(0, 0.55, fid=300.0, train_f=0.80)  # training verifier fooled
    sweep = bench.alpha_sweep_result(rows, [0.0, 5.0, 20.0, 100.0], 0)
    assert [e["alpha_rew"] for e in sweep.values() if e["alpha_rew"] is not None] == [0.0, 5.0, 20.0]
    assert sweep["alpha_rew 5"]["faithfulness"] == 0.75 and sweep["stage 1 (start)"]["faithfulness"] == 0.64
    assert sweep["alpha_rew 20"]["hacking_suspected"] and not sweep["alpha_rew 5"]["hacking_suspected"]
    text = bench.headline({"rows": sweep})
    assert "| alpha_rew 20 |  | 0.550 | 0.800 | 300.0 |" in text and "| stage 1 (start) |" in text
    png = bench.plot_alpha_sweep(sweep, tmp_path / "sweep.png", 0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scored_rows_refuse_a_work_dir_of_other_settings(tmp_path):
    rows = bench.ScoredRows(tmp_path, {"stage1_steps": 120})
    rows.add("stage1_seed0", {"faithfulness": 0.6})
    again = bench.ScoredRows(tmp_path, {"stage1_steps": 120})
    assert "stage1_seed0" in again and again.rows["stage1_seed0"]["faithfulness"] == 0.6
    before = (tmp_path / "rows.json").read_text()
    with pytest.raises(SystemExit, match="stage1_steps"):
        bench.ScoredRows(tmp_path, {"stage1_steps": 60})
    assert (tmp_path / "rows.json").read_text() == before


def test_headline_prints_means_spreads_and_targets(tmp_path, capsys):
    rows = _protocol_rows(di=[0.75, 0.72, 0.74], sim=[0.66, 0.65, 0.70], st1=[0.64, 0.63, 0.69])
    table, comp, targets = bench.summarise(rows, [0, 1, 2])
    result = {"rows": table, "comparisons": comp, "target": targets}
    text = bench.headline(result)
    di_line = next(line for line in text.splitlines() if line.startswith("| stage 2: DI*"))
    assert "0.737 ± 0.015" in di_line and "| 3 |" in di_line
    assert "+0.090, +0.070, +0.040" in text and "- di_star_gt_sim: True" in text
    path = tmp_path / "r.json"
    path.write_text(__import__("json").dumps(result))
    bench.main(["--print", str(path)])
    assert capsys.readouterr().out == text


def _drop(d, paths):
    for path in paths:
        node = d
        *head, last = path.split(".")
        for key in head:
            node = node[key]
        node.pop(last)
    return d


def test_bench_trains_what_the_protocol_recipes_ship():
    """The benchmark's stage 1 / stage 2 configs equal the shipped recipes except for the budget, the run
    folders and the checkpoint cadence, so its numbers describe those recipes."""
    import json
    from pathlib import Path

    from diffalign.core.config import load_config
    from diffalign.di_star.config import DiStarConfig

    recipes = Path(__file__).parents[1] / "recipes"
    free = ["run_dir", "model.generator_init", "training.max_steps", "training.checkpoint_every"]
    free += ["training.keep_last", "training.log_every", "training.log_grad_norms"]
    for recipe, loss in (
        ("shapes_stage1_sim.yaml", bench.STAGE1_LOSS),
        ("shapes_stage2_di_star.yaml", bench.STAGE2_VARIANTS["di_star"]),
        ("shapes_stage2_sim.yaml", bench.STAGE2_VARIANTS["sim"]),
    ):
        shipped = load_config(DiStarConfig, recipes / recipe).model_dump(mode="json")
        ours = DiStarConfig.model_validate(bench._merge(bench.SHAPES_RECIPE, {"loss": loss}))
        a, b = _drop(shipped, free), _drop(ours.model_dump(mode="json"), free)
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), recipe


@pytest.mark.slow
def test_quick_benchmark_end_to_end_and_resume(tmp_path):
    """The whole protocol at one step per stage: every row, the sweep files, and a rerun that re-scores
    nothing; a rerun with another budget is refused."""
    import json

    out, work = tmp_path / "r" / "di-star.json", tmp_path / "work"
    argv = ["--quick", "--stage1-steps", "1", "--stage2-steps", "1", "--alphas", "0", "5", "20"]
    argv += ["--n-per-skill", "1", "--out", str(out), "--work-dir", str(work)]
    bench.main(argv)
    result = json.loads(out.read_text())
    assert result["complete"] and result["target"]["seeds_compared"] == 1
    assert {"teacher_1step", "teacher_4step", "init_one_step", "stage1", "di_star", "sim"} <= set(
        result["rows"]
    )
    assert result["rows"]["di_star"]["per_seed"][0]["alpha_rew"] == 5.0
    sweep = json.loads((out.parent / "di-star-alpha.json").read_text())["rows"]
    assert [e["alpha_rew"] for e in sweep.values() if e["alpha_rew"] is not None] == [0.0, 5.0, 20.0]
    assert (out.parent / "di-star-alpha.png").stat().st_size > 0
    scored = (work / "rows.json").read_text()
    bench.main(argv)
    assert (work / "rows.json").read_text() == scored
    with pytest.raises(SystemExit, match="stage2_steps"):
        bench.main([*argv[:4], "2", *argv[5:]])
