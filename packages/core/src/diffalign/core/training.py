"""Training utilities shared by every recipe: seeding, atomic checkpoints with resume, EMA, a NaN guard,
progress bars and tracker logging."""

from __future__ import annotations

import copy
import math
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, NonFiniteError

__all__ = [
    "seed_everything",
    "capture_rng_state",
    "restore_rng_state",
    "CheckpointManager",
    "CheckpointError",
    "EMA",
    "NonFiniteError",
    "check_finite",
    "progress",
    "finish_trackers",
    "make_tracker",
]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        torch.cuda.manual_seed_all(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state as plain tensors and python values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # pragma: no cover
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # pragma: no cover
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointManager:
    """Atomic checkpoints in ``run_dir/checkpoints/step_XXXXXXXX.pt``.

    ``save`` writes to a temporary file, fsyncs it, renames it into place and fsyncs the directory, so a
    kill at any moment leaves either the previous or the new checkpoint complete. ``load_latest`` returns
    the newest checkpoint or ``None``; a truncated or corrupt file raises ``CheckpointError`` naming it.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        if not self.dir.exists():
            return []
        found = []
        for entry in self.dir.iterdir():
            match = _STEP_RE.match(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.path_for(step)
        tmp = target.with_name(target.name + ".tmp")
        payload = {"step": int(step), "format": "diffalign-checkpoint-v1", "state": state}
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        self._fsync_dir()
        for old in self.steps()[: -self.keep_last]:
            self.path_for(old).unlink(missing_ok=True)
        return target

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self, step: int) -> dict[str, Any]:
        path = self.path_for(step)
        return load_checkpoint_file(path)["state"]

    def load_latest(self) -> dict[str, Any] | None:
        step = self.latest_step()
        if step is None:
            return None
        return self.load(step)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}). "
            "Delete it to resume from the previous one."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != "diffalign-checkpoint-v1":
        raise CheckpointError(f"{path} is not a diffalign checkpoint")
    return payload


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    ``decay`` may ramp: with ``warmup=True`` the effective decay of update ``n`` (0-based) is
    ``min(decay, (1 + n) / (10 + n))``. Each update is ``shadow <- lerp(shadow, value, 1 - decay)``;
    integer buffers are copied.

    With ``target`` (a module with ``model``'s state-dict keys and shapes), the average lives in the
    target's own tensors: ``target`` *is* the averaged model, usable without ``copy_to`` and saved with
    its own ``state_dict()``. Otherwise the average is a private copy in ``shadow``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.999,
        warmup: bool = True,
        target: torch.nn.Module | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        source = model.state_dict()
        if target is None:
            self.shadow = {k: v.detach().clone() for k, v in source.items()}
        else:
            self.shadow = {k: v.detach() for k, v in target.state_dict().items()}  # views of target
            if self.shadow.keys() != source.keys():
                missing = sorted(set(source) ^ set(self.shadow))[:3]
                raise ValueError(f"EMA target does not match the model's state dict (e.g. {missing})")
            for key, value in source.items():
                if self.shadow[key].shape != value.shape:
                    raise ValueError(
                        f"EMA target {key!r} has shape {list(self.shadow[key].shape)}, "
                        f"the model {list(value.shape)}"
                    )

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        done: set[int] = set()  # tied weights (one tensor under several keys) are averaged once
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if shadow.numel() and shadow.data_ptr() in done:
                continue
            done.add(shadow.data_ptr())
            if shadow.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), weight)
            else:
                shadow.copy_(value)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)

    def copy_model(self, model: torch.nn.Module) -> torch.nn.Module:
        clone = copy.deepcopy(model)
        self.copy_to(clone)
        return clone

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self.shadow,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; values are copied into the existing average (a target stays one)."""
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA state does not match this model's state dict")
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)


def check_finite(value: Any, step: int, what: str = "loss") -> None:
    """Raise ``NonFiniteError`` if ``value`` (a number or tensor) holds NaN or inf."""
    if isinstance(value, torch.Tensor):
        ok = bool(torch.isfinite(value.detach()).all())
    else:
        ok = math.isfinite(float(value))
    if not ok:
        raise NonFiniteError(
            f"{what} became non-finite at step {step}; stopping. The last good checkpoint is kept: "
            "lower the learning rate or enable gradient clipping, then resume."
        )


def _progress_disabled() -> bool:
    if os.environ.get("DIFFALIGN_NO_PROGRESS") == "1":
        return True
    if os.environ.get("DIFFALIGN_PROGRESS") == "1":
        return False
    return not sys.stderr.isatty()


def progress(
    iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kwargs: Any
) -> Iterator | Any:
    """A tqdm progress bar; silent when stderr is not a terminal or ``DIFFALIGN_NO_PROGRESS=1``."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", _progress_disabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, **kwargs)


def finish_trackers(accelerator: Any) -> None:
    """Finish the trackers :func:`make_tracker` started, keeping the process group: a later stage of the
    same process (the next SELMA expert) still needs it, and ``accelerator.end_training()`` destroys it."""
    for tracker in getattr(accelerator, "trackers", None) or []:
        tracker.finish()


def make_tracker(
    accelerator: Any, run_dir: str | Path, project: str = "diffalign", config: dict | None = None
):
    """Start the accelerator's trackers (those of ``make_accelerator(log_with=...)``) logging under ``run_dir``.

    Returns a ``log(values, step)`` callable; it is a no-op when the accelerator has no tracker.
    ``make_accelerator`` already dropped the trackers that are not installed, so every remaining one
    (tensorboard, wandb, a custom ``GeneralTracker``) is started here.
    """
    if getattr(accelerator, "log_with", None):
        from .rundir import flatten_recipe

        # trackers take flat scalar hyperparameters (tensorboard's hparams reject lists and sections)
        flat = flatten_recipe(config or {})
        hparams = {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}
        accelerator.init_trackers(project, config=hparams)

        def log(values: dict[str, float], step: int) -> None:
            accelerator.log(values, step=step)

        return log

    def log_noop(values: dict[str, float], step: int) -> None:
        return None

    return log_noop
