"""Helpers for tests that launch a method's CLI in fresh interpreters (torchrun ranks on CPU, gloo).

done = run_cli("diffalign.mlcm.cli", "distill", str(recipe))   # asserts exit status 0
check_written_once(run_dir, steps=2, ranks=2)                   # logs and checkpoints written once
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["check_written_once", "fresh_env", "run_cli"]

# set by a launcher: a child that inherits them thinks it is already one rank of a job
_RANK_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def fresh_env(quiet: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment as a new, single-process job sees it: no rank variables, one OpenMP
    thread per process, the Hub offline; ``quiet`` turns progress bars off; ``extra`` is added last."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if quiet:
        env.update({"DIFFALIGN_NO_PROGRESS": "1", "TQDM_DISABLE": "1"})
    env.update(extra)
    return env


def run_cli(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 1100, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m module args...`` in :func:`fresh_env` (or ``env``); with ``check``, a non-zero exit
    fails the calling test with the end of the child's stderr."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=fresh_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def check_written_once(run_dir: str | os.PathLike, steps: int, ranks: int) -> None:
    """A multi-rank run logged each step once (``metrics.jsonl``), wrote one checkpoint per step
    (``checkpoints/state_<step>``) and saved every rank's RNG state in the last one."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    states = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in states] == [f"state_{s:08d}" for s in range(1, steps + 1)]
    assert {p.name for p in states[-1].glob("random_states_*.pkl")} == {
        f"random_states_{r}.pkl" for r in range(ranks)
    }
