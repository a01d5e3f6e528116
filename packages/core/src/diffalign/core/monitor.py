"""Watching a training loop: a progress bar on a terminal, a log line every ``log_every`` steps otherwise.

:class:`StepLogger` is the one helper a trainer uses for both. On a terminal it drives core's tqdm
bar (:func:`diffalign.core.training.progress`) and shows the latest values beside it; when stderr is
not a terminal (a batch job, a log file, CI) it prints one line every ``log_every`` steps and at the
last step::

    mlcm step 20/100 loss=0.1234 lr=0.0001 (0.52 s/step)

Only the main process prints. ``DIFFALIGN_PROGRESS=1`` / ``DIFFALIGN_NO_PROGRESS=1`` force the bar on
or off, as for :func:`~diffalign.core.training.progress`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from .launch import is_main_process
from .training import _progress_disabled, progress

__all__ = ["StepLogger", "format_values"]


def format_values(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs, numbers with 4 significant digits."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            parts.append(f"{key}={float(value.item()):.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class StepLogger:
    """Progress of steps ``initial+1 .. total``; call :meth:`step` after each one, :meth:`close` at the end."""

    def __init__(
        self,
        total: int,
        *,
        log_every: int = 10,
        desc: str = "train",
        initial: int = 0,
        enabled: bool | None = None,
        bar: bool | None = None,
        stream: TextIO | None = None,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.total = int(total)
        self.log_every = int(log_every)
        self.desc = desc
        self.enabled = is_main_process() if enabled is None else enabled
        self.use_bar = (not _progress_disabled()) if bar is None else bar
        self.stream = stream
        self._bar = None
        if self.enabled and self.use_bar:
            self._bar = progress(total=self.total, initial=initial, desc=desc, disable=False)
        self._last_time = time.perf_counter()
        self._last_step = initial

    def step(self, step: int, values: Mapping[str, Any] | None = None) -> None:
        """Record that ``step`` (1-based, so the last is ``total``) is done, with its logged values."""
        if not self.enabled:
            return
        due = step % self.log_every == 0 or step == self.total
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if due and values:
                self._bar.set_postfix_str(format_values(values), refresh=False)
            return
        if not due:
            return
        now = time.perf_counter()
        rate = (now - self._last_time) / max(step - self._last_step, 1)
        self._last_time, self._last_step = now, step
        text = f"{self.desc} step {step}/{self.total}"
        if values:
            text += " " + format_values(values)
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"{text} ({rate:.3g} s/step)", file=stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StepLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
