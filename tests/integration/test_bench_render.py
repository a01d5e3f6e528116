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


def test_parse_junit_reports_each_slow_test_outcome():
    xml = """<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">
    <testcase classname="packages.di-star.tests.test_toy_alternating" name="test_converges" time="12.34"/>
    <testcase classname="a.b" name="test_fails" time="1.0"><failure message="assert 1 == 2">tb</failure></testcase>
    <testcase classname="a.b" name="test_errors" time="0.5"><error message="boom">tb</error></testcase>
    <testcase classname="a.b" name="test_skipped" time="0"><skipped message="no gpu"/></testcase>
    </testsuite></testsuites>"""
    rows = bench_tool.parse_junit(xml)
    assert [r["outcome"] for r in rows] == ["passed", "failed", "error", "skipped"]
    assert rows[0] == {
        "test": "packages.di-star.tests.test_toy_alternating::test_converges",
        "outcome": "passed",
        "seconds": 12.3,
    }
    assert rows[1]["message"] == "assert 1 == 2" and rows[2]["message"] == "boom"


def test_bench_environment_fixes_threads_and_header_states_hardware():
    env = bench_tool.bench_env(3)
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3" and env["HF_HUB_OFFLINE"] == "1"
    text = bench_tool.machine(2)
    assert "logical CPUs" in text and "2 torch thread(s)" in text and "torch " in text
