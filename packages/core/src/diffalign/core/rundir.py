"""Run directories that know which recipe wrote them, and metrics logs that resume cleanly.

:func:`prepare_run_dir` is called once before a run writes anything. It records the method name and a
fingerprint of the resolved recipe in ``run_dir/diffalign-run.json`` and, when the directory already
holds a run, compares the new recipe with the stored one:

* a directory written by another method is refused;
* a changed recipe is refused, naming every changed key, unless those keys are allowed
  (``allow_changed``; a key allows everything under it) or ignored by the method (``ignore``: keys
  that never change a run's result, such as ``run_dir``, or that may grow on resume, such as a step
  budget);
* ``resume="never"`` starts fresh and therefore needs an empty (or missing) directory;
  ``resume="always"`` needs an existing run; ``resume="auto"`` resumes when there is one;
* a non-empty directory without the marker file is refused: it was not written by a run.

Refusals raise :class:`RunDirError` before anything is written. :class:`MetricsLog` appends one JSON
row per logged step to ``metrics.jsonl`` and, on resume, cuts the file back to the checkpoint step so
rows logged after the checkpoint are not repeated.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

__all__ = [
    "RUN_MARKER",
    "MetricsLog",
    "RunDir",
    "RunDirError",
    "flatten_recipe",
    "prepare_run_dir",
    "recipe_fingerprint",
]

RUN_MARKER = "diffalign-run.json"
DEFAULT_IGNORE: tuple[str, ...] = ("run_dir",)
ResumeMode = Literal["auto", "never", "always"]


class RunDirError(ValueError):
    """A run directory cannot be used with this recipe; nothing was written. The message is for the user."""


def _recipe_dict(recipe: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(recipe, BaseModel):
        return recipe.model_dump(mode="json")
    return json.loads(json.dumps(dict(recipe), default=str))


def flatten_recipe(recipe: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """The recipe as ``{"dotted.key": leaf value}`` (lists are leaves)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(_recipe_dict(recipe), "")
    return out


def _covered(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def recipe_fingerprint(recipe: BaseModel | Mapping[str, Any], ignore: Iterable[str] = DEFAULT_IGNORE) -> str:
    """A short stable hash of the recipe without the ``ignore`` keys (and everything under them)."""
    ignore = tuple(ignore)
    flat = {k: v for k, v in flatten_recipe(recipe).items() if not _covered(k, ignore)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()


@dataclass
class RunDir:
    """What :func:`prepare_run_dir` found: ``resume`` tells the trainer whether to load its checkpoint."""

    path: Path
    method: str
    fingerprint: str
    resume: bool
    changed: list[str] = field(default_factory=list)


def _read_marker(path: Path) -> dict[str, Any]:
    marker = path / RUN_MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(
            f"{marker} is unreadable ({type(err).__name__}); restore it or use a new run_dir"
        ) from None
    if not isinstance(data, dict) or not {"method", "fingerprint", "recipe"} <= set(data):
        raise RunDirError(f"{marker} is not a diffalign run marker; restore it or use a new run_dir")
    return data


def _write_json_atomic(target: Path, data: Mapping[str, Any]) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def prepare_run_dir(
    run_dir: str | os.PathLike,
    method: str,
    recipe: BaseModel | Mapping[str, Any],
    *,
    resume: ResumeMode = "auto",
    allow_changed: Iterable[str] = (),
    ignore: Iterable[str] = DEFAULT_IGNORE,
    write: bool = True,
) -> RunDir:
    """Check ``run_dir`` against ``recipe`` and (with ``write``) record the recipe in it.

    Call it before the run writes anything, on the main process with ``write=True`` (other ranks may
    call it with ``write=False`` after the main process did, to learn ``resume``). Raises
    :class:`RunDirError` naming the problem; in that case nothing has been written.
    """
    if resume not in ("auto", "never", "always"):
        raise RunDirError(f"resume must be 'auto', 'never' or 'always', got {resume!r}")
    path = Path(run_dir)
    ignore = tuple(ignore)
    allow = tuple(allow_changed)
    flat = {k: v for k, v in flatten_recipe(recipe).items() if not _covered(k, ignore)}
    digest = recipe_fingerprint(recipe, ignore)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {path} is a file; expected a directory")
    entries = [p.name for p in path.iterdir()] if path.is_dir() else []
    has_marker = RUN_MARKER in entries

    if resume == "never" and entries:
        raise RunDirError(
            f"resume='never' starts a fresh run and needs an empty run_dir, but {path} holds "
            f"{', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}; choose a new run_dir"
        )
    if not has_marker:
        if entries:
            raise RunDirError(
                f"run_dir {path} is not empty and holds no {RUN_MARKER}, so it was not written by a "
                "diffalign run; choose an empty or new run_dir"
            )
        if resume == "always":
            raise RunDirError(f"resume='always' needs an existing run, but {path} holds none")
        state = RunDir(path, method, digest, resume=False)
        if write:
            path.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(
                path / RUN_MARKER,
                {
                    "method": method,
                    "fingerprint": digest,
                    "recipe": flat,
                    "ignore": list(ignore),
                    "history": [],
                },
            )
        return state

    stored = _read_marker(path)
    if stored["method"] != method:
        raise RunDirError(
            f"run_dir {path} holds a {stored['method']!r} run; a {method!r} run cannot resume it, "
            "choose another run_dir"
        )
    old = {k: v for k, v in stored["recipe"].items() if not _covered(k, ignore)}
    changed = _changed_keys(old, flat)
    refused = [k for k in changed if not _covered(k, allow)]
    if refused:
        shown = ", ".join(
            f"{k} ({_show(old.get(k, _MISSING))} -> {_show(flat.get(k, _MISSING))})" for k in refused[:6]
        )
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise RunDirError(
            f"run_dir {path} holds a run of a different recipe: changed {shown}{more}. Restore the recipe, "
            "use a new run_dir, or allow the change explicitly (allow_changed / --allow-changed KEY)"
        )
    if changed and write:
        history = list(stored.get("history", []))
        history.append({"time": _dt.datetime.now(_dt.timezone.utc).isoformat(), "changed": changed})
        _write_json_atomic(
            path / RUN_MARKER,
            {**stored, "fingerprint": digest, "recipe": flat, "ignore": list(ignore), "history": history},
        )
    return RunDir(path, method, digest, resume=True, changed=changed)


def _show(value: Any) -> str:
    return "<absent>" if value is _MISSING else json.dumps(value)


class MetricsLog:
    """``metrics.jsonl``: one JSON object with a ``"step"`` per line, written by the main process only.

    :meth:`truncate` (call it on resume with the checkpoint's step) keeps the rows with
    ``step <= step`` and drops unreadable lines (a row cut short by a kill), rewriting the file
    atomically. Other processes (``enabled=False``) neither read nor write.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                out.append(row)
        return out

    def truncate(self, step: int) -> int:
        """Keep rows logged at or before ``step``; returns how many rows were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line)
        if len(kept) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def append(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": int(step), **values}) + "\n")
