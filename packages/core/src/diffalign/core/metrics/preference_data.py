"""Readers and writers for human-preference test sets, with one in-memory record type.

Three on-disk formats are supported. Each reader returns a list of :class:`PreferenceRecord`; each
writer takes such a list. Image paths inside a file are stored *relative to an image root* (by
default the directory holding the file) with forward slashes; records always hold resolved paths
(``image_root / stored_path``), so ``read(write(records)) == records`` for images under the root.

**ImageReward test set** (``read_imagereward`` / ``write_imagereward``), e.g. ``data/test.json``::

    [
      {"id": "005658-0040",                  # string, unique per prompt group
       "prompt": "a red circle",
       "generations": ["part-1/a.webp", "part-1/b.webp", "part-1/c.webp"],   # >= 2 image paths
       "ranking": [1, 3, 1]},                # one int per image, 1 = best, equal ints = tie
      ...
    ]

One JSON array (UTF-8, indented), one object per prompt. Human ties are allowed and produce no pair.

**HPDv2 test set** (``read_hpdv2`` / ``write_hpdv2``), e.g. ``test.json``::

    [
      {"prompt": "a red circle",
       "image_path": ["00000.jpg", "00001.jpg", ...],   # >= 2 image paths
       "rank": [2, 0, 1, ...],               # one int per image, lower = preferred
       ...}                                  # other keys (e.g. raw_annotations, user_hash) are kept
    ]

One JSON array, one object per prompt. Unknown keys are preserved in ``PreferenceRecord.extra``
and written back.

**Rapidata preference set** (``read_rapidata`` / ``write_rapidata``): the columns of Rapidata's
Hugging Face pairwise sets, one row per image pair, stored locally as JSON Lines (``.jsonl``: one
JSON object per line), or read from ``.parquet`` (needs pyarrow) or a ``.json`` array::

    {"prompt": "a red circle",
     "image1_path": "imgs/0001_a.png", "image2_path": "imgs/0001_b.png",
     "model1": "teacher-50", "model2": "teacher-4",      # optional, may be null
     "votes_image1": 7, "votes_image2": 3,               # vote-count variant (ints)
     "detailed_results": "[...]"}                        # optional JSON string, kept verbatim

or, for the weighted variant (the newer Rapidata sets), instead of the two ``votes_*`` columns::

     "weighted_results_image1_preference": 0.71, "weighted_results_image2_preference": 0.29

The hub sets store the pixels in ``image1``/``image2`` columns; locally the pixels live in files
named by ``image1_path``/``image2_path`` (a parquet ``image1`` column holding ``{"path": ...}`` is
also accepted). Vote ties produce no pair.

Every malformed file raises :class:`PreferenceDataError` naming the file, the entry index and the
offending key; writers validate every record before writing and write atomically (temp file +
rename), so a failed write leaves nothing on disk.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PreferenceDataError",
    "PreferencePair",
    "PreferenceRecord",
    "read_hpdv2",
    "read_imagereward",
    "read_preferences",
    "read_rapidata",
    "records_to_pairs",
    "write_hpdv2",
    "write_imagereward",
    "write_preferences",
    "write_rapidata",
]


class PreferenceDataError(ValueError):
    """A preference file or record is malformed. The message names the file, entry and key."""


@dataclass(frozen=True)
class PreferencePair:
    """One pairwise human judgement: ``label`` 0 means ``image_a`` is preferred, 1 means ``image_b``.

    ``strength_a``/``strength_b`` are the human evidence for each side: vote counts (or weighted
    results) for vote data, and ``-rank`` for ranked data (so larger is always better).
    """

    prompt: str
    image_a: Path
    image_b: Path
    label: int
    strength_a: float
    strength_b: float
    record_id: str | None = None
    index_a: int = 0
    index_b: int = 1


@dataclass
class PreferenceRecord:
    """Images generated for one prompt with human preference evidence.

    Exactly one of ``ranks`` (lower = preferred, equal = tie; ImageReward and HPDv2 sets) and
    ``votes`` (higher = preferred; Rapidata sets: counts, or weighted shares when
    ``vote_kind == "weighted"``) is set, with one entry per image.
    """

    prompt: str
    images: list[Path]
    ranks: list[int] | None = None
    votes: list[float] | None = None
    id: str | None = None
    models: list[str | None] | None = None
    vote_kind: str = "count"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = [Path(p) for p in self.images]
        self.validate()

    def validate(self, where: str = "record") -> None:
        if not isinstance(self.prompt, str):
            raise PreferenceDataError(f"{where}: 'prompt' must be a string, got {type(self.prompt).__name__}")
        if len(self.images) < 2:
            raise PreferenceDataError(f"{where}: needs at least 2 images, got {len(self.images)}")
        if (self.ranks is None) == (self.votes is None):
            raise PreferenceDataError(f"{where}: set exactly one of 'ranks' and 'votes'")
        evidence = self.ranks if self.ranks is not None else self.votes
        name = "ranks" if self.ranks is not None else "votes"
        if len(evidence) != len(self.images):
            raise PreferenceDataError(
                f"{where}: '{name}' has {len(evidence)} entries for {len(self.images)} images"
            )
        for value in evidence:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PreferenceDataError(f"{where}: '{name}' must hold finite numbers, got {value!r}")
        if self.ranks is not None and any(int(r) != r for r in self.ranks):
            raise PreferenceDataError(f"{where}: 'ranks' must be integers, got {self.ranks!r}")
        if self.votes is not None and any(v < 0 for v in self.votes):
            raise PreferenceDataError(f"{where}: 'votes' must be >= 0, got {self.votes!r}")
        if self.vote_kind not in ("count", "weighted"):
            raise PreferenceDataError(
                f"{where}: vote_kind must be 'count' or 'weighted', got {self.vote_kind!r}"
            )
        if self.models is not None and len(self.models) != len(self.images):
            raise PreferenceDataError(
                f"{where}: 'models' has {len(self.models)} entries for {len(self.images)} images"
            )

    def strengths(self) -> list[float]:
        """Human evidence per image, larger = preferred (``-rank`` or votes)."""
        if self.ranks is not None:
            return [-float(r) for r in self.ranks]
        return [float(v) for v in self.votes]

    def to_pairs(self) -> list[PreferencePair]:
        """All image pairs ``(i, j), i < j`` with a strict human preference; ties are dropped."""
        strength = self.strengths()
        pairs = []
        for i in range(len(self.images)):
            for j in range(i + 1, len(self.images)):
                if strength[i] == strength[j]:
                    continue
                pairs.append(
                    PreferencePair(
                        prompt=self.prompt,
                        image_a=self.images[i],
                        image_b=self.images[j],
                        label=0 if strength[i] > strength[j] else 1,
                        strength_a=strength[i],
                        strength_b=strength[j],
                        record_id=self.id,
                        index_a=i,
                        index_b=j,
                    )
                )
        return pairs


def records_to_pairs(records: Iterable[PreferenceRecord]) -> list[PreferencePair]:
    """Concatenate :meth:`PreferenceRecord.to_pairs` over records."""
    return [pair for record in records for pair in record.to_pairs()]


# --------------------------------------------------------------------------- path helpers


def _resolve(root: Path, stored: Any, where: str, key: str) -> Path:
    if not isinstance(stored, str) or not stored:
        raise PreferenceDataError(f"{where}: '{key}' entries must be non-empty path strings, got {stored!r}")
    path = Path(stored)
    return path if path.is_absolute() else root / path


def _relative(root: Path, image: Path) -> str:
    """``image`` relative to ``root`` when it lies under it, else its absolute path (posix)."""
    image_abs, root_abs = Path(image).absolute(), Path(root).absolute()
    try:
        return image_abs.relative_to(root_abs).as_posix()
    except ValueError:
        return image_abs.as_posix()


def _check_exists(records: Sequence[PreferenceRecord], path: Path) -> None:
    for n, record in enumerate(records):
        for image in record.images:
            if not image.exists():
                raise PreferenceDataError(f"{path}: entry {n}: image file {image} does not exist")


def _load_json_array(path: Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: preference file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PreferenceDataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: expected a JSON array of entries, got {type(data).__name__}")
    if not data:
        raise PreferenceDataError(f"{path}: the file holds no entries")
    return data


def _require(entry: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise PreferenceDataError(f"{where}: missing key(s) {missing}; present: {sorted(entry)}")


def _list_of(entry: dict, key: str, where: str) -> list:
    value = entry[key]
    if not isinstance(value, list):
        raise PreferenceDataError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _validated(records: Sequence[PreferenceRecord], path: Path, kind: str) -> list[PreferenceRecord]:
    records = list(records)
    if not records:
        raise PreferenceDataError(f"{path}: refusing to write an empty {kind} file (no records)")
    for n, record in enumerate(records):
        if not isinstance(record, PreferenceRecord):
            raise PreferenceDataError(
                f"{path}: entry {n} is a {type(record).__name__}, not a PreferenceRecord"
            )
        record.validate(f"{path}: entry {n}")
    return records


# --------------------------------------------------------------------------- ImageReward and HPDv2
# Both are JSON arrays of {prompt, a list of images, a list of ranks}; they differ in the two keys and in
# how they write ids (ImageReward: always, first; HPDv2: only when the record has one, after the prompt).


def _read_ranked(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None,
    check_images: bool,
    images_key: str,
    ranks_key: str,
) -> list[PreferenceRecord]:
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for n, entry in enumerate(_load_json_array(path)):
        where = f"{path}: entry {n}"
        _require(entry, ("prompt", images_key, ranks_key), where)
        images = [_resolve(root, p, where, images_key) for p in _list_of(entry, images_key, where)]
        ranks = _list_of(entry, ranks_key, where)
        extra = {k: v for k, v in entry.items() if k not in ("id", "prompt", images_key, ranks_key)}
        record_id = entry.get("id")
        records.append(
            _build(
                where,
                prompt=entry["prompt"],
                images=images,
                ranks=ranks,
                id=None if record_id is None else str(record_id),
                extra=extra,
            )
        )
    if check_images:
        _check_exists(records, path)
    return records


def _write_ranked(
    path: str | os.PathLike,
    records: Sequence[PreferenceRecord],
    image_root: str | os.PathLike | None,
    kind: str,
    images_key: str,
    ranks_key: str,
    always_id: bool,
) -> Path:
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = _validated(records, path, kind)
    entries = []
    for n, record in enumerate(records):
        if record.ranks is None:
            raise PreferenceDataError(
                f"{path}: entry {n}: the {kind} format needs 'ranks', the record has votes"
            )
        entry: dict[str, Any] = {}
        if always_id:
            entry["id"] = record.id if record.id is not None else f"{n:06d}"
        entry["prompt"] = record.prompt
        if not always_id and record.id is not None:
            entry["id"] = record.id
        entry[images_key] = [_relative(root, p) for p in record.images]
        entry[ranks_key] = [int(r) for r in record.ranks]
        entry.update({k: v for k, v in record.extra.items() if k not in entry})
        entries.append(entry)
    _atomic_write_text(path, json.dumps(entries, indent=4, ensure_ascii=False) + "\n")
    return path


def read_imagereward(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_images: bool = False
) -> list[PreferenceRecord]:
    """Read an ImageReward-format test set (see module docstring). ``ranking``: 1 = best."""
    return _read_ranked(path, image_root, check_images, "generations", "ranking")


def write_imagereward(
    path: str | os.PathLike, records: Sequence[PreferenceRecord], image_root: str | os.PathLike | None = None
) -> Path:
    """Write records as an ImageReward-format test set. Records need ``ranks`` (1 = best).

    Records without an ``id`` get ``"{index:06d}"``. Returns the written path.
    """
    return _write_ranked(path, records, image_root, "ImageReward", "generations", "ranking", always_id=True)


def read_hpdv2(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_images: bool = False
) -> list[PreferenceRecord]:
    """Read an HPDv2-format test set (see module docstring). ``rank``: lower = preferred."""
    return _read_ranked(path, image_root, check_images, "image_path", "rank")


def write_hpdv2(
    path: str | os.PathLike, records: Sequence[PreferenceRecord], image_root: str | os.PathLike | None = None
) -> Path:
    """Write records as an HPDv2-format test set. Records need ``ranks`` (lower = preferred)."""
    return _write_ranked(path, records, image_root, "HPDv2", "image_path", "rank", always_id=False)


# --------------------------------------------------------------------------- Rapidata

_RAPIDATA_COUNT = ("votes_image1", "votes_image2")
_RAPIDATA_WEIGHTED = ("weighted_results_image1_preference", "weighted_results_image2_preference")
_RAPIDATA_KNOWN = {
    "prompt",
    "id",
    "image1",
    "image2",
    "image1_path",
    "image2_path",
    "model1",
    "model2",
    *_RAPIDATA_COUNT,
    *_RAPIDATA_WEIGHTED,
}


def _rapidata_rows(path: Path) -> list:
    if not path.is_file():
        raise PreferenceDataError(f"{path}: preference file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PreferenceDataError(f"{path}: line {line_no} is not valid JSON ({err})") from err
        if not rows:
            raise PreferenceDataError(f"{path}: the file holds no entries")
        return rows
    if suffix == ".json":
        return _load_json_array(path)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:  # pragma: no cover - pyarrow is usually present
            raise PreferenceDataError(
                f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert to .jsonl"
            ) from err
        rows = pq.read_table(path).to_pylist()
        if not rows:
            raise PreferenceDataError(f"{path}: the file holds no entries")
        return rows
    raise PreferenceDataError(f"{path}: unknown Rapidata file type {suffix!r}; use .jsonl, .json or .parquet")


def _rapidata_image(entry: dict, k: int, where: str) -> Any:
    key = f"image{k}_path"
    if entry.get(key):
        return entry[key]
    image = entry.get(f"image{k}")
    if isinstance(image, dict) and image.get("path"):
        return image["path"]
    if isinstance(image, str) and image:
        return image
    raise PreferenceDataError(
        f"{where}: no path for image {k}: set '{key}' (hub rows that embed image bytes must be exported "
        "to files first)"
    )


def read_rapidata(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_images: bool = False
) -> list[PreferenceRecord]:
    """Read a Rapidata-format pairwise set (see module docstring): counts or weighted results."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for n, entry in enumerate(_rapidata_rows(path)):
        where = f"{path}: entry {n}"
        _require(entry, ("prompt",), where)
        if all(k in entry for k in _RAPIDATA_COUNT):
            votes, kind = [entry[k] for k in _RAPIDATA_COUNT], "count"
            if any(isinstance(v, float) and not float(v).is_integer() for v in votes):
                raise PreferenceDataError(f"{where}: 'votes_image1/2' must be integer counts, got {votes}")
        elif all(k in entry for k in _RAPIDATA_WEIGHTED):
            votes, kind = [entry[k] for k in _RAPIDATA_WEIGHTED], "weighted"
        else:
            raise PreferenceDataError(
                f"{where}: needs either {list(_RAPIDATA_COUNT)} or {list(_RAPIDATA_WEIGHTED)}; present: {sorted(entry)}"
            )
        images = [_resolve(root, _rapidata_image(entry, k, where), where, f"image{k}_path") for k in (1, 2)]
        models = [entry.get("model1"), entry.get("model2")]
        extra = {k: v for k, v in entry.items() if k not in _RAPIDATA_KNOWN}
        record_id = entry.get("id")
        records.append(
            _build(
                where,
                prompt=entry["prompt"],
                images=images,
                votes=votes,
                vote_kind=kind,
                models=None if models == [None, None] else models,
                id=None if record_id is None else str(record_id),
                extra=extra,
            )
        )
    if check_images:
        _check_exists(records, path)
    return records


def write_rapidata(
    path: str | os.PathLike, records: Sequence[PreferenceRecord], image_root: str | os.PathLike | None = None
) -> Path:
    """Write two-image vote records as Rapidata-format JSON Lines (``path`` must end in ``.jsonl``).

    ``vote_kind == "count"`` writes ``votes_image1/2`` (ints); ``"weighted"`` writes
    ``weighted_results_image1/2_preference``.
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise PreferenceDataError(f"{path}: Rapidata sets are written as JSON Lines; use a '.jsonl' path")
    root = Path(image_root) if image_root is not None else path.parent
    records = _validated(records, path, "Rapidata")
    lines = []
    for n, record in enumerate(records):
        where = f"{path}: entry {n}"
        if record.votes is None or len(record.images) != 2:
            raise PreferenceDataError(f"{where}: the Rapidata format needs exactly 2 images with 'votes'")
        row: dict[str, Any] = {"prompt": record.prompt}
        if record.id is not None:
            row["id"] = record.id
        row["image1_path"] = _relative(root, record.images[0])
        row["image2_path"] = _relative(root, record.images[1])
        models = record.models or [None, None]
        row["model1"], row["model2"] = models[0], models[1]
        if record.vote_kind == "count":
            if any(not float(v).is_integer() for v in record.votes):
                raise PreferenceDataError(
                    f"{where}: vote_kind 'count' needs integer votes, got {record.votes}"
                )
            row["votes_image1"], row["votes_image2"] = (int(v) for v in record.votes)
        else:
            row[_RAPIDATA_WEIGHTED[0]], row[_RAPIDATA_WEIGHTED[1]] = (float(v) for v in record.votes)
        row.update({k: v for k, v in record.extra.items() if k not in row})
        lines.append(json.dumps(row, ensure_ascii=False))
    _atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- dispatch

_READERS = {"imagereward": read_imagereward, "hpdv2": read_hpdv2, "rapidata": read_rapidata}
_WRITERS = {"imagereward": write_imagereward, "hpdv2": write_hpdv2, "rapidata": write_rapidata}


def read_preferences(
    path: str | os.PathLike,
    format: str,
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
) -> list[PreferenceRecord]:
    """Read ``path`` in ``format`` (``imagereward``, ``hpdv2`` or ``rapidata``)."""
    if format not in _READERS:
        raise PreferenceDataError(f"unknown preference format {format!r}; choose one of {sorted(_READERS)}")
    return _READERS[format](path, image_root=image_root, check_images=check_images)


def write_preferences(
    path: str | os.PathLike,
    records: Sequence[PreferenceRecord],
    format: str,
    image_root: str | os.PathLike | None = None,
) -> Path:
    """Write ``records`` to ``path`` in ``format`` (``imagereward``, ``hpdv2`` or ``rapidata``)."""
    if format not in _WRITERS:
        raise PreferenceDataError(f"unknown preference format {format!r}; choose one of {sorted(_WRITERS)}")
    return _WRITERS[format](path, records, image_root=image_root)


def _build(where: str, **kwargs: Any) -> PreferenceRecord:
    """Construct a record, re-raising validation errors with the file/entry location."""
    try:
        return PreferenceRecord(**kwargs)
    except PreferenceDataError as err:
        message = str(err)
        prefix = "record: "
        raise PreferenceDataError(
            f"{where}: {message[len(prefix) :] if message.startswith(prefix) else message}"
        ) from None
