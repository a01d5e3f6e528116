"""tools/bench.py rendering: result tables whole, long training logs thinned to evenly spaced rows."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_tool", ROOT / "tools" / "bench.py")
bench_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_tool)


def test_long_logs_are_thinned_and_result_tables_are_not():
    log = [{"step": i, "reward": i / 100} for i in range(100)]
    shown, note = bench_tool._spaced("grpo_train_log", log)
    assert len(shown) == bench_tool.MAX_LOG_ROWS and shown[0] == log[0] and shown[-1] == log[-1]
    assert "12 of 100" in note
    steps = [r["step"] for r in shown]
    assert steps == sorted(set(steps))
    front = [{"flops": i} for i in range(40)]
    assert bench_tool._spaced("front", front) == (front, "")
    text = bench_tool.render("x", {"package": "x", "reference": {"grpo_train_log": log}, "front": front})
    assert text.count("| 0.") >= 1 and "12 of 100 rows" in text
    assert all(f"| {i} |" in text for i in range(40))
