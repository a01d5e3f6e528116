"""Issue 20, item 4: the benchmark's aggregation over training seeds (per-seed values, mean, spread)."""

from __future__ import annotations

import json
import math

import pytest

from diffalign.selma.bench import Cache, aggregate_targets, result_rows, seed_differences, spread

SKILLS = ["object", "count"]


def _res(obj: float, count: float) -> dict:
    """A result with per-skill faithfulness in points (stored as fractions, as score_images does)."""
    return {
        "faithfulness": {
            "skill_mean": (obj + count) / 200,
            "per_skill": {"object": obj / 100, "count": count / 100},
        }
    }


BASE = _res(90, 80)  # mean 85
PER_SEED = {
    0: {"merged:linear": _res(94, 86), "mixed:matched:linear": _res(92, 84), "mixed": _res(80, 70)},  # +5
    1: {"merged:linear": _res(91, 81), "mixed:matched:linear": _res(93, 85), "mixed": _res(80, 70)},  # +1
    2: {"merged:linear": _res(96, 84), "mixed:matched:linear": _res(90, 80)},  # +5, no full-strength mixed
}


def test_spread_is_mean_sample_std_and_range():
    s = spread([5.0, 1.0, 6.0])
    assert s["mean"] == pytest.approx(4.0)
    # sample standard deviation (n - 1), not the population one (n)
    assert s["std"] == pytest.approx(math.sqrt(((1) ** 2 + 3**2 + 2**2) / 2))
    assert s["std"] != pytest.approx(math.sqrt((1 + 9 + 4) / 3))
    assert (s["min"], s["max"], s["n_seeds"]) == (1.0, 6.0, 3)
    assert spread([2.5])["std"] == 0.0


def test_seed_differences_against_hand_computed_points():
    d = seed_differences(BASE, PER_SEED, SKILLS)
    mean_gain = d["merged:linear - base (mean)"]
    assert [mean_gain[f"seed_{s}"] for s in range(3)] == pytest.approx([5.0, 1.0, 5.0])
    assert mean_gain["mean"] == pytest.approx(11 / 3)
    # per skill, against the same base (not against another seed's or another skill's score)
    assert [d["merged:linear - base (count)"][f"seed_{s}"] for s in range(3)] == pytest.approx(
        [6.0, 1.0, 4.0]
    )
    assert [d["merged:linear - base (object)"][f"seed_{s}"] for s in range(3)] == pytest.approx(
        [4.0, 1.0, 6.0]
    )
    matched = d["merged:linear - mixed:matched:linear (mean)"]
    assert [matched[f"seed_{s}"] for s in range(3)] == pytest.approx([2.0, -3.0, 5.0])
    assert matched["min"] == pytest.approx(-3.0) and matched["max"] == pytest.approx(5.0)
    # seed 2 has no full-strength mixed LoRA: left out, not counted as zero
    full = d["merged:linear - mixed (mean)"]
    assert full["n_seeds"] == 2 and "seed_2" not in full and full["mean"] == pytest.approx((15.0 + 11.0) / 2)


def test_aggregate_targets_judge_the_seed_mean_and_report_every_seed():
    t = aggregate_targets(BASE, PER_SEED, SKILLS, "merged:linear")
    assert t["merged_minus_base_mean_points"] == pytest.approx(11 / 3)
    assert t["merged_ge_base_plus_3"] is True  # the mean over seeds clears +3 ...
    assert t["merged_ge_base_plus_3_every_seed"] is False  # ... seed 1 (+1) does not
    assert t["change_points_count"] == pytest.approx(11 / 3) and t["change_points_object"] == pytest.approx(
        11 / 3
    )
    assert t["no_skill_more_than_1_below_base"] is True
    assert t["merged_minus_mixed_matched_mean_points"] == pytest.approx(4 / 3)
    assert t["merged_ge_mixed_matched"] is True and t["merged_ge_mixed_matched_every_seed"] is False
    # a skill that drops 2 points on average fails the clean-teacher target
    worse = {0: {"merged:linear": _res(88, 80)}, 1: {"merged:linear": _res(88, 80)}}
    w = aggregate_targets(BASE, worse, SKILLS, "merged:linear")
    assert w["worst_skill_change_points"] == pytest.approx(-2.0)
    assert w["no_skill_more_than_1_below_base"] is False
    assert aggregate_targets(BASE, {0: {}}, SKILLS, "merged:linear") == {"available": False}


def test_result_rows_list_base_once_and_each_model_per_seed():
    rows = result_rows(BASE, PER_SEED, SKILLS)
    assert rows[0] == {"model": "base", "seed": "-", "mean": 85.0, "object": 90.0, "count": 80.0}
    assert [(r["model"], r["seed"]) for r in rows if r["model"] == "mixed"] == [("mixed", 0), ("mixed", 1)]
    assert len(rows) == 1 + 3 + 3 + 2


def test_cache_keeps_results_only_for_the_same_settings(tmp_path):
    path = tmp_path / "c.json"
    c = Cache(path, {"steps": 300})
    c.put("expert:count", _res(1, 2))
    c.add_time("train", 2.0, 1.0)
    again = Cache(path, json.loads(json.dumps({"steps": 300})))
    assert again.results == {"expert:count": _res(1, 2)}
    assert again.data["timings"]["train"] == {"wall_s": 2.0, "cpu_s": 1.0}
    assert Cache(path, {"steps": 200}).results == {}  # other settings: evaluated afresh


def test_training_data_points_score_each_skill_on_its_own_images(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from diffalign.selma.bench import training_data_points

    (tmp_path / "images").mkdir()
    lines = []
    # object images are white, count images black, and one grey count image: per skill, not pooled
    for i, (skill, grey) in enumerate([("object", 255), ("count", 0), ("object", 255), ("count", 51)]):
        Image.new("RGB", (4, 4), (grey, grey, grey)).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"p{i}", "skill": skill}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    seen = []

    def brightness(images, prompts):  # a stand-in verifier: mean brightness in [0, 1]
        seen.append(list(prompts))
        return SimpleNamespace(overall=float((images.mean() + 1) / 2))

    pts = training_data_points(tmp_path, SKILLS, brightness)
    assert pts["object"] == pytest.approx(100.0)
    assert pts["count"] == pytest.approx(100 * (0 + 51 / 255) / 2, abs=1e-4)
    assert pts["mean"] == pytest.approx((pts["object"] + pts["count"]) / 2)
    assert seen == [["p0", "p2"], ["p1", "p3"]]  # each skill's images with their own captions


def test_training_seeds_default_to_three_and_follow_the_flags():
    from diffalign.selma.bench import training_seeds

    assert training_seeds(None, None, quick=False) == [
        0,
        1,
        2,
    ]  # `python -m diffalign.selma.bench` = the table
    assert training_seeds(None, None, quick=True) == [0]
    assert training_seeds(None, 5, quick=False) == [5]
    assert training_seeds([2, 0, 2], 5, quick=False) == [2, 0]
