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
        assert "validation_fidelity" in e and "validation_reward" in e
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


def test_initial_population_keeps_every_seed_keyed_on_the_effective_schedule(tmp_path, pixart_pipe):
    from diffalign.ecad.genome import GenomeCodec
    from diffalign.ecad.schedule import fora, heuristic_population, no_cache

    cfg = tiny_recipe(tmp_path, population_size=4)
    template = no_cache(pixart_pipe.transformer, 3)
    codec = GenomeCodec(template)
    heur = heuristic_population(pixart_pipe.transformer, 3)
    extra = fora(pixart_pipe.transformer, 3, 2).with_name("recorded")
    extra.recompute[0] = False  # differs only in step-0 bits: the same effective schedule as FORA-2
    X0 = initial_population(codec, cfg, np.random.default_rng(0), [extra])
    effective = {codec.encode(s).tobytes() for s in heur}
    assert X0.shape == (max(4, len(effective)), codec.n_var) and len(effective) > 4  # grew to hold all
    assert {x.tobytes() for x in X0} >= effective
    assert np.array_equal(X0[0], codec.encode(template))
    assert len({x.tobytes() for x in X0}) == len(X0)
    cfg_rand = tiny_recipe(tmp_path, population_size=6, seed_heuristics=False)
    X1 = initial_population(codec, cfg_rand, np.random.default_rng(0))
    assert len(X1) == 6 and not np.array_equal(X1[0], X0[0])


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


def test_progress_is_a_line_per_generation_without_a_terminal(tmp_path, pixart_pipe, capsys, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_NO_PROGRESS", "1")  # stderr is not a terminal: no bar
    run_search(tiny_recipe(tmp_path / "run", generations=2), pipe=pixart_pipe, reward=make_reward())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ecad generations")]
    assert [line.split()[3] for line in lines] == ["1/2", "2/2"]
    assert all("evaluated=" in line and "best_reward=" in line for line in lines)
