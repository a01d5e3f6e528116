import json

import numpy as np
import pytest
from ecad_test_support import make_reward, tiny_recipe

from diffalign.ecad.schedule import Schedule
from diffalign.ecad.search import SearchInterrupted, calibration_set, initial_population, run_search


def _run(cfg, pipe, **kw):
    return run_search(cfg, pipe=pipe, reward=make_reward(), show_progress=False, **kw)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, pixart_pipe):
    full = _run(tiny_recipe(tmp_path / "full"), pixart_pipe)
    cfg = tiny_recipe(tmp_path / "resumed")
    with pytest.raises(SearchInterrupted):
        _run(cfg, pixart_pipe, stop_after_generation=1)
    assert (tmp_path / "resumed" / "checkpoints").is_dir()
    resumed = _run(cfg, pixart_pipe)
    assert np.array_equal(full.X, resumed.X)
    assert np.array_equal(full.F, resumed.F)
    assert np.array_equal(full.front, resumed.front)
    assert int(full.generation.max()) == 2

    # outputs: front JSON, plot, one schedule per front point, chosen schedules
    summary = json.loads((tmp_path / "full" / "front.json").read_text())
    assert len(summary["front"]) == len(full.front) >= 1
    assert (tmp_path / "full" / "front.png").stat().st_size > 0
    for e in summary["front"]:
        s = Schedule.load(tmp_path / "full" / e["path"])
        assert s.num_cached() >= 1 and s.num_steps == 3
        assert 0 < e["flop_ratio"] < 1
    # the no-cache schedule was evaluated (as infeasible) and is the baseline
    assert summary["baseline_reward"] is not None
    feasible = np.all(full.G <= 0, axis=1)
    assert not feasible[np.flatnonzero([r["num_cached"] == 0 for r in full.records])].any()
    # the front is non-dominated over *all* feasible evaluations (archive across generations)
    for i in full.front:
        assert not any(
            np.all(full.F[j] <= full.F[i]) and np.any(full.F[j] < full.F[i]) for j in np.flatnonzero(feasible)
        )


def test_resume_with_a_different_recipe_is_refused(tmp_path, pixart_pipe):
    cfg = tiny_recipe(tmp_path / "r", generations=1)
    _run(cfg, pixart_pipe)
    other = tiny_recipe(tmp_path / "r", generations=2, seed=1)
    with pytest.raises(ValueError, match="different recipe"):
        _run(other, pixart_pipe)


def test_initial_population_is_seeded_with_heuristics(tmp_path, pixart_pipe):
    from diffalign.ecad.schedule import fora, no_cache

    cfg = tiny_recipe(tmp_path, population_size=6)
    template = no_cache(pixart_pipe.transformer, 3)
    X0 = initial_population(template, cfg, np.random.default_rng(0))
    assert X0.shape == (6, template.recompute.numel())
    assert np.array_equal(X0[0], template.to_genome().numpy())
    assert np.array_equal(X0[1], fora(pixart_pipe.transformer, 3, 2).to_genome().numpy())
    cfg_rand = tiny_recipe(tmp_path, population_size=6, seed_heuristics=False)
    X1 = initial_population(template, cfg_rand, np.random.default_rng(0))
    assert not np.array_equal(X1[0], X0[0])


def test_calibration_set_is_prompts_times_seeds(tmp_path):
    from diffalign.ecad.config import CalibrationSection

    p, s = calibration_set(CalibrationSection(prompts=["a", "b"], num_prompts=2, num_seeds=3, seed_offset=5))
    assert p == ["a"] * 3 + ["b"] * 3 and s == [5, 6, 7] * 2
    f = tmp_path / "prompts.txt"
    f.write_text("x\n\ny\n")
    p, s = calibration_set(CalibrationSection(prompt_file=str(f), num_seeds=1))
    assert p == ["x", "y"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        calibration_set(CalibrationSection(prompt_file=str(tmp_path / "empty.txt")))
    p, _ = calibration_set(CalibrationSection(num_prompts=8, num_seeds=1))
    assert len(p) == 8 and len(set(p)) > 1
