"""Pareto fronts and hypervolume on plain arrays (numpy + moocore; no optuna, no torch).

Values are given in the objectives' own units with one direction per column ("maximize" or
"minimize"); everything is converted to minimisation internally. Rows with NaN, and rows marked
infeasible, are never on a front and add no hypervolume.
"""

from __future__ import annotations

from typing import Sequence

import moocore
import numpy as np

__all__ = ["pareto_mask", "hypervolume", "hypervolume_history", "nondominated_rank"]


def _signs(directions: Sequence, k: int) -> np.ndarray:
    """+1 for minimised columns, -1 for maximised ones (accepts strings or StudyDirection)."""
    if len(directions) != k:
        raise ValueError(f"directions has {len(directions)} entries for {k} objective columns")
    signs = []
    for d in directions:
        name = str(getattr(d, "name", d)).lower()
        if name not in ("maximize", "minimize"):
            raise ValueError(f"direction {d!r} must be 'maximize' or 'minimize'")
        signs.append(-1.0 if name == "maximize" else 1.0)
    return np.asarray(signs)


def _as_2d(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:
        arr = arr.reshape(0, 0) if arr.size == 0 else arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"values must be a 2-D array (points x objectives), got shape {arr.shape}")
    return arr


def _usable(arr: np.ndarray, feasible) -> np.ndarray:
    ok = ~np.isnan(arr).any(axis=1)
    if feasible is not None:
        feasible = np.asarray(feasible, dtype=bool)
        if feasible.shape != (len(arr),):
            raise ValueError(f"feasible must have shape ({len(arr)},), got {feasible.shape}")
        ok &= feasible
    return ok


def pareto_mask(values, directions: Sequence, feasible=None) -> np.ndarray:
    """True for the non-dominated rows among the feasible, non-NaN ones.

    Duplicates of a front point are all on the front; infeasible rows never are.
    """
    arr = _as_2d(values)
    mask = np.zeros(len(arr), dtype=bool)
    if len(arr) == 0:
        return mask
    signs = _signs(directions, arr.shape[1])
    ok = _usable(arr, feasible)
    if ok.any():
        mask[ok] = moocore.is_nondominated(arr[ok] * signs, keep_weakly=True)
    return mask


def _hv2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume (minimisation) by a sweep over x; points must dominate ``ref``."""
    if len(points) == 0:
        return 0.0
    order = np.lexsort((points[:, 1], points[:, 0]))
    area, best_y = 0.0, ref[1]
    for x, y in points[order]:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(area)


def _hv_min(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of minimisation points; keeps only those strictly dominating ``ref``."""
    points = points[(points < ref).all(axis=1)] if len(points) else points
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    if points.shape[1] == 2:
        return _hv2d(points, ref)
    return float(moocore.hypervolume(points, ref=ref))


def hypervolume(values, directions: Sequence, reference) -> float:
    """Hypervolume of ``values`` (n, k) w.r.t. ``reference`` (k,), both in the objectives' units.

    Points that do not strictly dominate the reference (and NaN rows) contribute nothing.
    Exact sweep for k == 2, ``moocore.hypervolume`` for k >= 3.
    """
    arr = _as_2d(values)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if len(arr) == 0:
        return 0.0
    if ref.shape != (arr.shape[1],):
        raise ValueError(f"reference has shape {ref.shape}, expected ({arr.shape[1]},)")
    signs = _signs(directions, arr.shape[1])
    arr = arr[_usable(arr, None)]
    return _hv_min(arr * signs, ref * signs)


def hypervolume_history(values, directions: Sequence, reference, feasible=None) -> list[float]:
    """Hypervolume of the first i rows for i = 1..n (rows in trial order).

    Infeasible and NaN rows add nothing. Incremental: the running front is kept, and the volume is
    recomputed only when a new row enters it.
    """
    arr = _as_2d(values)
    if len(arr) == 0:
        return []
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape != (arr.shape[1],):
        raise ValueError(f"reference has shape {ref.shape}, expected ({arr.shape[1]},)")
    signs = _signs(directions, arr.shape[1])
    ok = _usable(arr, feasible)
    points, ref = arr * signs, ref * signs
    front = np.empty((0, arr.shape[1]))
    current, history = 0.0, []
    for i in range(len(points)):
        p = points[i]
        if ok[i] and (p < ref).all() and not (front <= p).all(axis=1).any():
            keep = ~(p <= front).all(axis=1)
            front = np.vstack([front[keep], p])
            current = _hv_min(front, ref)
        history.append(current)
    return history


def nondominated_rank(point, others, directions: Sequence) -> int:
    """Non-dominated rank of ``point`` among ``others`` plus itself: 0 on the first front,
    1 on the front left after removing the first, and so on (NaN rows of ``others`` ignored).

    The multi-fidelity promotion rule: a short fine-tune's result is promoted to the full one
    when its rank among all short results is small, judged on every objective at once rather
    than on one scalar.
    """
    p = np.asarray(point, dtype=float).reshape(1, -1)
    arr = _as_2d(others) if len(others) else np.zeros((0, p.shape[1]))
    if arr.shape[1:] != p.shape[1:] and len(arr):
        raise ValueError(f"point has {p.shape[1]} objectives, others have {arr.shape[1]}")
    arr = arr[~np.isnan(arr).any(axis=1)]
    signs = _signs(directions, p.shape[1])
    remaining = np.vstack([p, arr]) * signs  # row 0 is the point, all minimised
    index = np.arange(len(remaining))
    rank = 0
    while True:
        dominated = np.array([
            bool(np.any(np.all(remaining <= row, axis=1) & np.any(remaining < row, axis=1)))
            for row in remaining])
        if not dominated[0]:  # the point stays row 0 while it is dominated
            return rank
        remaining, index = remaining[dominated], index[dominated]
        rank += 1
