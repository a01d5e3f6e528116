#!/usr/bin/env python3
"""Run every package's benchmark on the shapes world, the slow tests, and write BENCHMARKS.md.

Each method package has ``python -m diffalign.<pkg>.bench --out bench/results/<dir>.json``; this runner
calls them one after the other in fresh processes with a fixed torch thread count (``--threads``, passed as
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and recorded), records wall and CPU time, then runs the slow-marked
toy and convergence tests (``pytest -m slow``; pass/fail of each in ``bench/results/slow-tests.json``) and,
with ``--scale``, ``tools/scale_bench.py`` (wall time beside FLOP ratio on a PixArt-alpha-size transformer,
``bench/results/scale.json``). It renders every JSON result as markdown tables (rows under ``rows``/
``table``, everything else as key/value lists); the header states the hardware.

    python tools/bench.py                 # all packages, then the slow tests
    python tools/bench.py --only mlcm ecad --quick --no-slow-tests
    python tools/bench.py --only --scale  # only the compute-bound timing section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "ecad": "diffalign.ecad.bench",
    "mlcm": "diffalign.mlcm.bench",
    "di-star": "diffalign.di_star.bench",
    "selma": "diffalign.selma.bench",
    "listener-reward": "diffalign.listener_reward.bench",
}


def machine(threads: int | None = None) -> str:
    """The hardware in one line: CPU model, logical CPUs, memory, torch build, load when measured."""
    import torch

    cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    fixed = f", benchmarks run with {threads} torch thread(s)" if threads else ""
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs{mem}, {gpu}; {platform.platform()}, torch {torch.__version__}, "
        f"python {platform.python_version()}{fixed}{load}"
    )


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_env(threads: int) -> dict[str, str]:
    """Environment of every benchmark process: offline, and the same fixed thread count for all."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )


def parse_junit(xml_text: str) -> list[dict]:
    """One row per test case of a pytest ``--junitxml`` report: test id, outcome, seconds and, for a test
    that did not pass, the first line of pytest's message (pure)."""
    rows = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip().splitlines()[:1]
                message = message[0][:200] if message else ""
                if child.tag != "skipped":
                    break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        row = {"test": name, "outcome": outcome, "seconds": round(float(case.get("time") or 0), 1)}
        rows.append({**row, "message": message} if message else row)
    return rows


def run_slow_tests(results_dir: Path, env: dict[str, str], timeout_s: float) -> int:
    """``pytest -m slow`` over the whole repository; writes ``slow-tests.json`` and returns pytest's code."""
    junit = results_dir / "slow-tests.junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "slow",
        f"--junitxml={junit}",
        f"--timeout={int(timeout_s)}",
    ]
    print(f"== slow tests: {' '.join(cmd)}", flush=True)
    start, cpu0 = time.time(), child_cpu_seconds()
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    wall, cpu = time.time() - start, child_cpu_seconds() - cpu0
    rows = parse_junit(junit.read_text()) if junit.exists() else []
    junit.unlink(missing_ok=True)
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    result = {
        "package": "slow-tests",
        "command": "pytest -m slow (toy-convergence and benchmark-scale tests, left out of make test)",
        "pytest_exit_code": proc.returncode,
        **counts,
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "tests": rows,
    }
    (results_dir / "slow-tests.json").write_text(json.dumps(result, indent=1) + "\n")
    return proc.returncode


def _flatten(value: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in value.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    return cols


MAX_LOG_ROWS = 12


def _spaced(key: str, rows: list[dict], limit: int = MAX_LOG_ROWS) -> tuple[list[dict], str]:
    """Long training logs (keys naming a log/history/curve) are shown as ``limit`` evenly spaced rows,
    first and last included; result tables are always shown whole."""
    if len(rows) <= limit or not any(w in key for w in ("log", "history", "curve")):
        return rows, ""
    idx = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in idx], f" ({len(idx)} of {len(rows)} rows, evenly spaced; all in the JSON)"


def render(name: str, result: dict) -> str:
    sys.path.insert(0, str(ROOT / "packages" / "core" / "src"))
    from diffalign.core.report import markdown_table

    lines = [f"## {name}\n"]
    meta = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    if meta:
        lines.append("\n".join(f"- **{k}**: {v}" for k, v in meta.items()) + "\n")
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            shown, note = _spaced(key, value)
            lines.append(f"\n**{key}**{note}\n\n" + markdown_table(shown))
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            rows = [{"name": k, **_flatten(v)} for k, v in value.items()]
            lines.append(f"\n**{key}**\n\n" + markdown_table(rows, _columns(rows)))
        elif isinstance(value, dict):
            flat = {k: v for k, v in value.items() if not isinstance(v, (list, dict))}
            nested = {k: v for k, v in value.items() if isinstance(v, (list, dict))}
            if flat:
                lines.append(f"\n**{key}**\n\n" + markdown_table([flat]))
            for sub, subvalue in nested.items():
                if isinstance(subvalue, list) and subvalue and all(isinstance(r, dict) for r in subvalue):
                    shown, note = _spaced(sub, subvalue)
                    lines.append(f"\n**{key}.{sub}**{note}\n\n" + markdown_table(shown))
    return "\n".join(lines) + "\n"


EXTRA_SECTIONS = {
    "core-shapes-eval": "python -m diffalign.core.shapes.evaluate --out bench/results/core-shapes-eval.json",
    "slow-tests": "python tools/bench.py --only",
    "scale": "python tools/bench.py --only --no-slow-tests --scale",
    "mutation": "make mutation",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", choices=sorted(PACKAGES), default=None)
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument(
        "--render-only", action="store_true", help="only rebuild BENCHMARKS.md from the JSONs"
    )
    parser.add_argument("--extra", nargs="*", default=[], help="extra arguments passed to every benchmark")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every benchmark (default 1)")
    parser.add_argument("--no-slow-tests", action="store_true", help="do not run pytest -m slow")
    parser.add_argument(
        "--slow-timeout", type=float, default=3600, help="per-test limit of the slow tests (s)"
    )
    parser.add_argument("--scale", action="store_true", help="also run tools/scale_bench.py")
    parser.add_argument(
        "--scale-args", nargs="*", default=[], help="arguments passed to tools/scale_bench.py"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    env = bench_env(args.threads)
    status = 0
    walls: dict[str, float] = {}
    cpus: dict[str, float] = {}
    for name in [] if args.render_only else (list(PACKAGES) if args.only is None else args.only):
        out = results_dir / f"{name}.json"
        cmd = [sys.executable, "-m", PACKAGES[name], "--out", str(out)] + (["--quick"] if args.quick else [])
        cmd += args.extra
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        start, cpu0 = time.time(), child_cpu_seconds()
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        walls[name], cpus[name] = time.time() - start, child_cpu_seconds() - cpu0
        if proc.returncode != 0:
            print(f"!! {name} benchmark failed with exit code {proc.returncode}", file=sys.stderr)
            status = 1
    if not args.render_only and not args.no_slow_tests:
        if run_slow_tests(results_dir, env, args.slow_timeout) != 0:
            print("!! some slow tests failed (bench/results/slow-tests.json)", file=sys.stderr)
            status = 1
    if not args.render_only and args.scale:
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "scale_bench.py"),
            "--out",
            str(results_dir / "scale.json"),
        ]
        cmd += ["--threads", str(args.threads), *args.scale_args]
        print(f"== scale: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, env=env, cwd=ROOT).returncode != 0:
            print("!! scale benchmark failed", file=sys.stderr)
            status = 1
    sections = []
    for name in PACKAGES:
        path = results_dir / f"{name}.json"
        # companion results of the same package (seed aggregates, reruns): bench/results/<name>-<what>.json
        companions = sorted(results_dir.glob(f"{name}-*.json"))
        if path.exists():
            result = json.loads(path.read_text())
            if name in walls:
                result["wall_time_s"] = round(walls[name], 1)
                result["cpu_time_s"] = round(cpus[name], 1)
                result["torch_threads"] = args.threads
            sections.append(render(name, result))
        elif not companions:
            sections.append(f"## {name}\n\nNot measured yet: run `python tools/bench.py --only {name}`.\n")
        for companion in companions:
            sections.append(render(companion.stem, json.loads(companion.read_text())))
    for name, how in EXTRA_SECTIONS.items():
        path = results_dir / f"{name}.json"
        if path.exists():
            sections.append(render(name, json.loads(path.read_text())))
        else:
            sections.append(f"## {name}\n\nNot measured yet: run `{how}`.\n")
    header = (
        "# Benchmarks\n\nMeasured by `make bench` (`python tools/bench.py`) on the shapes world.\n\n"
        f"Hardware: {machine(args.threads)}. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
        "Every number is shown beside its baseline, including where the method loses.\n\n"
    )
    summary_file = ROOT / "bench" / "SUMMARY.md"  # hand-written reading of the numbers, kept with them
    summary = summary_file.read_text() + "\n" if summary_file.exists() else ""
    Path(args.markdown).write_text(header + summary + "\n".join(sections))
    print(f"wrote {args.markdown}")
    return status


if __name__ == "__main__":
    sys.exit(main())
