"""The benchmark's scale stage and its bookkeeping, at a width small enough for a unit test."""

import json

import pytest


def test_scale_stage_records_its_command_and_keeps_other_sections(tmp_path):
    from diffalign.ecad import bench

    out = tmp_path / "ecad.json"
    out.write_text(json.dumps({"quality": {"rows": {"no_cache": {"faithfulness": 0.9}}}}))
    argv = [
        "--out",
        str(out),
        "--stage",
        "scale",
        "--scale-width",
        "72",
        "--scale-steps",
        "3",
        "--repeats",
        "1",
    ]
    bench.main(argv)
    report = json.loads(out.read_text())
    assert report["commands"]["scale"] == "python -m diffalign.ecad.bench " + " ".join(argv)
    assert report["quality"]["rows"]["no_cache"]["faithfulness"] == 0.9
    scale = report["timing"]["scale"]
    assert "28 x (1 heads x 72)" in scale["config"]
    rows = scale["rows"]
    assert rows["no_cache"]["flop_ratio"] == 1.0
    # FORA-2 recomputes every block on 2 of 3 steps (steps 0 and 2), FORA-3 on 1 of 3 (step 0), the caption
    # K/V once: both strictly cheaper than the K/V-cached pipeline that recomputes everything
    assert rows["fora_every_3+kv"]["flop_ratio"] < rows["fora_every_2+kv"]["flop_ratio"]
    assert rows["fora_every_2+kv"]["flop_ratio"] < rows["no_cache+kv"]["flop_ratio"] < 1.0
    for r in rows.values():
        assert r["flop_speedup"] == pytest.approx(1 / r["flop_ratio"])
        assert r["cpu_s_median"] > 0


def test_scale_row_rejects_a_width_that_is_not_whole_heads():
    from diffalign.ecad.bench_rows import scale_row

    with pytest.raises(ValueError, match="multiple of the head size 72"):
        scale_row(repeats=1, steps=1, width=100)


def test_comparison_reports_the_validation_pick_beside_the_best_held_out_point():
    from diffalign.ecad.bench_rows import _compare

    rows = {
        "no_cache": {"faithfulness": 0.91, "flop_ratio": 1.0},
        "pab": {"faithfulness": 0.92, "flop_ratio": 0.40},
        "fora4": {"faithfulness": 0.60, "flop_ratio": 0.15},
        # chosen on validation for pab, but the cheaper point scores higher held out
        "ecad_a": {"faithfulness": 0.90, "flop_ratio": 0.35, "matched_to": ["pab", "budget_0.35"]},
        "ecad_b": {"faithfulness": 0.93, "flop_ratio": 0.25, "matched_to": ["budget_0.25"]},
        "ecad_c": {"faithfulness": 0.55, "flop_ratio": 0.14, "matched_to": ["fora4"]},
    }
    by = {c["baseline"]: c for c in _compare(rows)}
    assert set(by) == {"pab", "fora4"}
    pab = by["pab"]
    assert (pab["ecad"], pab["ecad_at_least_as_faithful"]) == ("ecad_b", True)
    assert (pab["validation_pick"], pab["validation_pick_faithfulness"]) == ("ecad_a", 0.90)
    assert pab["validation_pick_at_least_as_faithful"] is False
    fora4 = by["fora4"]
    assert fora4["ecad"] == fora4["validation_pick"] == "ecad_c"
    assert fora4["ecad_at_least_as_faithful"] is False and fora4["validation_pick_flop_ratio"] == 0.14
