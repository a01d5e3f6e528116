"""tools/scale_bench.py on a tiny transformer of the same shape: FLOPs of every regime against a FLOP count of
the real (hooked) run, the hook bookkeeping, and the guard that no hook is left between rows."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "tools" / "scale_bench.py")
sb = importlib.util.module_from_spec(spec)
sys.modules["scale_bench"] = sb  # dataclasses look the module up by name
spec.loader.exec_module(sb)


@pytest.fixture(scope="module")
def tiny():
    cfg = sb.build_config(layers=2, width=32, heads=2)
    cfg["caption_channels"] = 16
    cfg["sample_size"] = 8
    return cfg, sb.build_transformer(cfg)


def test_config_is_pixart_alpha_256_unless_overridden():
    cfg = sb.build_config(28, None, None)
    assert cfg["num_layers"] == 28 and cfg["num_attention_heads"] * cfg["attention_head_dim"] == 1152
    assert (cfg["sample_size"] // cfg["patch_size"]) ** 2 == 256 and cfg["caption_channels"] == 4096
    small = sb.build_config(4, 576, 8)
    assert small["attention_head_dim"] == 72 and small["cross_attention_dim"] == 576
    with pytest.raises(SystemExit, match="not divisible"):
        sb.build_config(2, 100, 3)


@pytest.mark.parametrize("name", [r.name for r in sb.REGIMES])
def test_regime_flops_equal_a_flop_count_of_the_real_run(tiny, name):
    from diffalign.ecad.cost import count_flops
    from diffalign.ecad.hooks import apply_schedule, remove_schedule

    cfg, transformer = tiny
    regime = next(r for r in sb.REGIMES if r.name == name)
    costs = {b: sb.forward_cost(transformer, cfg, b) for b in (1, 2)}
    predicted = sb.regime_flops(regime, transformer, costs)
    state = (
        apply_schedule(transformer, sb.schedule_for(regime, transformer), step_invariant=False)
        if regime.schedule
        else None
    )
    try:
        _, counted, _ = count_flops(sb.denoise, transformer, regime, cfg)
        if state is not None:
            assert state.reused == sb.expected_reuse(regime, transformer)
    finally:
        if state is not None:
            remove_schedule(transformer)
    # the CFG combination and the update step are elementwise (not counted); every model FLOP is
    assert predicted == pytest.approx(counted, rel=1e-9)
    sb.assert_plain(transformer)


def test_flop_ratios_follow_the_step_counts_and_caching_saves(tiny):
    cfg, transformer = tiny
    costs = {b: sb.forward_cost(transformer, cfg, b) for b in (1, 2)}
    flops = {r.name: sb.regime_flops(r, transformer, costs) for r in sb.REGIMES}
    assert flops["teacher 50 steps (CFG)"] == pytest.approx(2 * flops["teacher 25 steps (CFG)"])
    assert flops["teacher 25 + ECAD hooks, all recompute"] == pytest.approx(flops["teacher 25 steps (CFG)"])
    assert flops["teacher 25 + FORA every 3 (ECAD hooks)"] < flops["teacher 25 + FORA every 2 (ECAD hooks)"]
    assert flops["teacher 25 + FORA every 2 (ECAD hooks)"] < flops["teacher 25 steps (CFG)"]
    assert flops["student 4 steps (mlcm)"] == pytest.approx(4 * flops["one-step generator (di-star)"])


def test_rows_leave_no_hook_and_a_left_hook_is_caught(tiny):
    from diffalign.ecad.hooks import apply_schedule, remove_schedule

    cfg, transformer = tiny
    regime = next(r for r in sb.REGIMES if r.schedule.startswith("fora"))
    wall, cpu, counters = sb.run_row(transformer, regime, cfg)
    assert wall > 0 and cpu >= 0 and counters["reused"] == sb.expected_reuse(regime, transformer) > 0
    assert sb.hook_count(transformer) == 0
    apply_schedule(transformer, sb.schedule_for(regime, transformer), step_invariant=False)
    try:
        assert sb.hook_count(transformer) > 0
        with pytest.raises(RuntimeError, match="still attached"):
            sb.assert_plain(transformer)
    finally:
        remove_schedule(transformer)
    sb.assert_plain(transformer)


def test_summary_helpers():
    assert sb.summarise([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert sb.timesteps(4) == [999.0, 749.0, 499.0, 249.0]
    hw = sb.hardware(1)
    assert hw["torch_threads"] == 1 and hw["torch"] == torch.__version__
