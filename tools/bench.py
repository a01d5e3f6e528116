#!/usr/bin/env python3
"""Run every package's benchmark on the shapes world and write BENCHMARKS.md.

Each method package has ``python -m diffalign.<pkg>.bench --out bench/results/<dir>.json``; this runner
calls them one after the other in fresh processes, records wall time, and renders the JSON results as
markdown tables (rows under ``rows``/``table``, everything else as key/value lists).

    python tools/bench.py                 # all packages
    python tools/bench.py --only mlcm ecad --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "ecad": "diffalign.ecad.bench",
    "mlcm": "diffalign.mlcm.bench",
    "di-star": "diffalign.di_star.bench",
    "selma": "diffalign.selma.bench",
    "listener-reward": "diffalign.listener_reward.bench",
}


def machine() -> str:
    import torch

    return (
        f"{platform.platform()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, "
        f"python {platform.python_version()}, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0)
    )


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
    args = parser.parse_args(argv)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    status = 0
    walls: dict[str, float] = {}
    for name in [] if args.render_only else (args.only or list(PACKAGES)):
        out = results_dir / f"{name}.json"
        cmd = [sys.executable, "-m", PACKAGES[name], "--out", str(out)] + (["--quick"] if args.quick else [])
        cmd += args.extra
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        walls[name] = time.time() - start
        if proc.returncode != 0:
            print(f"!! {name} benchmark failed with exit code {proc.returncode}", file=sys.stderr)
            status = 1
    sections = []
    for name in PACKAGES:
        path = results_dir / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            if name in walls:
                result["wall_time_s"] = round(walls[name], 1)
            sections.append(render(name, result))
        else:
            sections.append(f"## {name}\n\nNot measured yet: run `python tools/bench.py --only {name}`.\n")
    header = (
        "# Benchmarks\n\nMeasured by `make bench` (`python tools/bench.py`) on the shapes world.\n\n"
        f"Machine: {machine()}. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
        "Every number is shown beside its baseline, including where the method loses.\n\n"
    )
    summary_file = ROOT / "bench" / "SUMMARY.md"  # hand-written reading of the numbers, kept with them
    summary = summary_file.read_text() + "\n" if summary_file.exists() else ""
    Path(args.markdown).write_text(header + summary + "\n".join(sections))
    print(f"wrote {args.markdown}")
    return status


if __name__ == "__main__":
    sys.exit(main())
