"""Atomic, verified checkpoints of a whole accelerate training state, DeepSpeed ZeRO included.

:class:`StateCheckpoints` wraps accelerate's ``save_state`` / ``load_state``, so every prepared
model, optimizer, scheduler, dataloader position, ``register_for_checkpointing`` object and the RNG
states of every rank are saved the way accelerate and DeepSpeed define them; under ZeRO-2/3 each rank
writes its own optimizer partition, so the checkpoint holds the full optimizer state (rank 0's
``optimizer.state_dict()`` alone would hold only its partition).

Kept from :class:`~diffalign.core.training.CheckpointManager`, and why:

* **atomic write**: every rank writes into ``checkpoints/.tmp-state_XXXXXXXX``; after all ranks are
  done, rank 0 writes a manifest, fsyncs the files and renames the directory to
  ``checkpoints/state_XXXXXXXX``. A kill at any moment leaves the previous checkpoint complete and the
  new one either complete or absent (a leftover temporary directory is removed by the next save).
* **corruption detection**: the manifest (``diffalign-manifest.json``, written last) lists every file
  with its size and SHA-256; loading verifies them and raises ``CheckpointError`` naming the file, so
  a truncated or altered checkpoint is never half-loaded.
* **keep_last** pruning and a small ``extra`` dict (step counters, data position, EMA, ...) saved with
  the state in ``diffalign_state.pt`` and read back with ``weights_only=True``.

The accelerator's ``ProjectConfiguration`` (``make_accelerator`` sets ``project_dir=run_dir``) keeps
``automatic_checkpoint_naming`` off: the directory name is chosen here so the rename stays atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .training import CheckpointError

__all__ = ["MANIFEST", "StateCheckpoints"]

MANIFEST = "diffalign-manifest.json"
EXTRA_FILE = "diffalign_state.pt"
_FORMAT = "diffalign-state-v1"
_STATE_RE = re.compile(r"^state_(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class StateCheckpoints:
    """``run_dir/checkpoints/state_XXXXXXXX/`` directories written by ``accelerator.save_state``.

    ``save`` and ``load`` are collective: every process calls them (DeepSpeed writes and reads one
    partition per rank). The run directory must be on a file system every rank sees.
    """

    def __init__(self, accelerator: Any, run_dir: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # ------------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        found = [_STATE_RE.match(p.name) for p in self.dir.iterdir() if p.is_dir()]
        return sorted(int(m.group(1)) for m in found if m)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path_for(self, step: int) -> Path:
        return self.dir / f"state_{int(step):08d}"

    # ------------------------------------------------------------------ saving

    def save(self, step: int, extra: dict[str, Any] | None = None) -> Path:
        """Save the full training state at ``step`` (collective); returns the checkpoint directory."""
        acc = self.accelerator
        target = self.path_for(step)
        tmp = self.dir / f".tmp-{target.name}"
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-state_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            payload = {"format": _FORMAT, "step": int(step), "extra": dict(extra or {})}
            with open(tmp / EXTRA_FILE, "wb") as handle:
                torch.save(payload, handle)
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                _fsync(path)
                files[path.relative_to(tmp).as_posix()] = {
                    "size": path.stat().st_size,
                    "sha256": _sha256(path),
                }
            manifest = {
                "format": _FORMAT,
                "step": int(step),
                "num_processes": acc.num_processes,
                "files": files,
            }
            with open(tmp / MANIFEST, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(manifest, indent=1, sort_keys=True))
                handle.flush()
                os.fsync(handle.fileno())
            for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                _fsync(sub)
            if target.exists():  # re-saving a step: the old copy goes only after the new one is complete
                old = self.dir / f".tmp-old-{target.name}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _fsync(self.dir)
            for old_step in self.steps()[: -self.keep_last]:
                shutil.rmtree(self.path_for(old_step), ignore_errors=True)
        acc.wait_for_everyone()
        return target

    # ------------------------------------------------------------------ loading

    def verify(self, step: int) -> dict[str, Any]:
        """Check the checkpoint of ``step`` against its manifest; returns the manifest."""
        path = self.path_for(step)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"checkpoint {path} has no readable manifest ({type(err).__name__}); it is incomplete or "
                "corrupt. Delete it to resume from the previous one."
            ) from None
        if manifest.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is not a diffalign state checkpoint")
        for name, expected in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(
                    f"checkpoint {path} is missing {name}; delete it to resume from the previous one"
                )
            if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {file} is truncated or corrupt (size or SHA-256 differs from the "
                    "manifest); delete the checkpoint to resume from the previous one"
                )
        if manifest.get("num_processes") != self.accelerator.num_processes and _is_partitioned(manifest):
            raise CheckpointError(
                f"checkpoint {path} was written by {manifest.get('num_processes')} processes with a "
                f"partitioned (ZeRO) optimizer; resume it with the same number of processes "
                f"(this run has {self.accelerator.num_processes})"
            )
        return manifest

    def extra(self, step: int) -> dict[str, Any]:
        """The ``extra`` dict saved at ``step``, verified but without loading the training state (a trainer
        checks with it that the checkpoint fits the model before :meth:`load` would fail on shapes)."""
        self.verify(step)
        path = self.path_for(step)
        try:
            payload = torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{path / EXTRA_FILE} is unreadable ({type(err).__name__}: {err})"
            ) from None
        return payload["extra"]

    def load(self, step: int) -> dict[str, Any]:
        """Verify and load the state of ``step`` into the prepared objects (collective); returns ``extra``."""
        extra = self.extra(step)
        self.accelerator.load_state(str(self.path_for(step)))
        return extra

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, extra)`` of the newest checkpoint after loading it, or ``None`` when there is none."""
        step = self.latest_step()
        if step is None:
            legacy = sorted(self.dir.glob("step_*.pt")) if self.dir.is_dir() else []
            if legacy:  # single-file checkpoints (CheckpointManager) written by an older trainer
                raise CheckpointError(
                    f"{self.dir} holds {len(legacy)} single-file checkpoint(s) (newest {legacy[-1].name}) of an "
                    "older format that this trainer does not read, and none of its own: resuming would "
                    "silently start over. Use a new run directory, or delete them to train from step 0."
                )
            return None
        return step, self.load(step)


def _is_partitioned(manifest: dict[str, Any]) -> bool:
    return any("zero_pp_rank_" in name for name in manifest.get("files", {}))
