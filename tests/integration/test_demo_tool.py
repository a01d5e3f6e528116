"""The demo's pure helpers: error extraction, JSON tail parsing, report and judge markdown, a timed command."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
demo = importlib.util.module_from_spec(spec)
sys.modules["demo_tool"] = demo  # dataclasses look the module up by name
spec.loader.exec_module(demo)


def test_last_error_line_prefers_error_lines_then_exceptions():
    out = "step 1\rstep 2\nerror: model not found at x\nTraceback...\n"
    assert demo.last_error_line(out) == "error: model not found at x"
    tb = "Traceback (most recent call last):\n  File 'a.py'\nValueError: bad shape\n"
    assert demo.last_error_line(tb) == "ValueError: bad shape"
    assert demo.last_error_line("") == "(no output)"
    assert demo.last_error_line("just this\n") == "just this"


def test_json_tail_reads_the_last_printed_object():
    out = 'Loading...\n{"a": 1}\nmore\n{\n  "choice": 2,\n  "reasoning": "image 1 : match ."\n}\n'
    assert demo._json_tail(out) == {"choice": 2, "reasoning": "image 1 : match ."}
    assert demo._json_tail("no json here") is None


def test_set_value_and_seconds_format():
    assert demo._set_value(["a.b=1", "c=[1,2]"], "c") == "[1,2]"
    assert demo.fmt_seconds(125.4) == "2:05"


def test_render_report_opens_with_the_overview_then_the_stage_table():
    ok = demo.StageResult("teacher", status="ok", wall_s=12.3, cpu_s=20.0, work="2 teachers x 8 images")
    ok.images = ["teacher_unet.png"]
    ok.caption = "The committed teachers."
    ok.grids = [
        {
            "image": "teacher_unet.png",
            "label": "shapes/unet 25 steps",
            "steps": 25,
            "faithfulness": 0.625,
            "per_skill": {"object": 1.0, "count": 0.5, "color": 0.5, "spatial": 0.5},
            "seconds": 3.0,
        }
    ]
    judge = demo.StageResult("listener-reward", status="ok", images=["judge/pair1.png"])
    judge.quote = demo.judge_quote(
        {"prompt": "a red circle", "label": 1}, {"choice": 2, "reasoning": "image 2 : red circle ."}
    )
    bad = demo.StageResult("mlcm", status="timeout", wall_s=5.0, error="distill stopped | limit")
    text = demo.render_report(
        [ok, judge, bad], 17.3, 25.0, "test machine", ["a red circle"] * 8, ["judge.md"]
    )
    overview, rest = text.split("## Stages", 1)
    assert "## Overview" in overview and "tiny demo budgets, not the benchmark" in overview
    assert (
        "![teacher_unet.png](teacher_unet.png)" in overview
        and "![judge/pair1.png](judge/pair1.png)" in overview
    )
    assert "shapes/unet 25 steps 0.625" in overview
    assert "> image 2 : red circle ." in overview and "annotator prefers image 1" in overview
    assert "**TIMEOUT**: distill stopped | limit" in overview
    assert "| teacher | ok | 12.3 | 20.0 | 2 teachers x 8 images |" in rest
    assert "distill stopped / limit" in rest  # pipes would break the table
    assert "[judge.md](judge.md)" in rest and "2/3 stages ok" in text


def test_exit_code_fails_unless_every_stage_is_ok():
    ok = demo.StageResult("a", status="ok")
    assert demo.exit_code([ok, demo.StageResult("b", status="ok")]) == 0
    for status in ("failed", "timeout", "not run"):
        assert demo.exit_code([ok, demo.StageResult("b", status=status)]) == 1
    assert demo.exit_code([]) == 1


def test_a_stage_stopped_by_the_safety_limit_is_a_timeout_failure(tmp_path):
    runner = demo.Demo(tmp_path, stage_limit_s=2, progress=False, total_stages=2)
    slow = runner.stage(
        "teacher", lambda r: runner.run([sys.executable, "-c", "import time; time.sleep(30)"], "x")
    )
    assert slow.status == "timeout" and "safety limit" in slow.error and slow.wall_s < 25
    broken = runner.stage("mlcm", lambda r: runner.run([sys.executable, "-c", "raise SystemExit(3)"], "y"))
    assert broken.status == "failed" and "code 3" in broken.error
    fine = runner.stage("ecad", lambda r: runner.run([sys.executable, "-c", "print('done')"], "z"))
    assert fine.status == "ok" and "safety" not in fine.error
    assert demo.exit_code([slow, broken, fine]) == 1 and demo.exit_code([fine]) == 0
    assert "2 teachers" in slow.work  # every stage carries its fixed work


def test_render_judge_handles_missing_verdicts(tmp_path):
    pairs = [
        {"index": 1, "prompt": "a red circle", "grid": str(tmp_path / "judge" / "pair1.png"), "label": 1},
        {
            "index": 2,
            "prompt": "a blue square",
            "grid": "judge/pair2.png",
            "label": 2,
            "faithful": [False, True],
        },
    ]
    verdicts = [{"choice": 1, "probability": 0.75, "reasoning": "image 1 : match ."}, None]
    text = demo.render_judge(pairs, verdicts, tmp_path)
    assert "![pair 1](judge/pair1.png)" in text
    assert "judge chooses image 1 (probability 0.750)" in text
    assert "> image 1 : match ." in text
    assert "no verdict" in text


def test_run_command_records_output_time_and_timeout(tmp_path, capsys):
    import os

    env = dict(os.environ)
    res = demo.run_command([sys.executable, "-c", "print('hello')"], tmp_path / "log.txt", 60, env)
    assert res.returncode == 0 and not res.timed_out and "hello" in res.output
    assert "hello" in (tmp_path / "log.txt").read_text()
    slow = demo.run_command(
        [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "log.txt", 1, env
    )
    assert slow.timed_out and slow.wall_s < 25
