"""Caching schedules: which transformer sub-module to recompute at which denoising step.

A schedule is a boolean tensor ``recompute[step, block, component]``. ``True`` means "run the
sub-module at this step and store its output", ``False`` means "reuse the output stored the last time
it ran". The component axis is architecture specific (see :data:`ARCHITECTURES`): PixArt blocks have
``attn1`` (self-attention), ``attn2`` (cross-attention) and ``ff``; DiT blocks have ``attn1`` and
``ff``; FLUX has 19 double-stream blocks (``attn``, ``ff``, ``ff_context``) followed by 38 single-stream
blocks (``attn``, ``proj_mlp``, ``proj_out``), laid out on one block axis with three component slots.

Step 0 always recomputes at run time (nothing is cached yet), so its bits are "don't care";
:meth:`Schedule.effective` returns the schedule the hooks actually execute.

JSON: :meth:`Schedule.save` writes this package's compact layout; :meth:`Schedule.load` reads it and
also the layout of the schedules published with the ECAD paper (``{"cache_schedule": {"schedule":
{"000": {"0": {"attn1": true, ...}, "single_0": {...}}}}}``), data only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "BlockGroup",
    "Schedule",
    "ScheduleError",
    "detect_architecture",
    "no_cache",
    "fora",
    "tgate",
    "evenly_spaced",
    "heuristic_population",
]

FORMAT_NAME = "diffalign-ecad-schedule"
FORMAT_VERSION = 1


class ScheduleError(ValueError):
    """A schedule does not fit the model, pipeline or file it was used with."""


@dataclass(frozen=True)
class BlockGroup:
    """A ``ModuleList`` of transformer blocks and the sub-modules of each block that can be cached."""

    attr: str  # attribute of the transformer holding the ModuleList
    components: tuple[str, ...]  # sub-module names inside each block, in component-slot order
    official_prefix: str  # block key prefix in the official ECAD JSON ("" or "single_")
    official_components: tuple[str, ...]  # component keys in the official ECAD JSON


@dataclass(frozen=True)
class ArchSpec:
    name: str
    transformer_classes: tuple[str, ...]
    groups: tuple[BlockGroup, ...]

    @property
    def num_components(self) -> int:
        return max(len(g.components) for g in self.groups)

    def component_labels(self) -> list[str]:
        """Human-readable name of each component slot (joined across block groups)."""
        labels = []
        for slot in range(self.num_components):
            names = []
            for g in self.groups:
                if slot < len(g.components) and g.components[slot] not in names:
                    names.append(g.components[slot])
            labels.append("/".join(names))
        return labels


ARCHITECTURES: dict[str, ArchSpec] = {
    "pixart": ArchSpec(
        name="pixart",
        transformer_classes=("PixArtTransformer2DModel",),
        groups=(BlockGroup("transformer_blocks", ("attn1", "attn2", "ff"), "", ("attn1", "attn2", "ff")),),
    ),
    "dit": ArchSpec(
        name="dit",
        transformer_classes=("DiTTransformer2DModel",),
        groups=(BlockGroup("transformer_blocks", ("attn1", "ff"), "", ("attn1", "ff")),),
    ),
    "flux": ArchSpec(
        name="flux",
        transformer_classes=("FluxTransformer2DModel",),
        groups=(
            BlockGroup(
                "transformer_blocks",
                ("attn", "ff", "ff_context"),
                "",
                ("full_attn", "full_ff", "full_ff_context"),
            ),
            BlockGroup(
                "single_transformer_blocks",
                ("attn", "proj_mlp", "proj_out"),
                "single_",
                ("single_attn", "single_proj_mlp", "single_proj_out"),
            ),
        ),
    ),
}

# names of core's ARCHITECTURES registry that share a block layout with ours
ARCH_ALIASES = {"pixart-alpha": "pixart", "pixart-sigma": "pixart"}


def _spec(arch: str) -> ArchSpec:
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHITECTURES:
        raise ScheduleError(f"unknown architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def detect_architecture(transformer: torch.nn.Module) -> str:
    """Architecture name of a diffusers transformer, from its class (or a parent class)."""
    names = [c.__name__ for c in type(transformer).__mro__]
    for arch, spec in ARCHITECTURES.items():
        if any(n in spec.transformer_classes for n in names):
            return arch
    raise ScheduleError(
        f"{type(transformer).__name__} is not a supported transformer; ECAD schedules support "
        + ", ".join(f"{s.transformer_classes[0]} ({a})" for a, s in ARCHITECTURES.items())
    )


def block_layout(transformer: torch.nn.Module, arch: str | None = None) -> list[tuple[BlockGroup, int]]:
    """``[(group, block_index_within_group), ...]`` over the schedule's block axis."""
    spec = _spec(arch or detect_architecture(transformer))
    layout = []
    for g in spec.groups:
        blocks = getattr(transformer, g.attr, None)
        if blocks is None:
            raise ScheduleError(f"{type(transformer).__name__} has no attribute {g.attr!r}")
        layout += [(g, i) for i in range(len(blocks))]
    return layout


def group_sizes(transformer: torch.nn.Module, arch: str | None = None) -> tuple[int, ...]:
    spec = _spec(arch or detect_architecture(transformer))
    return tuple(len(getattr(transformer, g.attr)) for g in spec.groups)


def _slot_mask(spec: ArchSpec, group_sizes_: Sequence[int]) -> torch.Tensor:
    """[blocks, components] True where a component slot exists (DiT-like missing slots are False)."""
    rows = []
    for g, n in zip(spec.groups, group_sizes_):
        row = torch.tensor([slot < len(g.components) for slot in range(spec.num_components)])
        rows.append(row.expand(n, -1))
    return torch.cat(rows, 0)


@dataclass
class Schedule:
    """A static caching schedule for one architecture, block count and step count."""

    architecture: str
    recompute: torch.Tensor  # bool [steps, blocks, components]
    group_sizes: tuple[int, ...]
    name: str = "schedule"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = _spec(self.architecture)
        self.architecture = spec.name
        self.group_sizes = tuple(int(n) for n in self.group_sizes)
        if len(self.group_sizes) != len(spec.groups):
            raise ScheduleError(
                f"{spec.name} schedules have {len(spec.groups)} block group(s) "
                f"({', '.join(g.attr for g in spec.groups)}), got group sizes {self.group_sizes}"
            )
        rec = torch.as_tensor(self.recompute)
        if rec.dtype != torch.bool:
            if rec.is_floating_point() or not bool(((rec == 0) | (rec == 1)).all()):
                raise ScheduleError("recompute must hold booleans (or 0/1 integers)")
            rec = rec.bool()
        if rec.ndim != 3:
            raise ScheduleError(
                f"recompute must be [steps, blocks, components], got shape {tuple(rec.shape)}"
            )
        want = (sum(self.group_sizes), spec.num_components)
        if tuple(rec.shape[1:]) != want:
            raise ScheduleError(
                f"a {spec.name} schedule with block groups {self.group_sizes} needs shape "
                f"[steps, {want[0]}, {want[1]}], got {tuple(rec.shape)}"
            )
        if rec.shape[0] < 1:
            raise ScheduleError("a schedule needs at least one step")
        self.recompute = rec.clone().cpu()

    # ------------------------------------------------------------------ basic properties
    @property
    def spec(self) -> ArchSpec:
        return _spec(self.architecture)

    @property
    def num_steps(self) -> int:
        return int(self.recompute.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.recompute.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.recompute.shape[2])

    @property
    def slot_mask(self) -> torch.Tensor:
        return _slot_mask(self.spec, self.group_sizes)

    def effective(self) -> torch.Tensor:
        """The bits the hooks execute: step 0 always recomputes; missing component slots never run."""
        eff = self.recompute.clone()
        eff[0] = True
        return eff & self.slot_mask

    def num_cached(self) -> int:
        """Number of (step, block, component) evaluations that reuse a cached output."""
        return int((~self.effective() & self.slot_mask).sum())

    def cached_fraction(self) -> float:
        total = int(self.slot_mask.sum()) * self.num_steps
        return self.num_cached() / total

    # ------------------------------------------------------------------ genome <-> schedule
    def to_genome(self) -> torch.Tensor:
        return self.recompute.flatten().clone()

    @classmethod
    def from_genome(cls, genome, like: Schedule, name: str = "candidate") -> Schedule:
        g = torch.as_tensor(genome).bool().flatten()
        if g.numel() != like.recompute.numel():
            raise ScheduleError(f"genome has {g.numel()} bits, the schedule needs {like.recompute.numel()}")
        return cls(like.architecture, g.view_as(like.recompute), like.group_sizes, name=name)

    def with_name(self, name: str) -> Schedule:
        return Schedule(self.architecture, self.recompute, self.group_sizes, name, dict(self.metadata))

    # ------------------------------------------------------------------ validation
    def validate(self, transformer: torch.nn.Module, num_inference_steps: int | None = None) -> None:
        """Raise :class:`ScheduleError` if this schedule does not fit ``transformer`` (and step count)."""
        arch = detect_architecture(transformer)
        if arch != self.architecture:
            raise ScheduleError(
                f"schedule {self.name!r} is for {self.architecture} transformers but the model is "
                f"{type(transformer).__name__} ({arch})"
            )
        sizes = group_sizes(transformer, arch)
        if sizes != self.group_sizes:
            groups = ", ".join(f"{g.attr}={n}" for g, n in zip(self.spec.groups, sizes))
            mine = ", ".join(f"{g.attr}={n}" for g, n in zip(self.spec.groups, self.group_sizes))
            raise ScheduleError(
                f"schedule {self.name!r} was built for {mine} blocks but the model has {groups}"
            )
        if num_inference_steps is not None and num_inference_steps != self.num_steps:
            raise ScheduleError(
                f"schedule {self.name!r} has {self.num_steps} steps but the pipeline runs "
                f"num_inference_steps={num_inference_steps}; search or load a schedule for that step count"
            )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        rows = []
        for s in range(self.num_steps):
            row = []
            for b in range(self.num_blocks):
                row.append("".join("1" if bit else "0" for bit in self.recompute[s, b].tolist()))
            rows.append(row)
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "architecture": spec.name,
            "num_inference_steps": self.num_steps,
            "block_groups": {g.attr: n for g, n in zip(spec.groups, self.group_sizes)},
            "components": {g.attr: list(g.components) for g in spec.groups},
            "recompute": rows,
            "num_cached": self.num_cached(),
            "metadata": self.metadata,
        }

    def save(self, path: str | Path, layout: str = "diffalign") -> Path:
        """Write JSON; ``layout="official"`` writes the ECAD paper's layout instead."""
        path = Path(path)
        if layout == "diffalign":
            data = self.to_dict()
        elif layout == "official":
            data = self.to_official_dict()
        else:
            raise ScheduleError(f"unknown layout {layout!r}; use 'diffalign' or 'official'")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def to_official_dict(self) -> dict[str, Any]:
        spec = self.spec
        sched: dict[str, Any] = {}
        for s in range(self.num_steps):
            step: dict[str, Any] = {}
            b = 0
            for g, n in zip(spec.groups, self.group_sizes):
                for i in range(n):
                    step[f"{g.official_prefix}{i}"] = {
                        key: bool(self.recompute[s, b, slot])
                        for slot, key in enumerate(g.official_components)
                    }
                    b += 1
            sched[f"{s:03d}"] = step
        return {
            "cache_schedule": {
                "num_blocks": self.group_sizes[0],
                "num_inference_steps": self.num_steps,
                "name": self.name,
                "attributes": {},
                "schedule": sched,
            }
        }

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], architecture: str | None = None, source: str = "<dict>"
    ) -> Schedule:
        if not isinstance(data, dict):
            raise ScheduleError(f"{source}: a schedule file must hold a JSON object")
        if "cache_schedule" in data:
            return cls._from_official(data, architecture, source)
        if data.get("format") != FORMAT_NAME:
            raise ScheduleError(
                f"{source}: not a schedule file (expected 'format': {FORMAT_NAME!r} or an official ECAD "
                "'cache_schedule' object)"
            )
        try:
            arch = data["architecture"]
            spec = _spec(arch)
            if architecture is not None and _spec(architecture).name != spec.name:
                raise ScheduleError(f"{source}: schedule is for {spec.name}, expected {architecture}")
            sizes = tuple(int(data["block_groups"][g.attr]) for g in spec.groups)
            rows = data["recompute"]
            bits = [[[c == "1" for c in blk] for blk in row] for row in rows]
            for row in rows:
                for blk in row:
                    if set(blk) - {"0", "1"}:
                        raise ScheduleError(f"{source}: block entries must be strings of 0/1, got {blk!r}")
            rec = torch.tensor(bits, dtype=torch.bool)
            if rec.ndim != 3 or rec.shape[0] != int(data["num_inference_steps"]):
                raise ScheduleError(
                    f"{source}: 'recompute' has {len(rows)} steps, 'num_inference_steps' says "
                    f"{data['num_inference_steps']}"
                )
        except KeyError as err:
            raise ScheduleError(f"{source}: missing key {err}") from err
        except (TypeError, ValueError) as err:
            if isinstance(err, ScheduleError):
                raise
            raise ScheduleError(f"{source}: malformed schedule: {err}") from err
        return cls(
            spec.name, rec, sizes, name=str(data.get("name", "schedule")), metadata=data.get("metadata") or {}
        )

    @classmethod
    def _from_official(cls, data: dict[str, Any], architecture: str | None, source: str) -> Schedule:
        cs = data["cache_schedule"]
        try:
            steps = cs["schedule"]
            n_steps = int(cs["num_inference_steps"])
        except (KeyError, TypeError) as err:
            raise ScheduleError(f"{source}: official ECAD schedule lacks {err}") from err
        step_keys = sorted(steps, key=int)
        if [int(k) for k in step_keys] != list(range(n_steps)):
            raise ScheduleError(f"{source}: steps must be '000'..'{n_steps - 1:03d}', got {step_keys[:3]}...")
        first = steps[step_keys[0]]
        first_comps = set()
        for v in first.values():
            first_comps |= set(v)
        if architecture is None:
            if any(k.startswith("single_") for k in first) or "full_attn" in first_comps:
                architecture = "flux"
            elif "attn2" in first_comps:
                architecture = "pixart"
            else:
                architecture = "dit"
        spec = _spec(architecture)
        sizes = []
        for g in spec.groups:
            if g.official_prefix:
                n = sum(1 for k in first if k.startswith(g.official_prefix))
            else:
                n = sum(1 for k in first if k.isdigit())
            sizes.append(n)
        rec = torch.ones(n_steps, sum(sizes), spec.num_components, dtype=torch.bool)
        for s, key in enumerate(step_keys):
            entry = steps[key]
            b = 0
            for g, n in zip(spec.groups, sizes):
                for i in range(n):
                    bkey = f"{g.official_prefix}{i}"
                    if bkey not in entry:
                        raise ScheduleError(f"{source}: step {key} has no block {bkey!r}")
                    blk = entry[bkey]
                    for slot, comp in enumerate(g.official_components):
                        if comp not in blk:
                            raise ScheduleError(f"{source}: step {key} block {bkey!r} has no {comp!r}")
                        val = blk[comp]
                        if not isinstance(val, bool):
                            raise ScheduleError(
                                f"{source}: step {key} block {bkey!r} {comp!r} is {val!r}; only true/false "
                                "entries are supported (custom compute functions such as TGATE's are not)"
                            )
                        rec[s, b, slot] = val
                    b += 1
        meta = {"source_layout": "official"}
        for k in ("config", "metrics"):
            if k in data:
                meta[k] = data[k]
        return cls(spec.name, rec, tuple(sizes), name=str(cs.get("name", "schedule")), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, architecture: str | None = None) -> Schedule:
        path = Path(path)
        if not path.is_file():
            raise ScheduleError(f"schedule file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ScheduleError(f"{path}: not valid JSON: {err}") from err
        return cls.from_dict(data, architecture, source=str(path))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Schedule)
            and self.architecture == other.architecture
            and self.group_sizes == other.group_sizes
            and torch.equal(self.recompute, other.recompute)
        )

    def __repr__(self) -> str:
        return (
            f"Schedule({self.name!r}, {self.architecture}, steps={self.num_steps}, blocks={self.group_sizes}, "
            f"cached={self.num_cached()}/{int(self.slot_mask.sum()) * self.num_steps})"
        )


# ---------------------------------------------------------------------- heuristic generators


def _resolve(arch_or_transformer, group_sizes_) -> tuple[str, tuple[int, ...]]:
    if isinstance(arch_or_transformer, torch.nn.Module):
        arch = detect_architecture(arch_or_transformer)
        return arch, group_sizes(arch_or_transformer, arch)
    if group_sizes_ is None:
        raise ScheduleError("give group_sizes (blocks per group) when passing an architecture name")
    if isinstance(group_sizes_, int):
        group_sizes_ = (group_sizes_,)
    return _spec(arch_or_transformer).name, tuple(group_sizes_)


def no_cache(arch, num_steps: int, group_sizes: Sequence[int] | int | None = None) -> Schedule:
    """The default: recompute everything at every step."""
    arch, sizes = _resolve(arch, group_sizes)
    spec = _spec(arch)
    rec = torch.ones(num_steps, sum(sizes), spec.num_components, dtype=torch.bool)
    return Schedule(arch, rec, sizes, name="no_cache")


def fora(
    arch, num_steps: int, every: int, group_sizes=None, components: Sequence[int] | None = None
) -> Schedule:
    """FORA-style: recompute (the chosen components of) every block on steps 0, N, 2N, ...; reuse otherwise."""
    if every < 1:
        raise ScheduleError(f"every must be >= 1, got {every}")
    sched = no_cache(arch, num_steps, group_sizes)
    slots = list(range(sched.num_components)) if components is None else list(components)
    for s in range(num_steps):
        if s % every:
            sched.recompute[s][:, slots] = False
    sched.name = f"fora_every_{every}" + ("" if components is None else "_c" + "".join(map(str, slots)))
    return sched


def tgate(arch, num_steps: int, gate_step: int, group_sizes=None, component: str = "attn2") -> Schedule:
    """TGATE-style: cross-attention (``component``) is computed until ``gate_step`` and reused afterwards."""
    sched = no_cache(arch, num_steps, group_sizes)
    spec = sched.spec
    slot = None
    for g in spec.groups:
        if component in g.components:
            slot = g.components.index(component)
    if slot is None:
        raise ScheduleError(f"{spec.name} blocks have no {component!r} component ({spec.component_labels()})")
    sched.recompute[gate_step:, :, slot] = False
    sched.name = f"tgate_{component}_from_{gate_step}"
    return sched


def evenly_spaced(
    arch,
    num_steps: int,
    num_blocks_cached: int,
    num_steps_cached: int,
    component: int,
    group_sizes=None,
) -> Schedule:
    """Reuse one component slot in ``num_blocks_cached`` evenly spaced blocks over ``num_steps_cached``
    centred steps (step 0 excluded, since it always recomputes)."""
    sched = no_cache(arch, num_steps, group_sizes)
    nb, nc = sched.num_blocks, sched.num_components
    if not 0 <= component < nc:
        raise ScheduleError(f"component slot {component} out of range 0..{nc - 1}")
    k = max(0, min(num_blocks_cached, nb))
    m = max(0, min(num_steps_cached, num_steps - 1))
    blocks = (
        sorted({round(i * (nb - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else ([nb // 2] if k else [])
    )
    start = 1 + (num_steps - 1 - m) // 2
    for s in range(start, start + m):
        sched.recompute[s, blocks, component] = False
    label = sched.spec.component_labels()[component]
    sched.name = f"even_{label}_{k}blocks_{m}steps"
    return sched


def heuristic_population(arch, num_steps: int, group_sizes=None, size: int | None = None) -> list[Schedule]:
    """ECAD-style initial population: the default, FORA every-N, TGATE variants and evenly spaced grids.

    Returned in a fixed order and de-duplicated; ``size`` truncates (the search fills any remainder with
    random schedules).
    """
    arch, sizes = _resolve(arch, group_sizes)
    spec = _spec(arch)
    out = [no_cache(arch, num_steps, sizes)]
    for n in (2, 3, 4, 5, 7, 10, 20):
        if n < num_steps:
            out.append(fora(arch, num_steps, n, sizes))
    attn_slots = [i for i, lab in enumerate(spec.component_labels()) if "attn" in lab]
    if attn_slots and spec.num_components > 1:
        for n in (2, 3):
            if n < num_steps:
                out.append(fora(arch, num_steps, n, sizes, components=attn_slots))
    if any("attn2" in g.components for g in spec.groups):
        for frac in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
            gate = max(1, math.floor(frac * num_steps))
            out.append(tgate(arch, num_steps, gate, sizes))
    nb = sum(sizes)
    for comp in range(spec.num_components):
        for kb in sorted({max(1, nb // 4), max(1, nb // 2), nb}):
            for ms in sorted({max(1, num_steps // 2), max(1, (3 * num_steps) // 4)}):
                out.append(evenly_spaced(arch, num_steps, kb, ms, comp, sizes))
    unique: list[Schedule] = []
    for s in out:
        if not any(torch.equal(s.recompute, u.recompute) for u in unique):
            unique.append(s)
    return unique[:size] if size is not None else unique
