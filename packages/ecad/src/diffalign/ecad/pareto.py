"""Pareto-front utilities for minimisation problems with inequality constraints (``G <= 0`` is feasible)."""

from __future__ import annotations

import numpy as np

__all__ = ["dominates", "non_dominated_mask", "feasible_mask", "hypervolume_2d"]


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` Pareto-dominates ``b`` (all objectives <=, at least one <); both minimised."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return bool(np.all(a <= b) and np.any(a < b))


def feasible_mask(G: np.ndarray | None, n: int) -> np.ndarray:
    if G is None:
        return np.ones(n, dtype=bool)
    G = np.asarray(G, float).reshape(n, -1)
    return np.all(G <= 0, axis=1)


def non_dominated_mask(F: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
    """Mask of the feasible points no other feasible point dominates. Exact duplicates are all kept.

    O(n log n) for two objectives (sort by f0 then f1 and sweep), O(n^2) otherwise.
    """
    F = np.asarray(F, float)
    n = len(F)
    feas = feasible_mask(G, n)
    mask = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(feas)
    if idx.size == 0:
        return mask
    Ff = F[idx]
    if Ff.shape[1] == 2:
        order = np.lexsort((Ff[:, 1], Ff[:, 0]))
        best_f1 = np.inf
        prev = None
        mask_prev = False
        for i in order:
            f0, f1 = Ff[i]
            if prev is not None and f0 == prev[0] and f1 == prev[1]:
                mask[idx[i]] = mask_prev
                continue
            # every earlier point has f0 <= this f0; it dominates iff its f1 <= f1 (and not identical)
            mask_prev = f1 < best_f1
            mask[idx[i]] = mask_prev
            best_f1 = min(best_f1, f1)
            prev = (f0, f1)
        return mask
    for a in range(len(Ff)):
        mask[idx[a]] = not any(dominates(Ff[b], Ff[a]) for b in range(len(Ff)) if b != a)
    return mask


def hypervolume_2d(F: np.ndarray, ref: tuple[float, float]) -> float:
    """Area dominated by the points of ``F`` (two minimised objectives) and bounded by ``ref``."""
    F = np.asarray(F, float)
    F = F[np.all(F < np.asarray(ref), axis=1)]
    if len(F) == 0:
        return 0.0
    F = F[non_dominated_mask(F)]
    F = F[np.argsort(F[:, 0])]
    area, prev_f1 = 0.0, ref[1]
    for f0, f1 in F:
        if f1 < prev_f1:
            area += (ref[0] - f0) * (prev_f1 - f1)
            prev_f1 = f1
    return float(area)
