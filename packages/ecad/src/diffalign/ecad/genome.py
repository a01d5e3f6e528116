"""The search genome and the structured variation operators of the schedule search.

Genome: only the bits the hooks can act on, i.e. the *effective* schedule without step 0 (which always
recomputes) and without component slots a block does not have. Two schedules that run the same way
therefore have the same genome, so duplicates are recognised on what actually executes.

Operators work on the ``[steps, blocks, components]`` structure instead of the flat bit string:

* :class:`ComponentCrossover` builds each child from two parents by taking, unit by unit, either
  parent's bits, where a unit is one (block, component) track over all steps, one step, or one
  component slot over everything (drawn per mating). One-point crossover on a step-major genome can
  only swap step ranges; this can hand attention from one parent and feed-forward from the other.
* :class:`StructuredMutation` changes every child by one move: set a random (component, block range,
  step range) box to recompute or reuse, toggle one component track, or flip a few single bits.
"""

from __future__ import annotations

import numpy as np
import torch
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation

from .schedule import Schedule, ScheduleError

__all__ = ["GenomeCodec", "ComponentCrossover", "StructuredMutation"]


class GenomeCodec:
    """Maps schedules of one template (architecture, blocks, steps) to genomes and back."""

    def __init__(self, template: Schedule):
        self.template = template
        self.shape = tuple(template.recompute.shape)
        mask = template.slot_mask.unsqueeze(0).expand(self.shape).clone()
        mask[0] = False  # step 0 always recomputes
        self.mask = mask
        idx = mask.nonzero()  # [n_var, 3] (step, block, component), row-major order
        self.step = idx[:, 0].numpy()
        self.block = idx[:, 1].numpy()
        self.component = idx[:, 2].numpy()
        self.n_var = int(idx.shape[0])
        if self.n_var == 0:
            raise ScheduleError("a schedule with a single step has nothing to cache")

    def encode(self, schedule: Schedule) -> np.ndarray:
        if (
            tuple(schedule.recompute.shape) != self.shape
            or schedule.architecture != self.template.architecture
        ):
            raise ScheduleError(
                f"schedule {schedule.name!r} ({schedule.architecture} {tuple(schedule.recompute.shape)}) does "
                f"not fit the search template ({self.template.architecture} {self.shape})"
            )
        return schedule.effective()[self.mask].numpy().astype(bool)

    def decode(self, genome, name: str = "candidate") -> Schedule:
        g = torch.as_tensor(np.asarray(genome, dtype=bool))
        if g.numel() != self.n_var:
            raise ScheduleError(f"genome has {g.numel()} bits, the search template needs {self.n_var}")
        rec = torch.ones(self.shape, dtype=torch.bool)
        rec[self.mask] = g.flatten()
        return Schedule(
            self.template.architecture, rec & self.template.slot_mask, self.template.group_sizes, name
        )

    def units(self, kind: str) -> np.ndarray:
        """Unit id of every gene: ``track`` = (block, component), ``step``, or ``component``."""
        if kind == "track":
            return self.block * self.shape[2] + self.component
        if kind == "step":
            return self.step
        if kind == "component":
            return self.component
        raise ValueError(kind)


class ComponentCrossover(Crossover):
    """Two parents -> two complementary children, mixing whole units (see module docstring)."""

    KINDS = ("track", "step", "component")

    def __init__(self, codec: GenomeCodec, prob: float = 0.9, **kwargs):
        super().__init__(2, 2, prob=prob, **kwargs)
        self.codec = codec
        self.unit_ids = {k: codec.units(k) for k in self.KINDS}

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        _, n_matings, n_var = X.shape
        out = np.empty((2, n_matings, n_var), dtype=X.dtype)
        for m in range(n_matings):
            ids = self.unit_ids[self.KINDS[random_state.integers(len(self.KINDS))]]
            from_a = random_state.random(int(ids.max()) + 1) < 0.5
            take = from_a[ids]
            out[0, m] = np.where(take, X[0, m], X[1, m])
            out[1, m] = np.where(take, X[1, m], X[0, m])
        return out


class StructuredMutation(Mutation):
    """Every child gets one move: a box set to one value, a track toggled, or a few bits flipped."""

    def __init__(self, codec: GenomeCodec, prob: float = 1.0, **kwargs):
        super().__init__(prob=prob, **kwargs)
        self.codec = codec

    def _box(self, x: np.ndarray, rs) -> None:
        c = self.codec
        steps, blocks = c.shape[0], c.shape[1]
        comp = rs.choice(np.unique(c.component))
        b0 = rs.integers(blocks)
        b1 = min(blocks, b0 + 1 + rs.integers(max(1, blocks // 2)))
        s0 = 1 + rs.integers(steps - 1)
        s1 = min(steps, s0 + 1 + rs.integers(max(1, (steps - 1) // 2)))
        sel = (c.component == comp) & (c.block >= b0) & (c.block < b1) & (c.step >= s0) & (c.step < s1)
        x[sel] = bool(rs.random() < 0.5)

    def _track(self, x: np.ndarray, rs) -> None:
        ids = self.codec.units("track")
        sel = ids == rs.choice(np.unique(ids))
        x[sel] = ~x[sel]

    def _bits(self, x: np.ndarray, rs) -> None:
        k = 1 + rs.integers(3)
        idx = rs.choice(len(x), size=min(k, len(x)), replace=False)
        x[idx] = ~x[idx]

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        Xp = np.array(X, dtype=bool, copy=True)
        moves = (self._box, self._track, self._bits)
        for i in range(len(Xp)):
            before = Xp[i].copy()
            for _ in range(8):  # a box may already hold the value it sets: retry until the child changes
                moves[random_state.integers(len(moves))](Xp[i], random_state)
                if not np.array_equal(Xp[i], before):
                    break
        return Xp
