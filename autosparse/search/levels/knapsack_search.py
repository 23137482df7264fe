"""Sensitivity knapsack (AutoQuantize / EvoPress's integer program), then a sweep around it.

Why: per-layer sensitivities (each layer alone at a level, the rest dense) are cheap from the level
database, and if damage were additive the best assignment would be the multiple-choice knapsack
over them, solved exactly by a MILP (HiGHS via ``scipy.optimize.milp``; the same form as
:mod:`autosparse.search.allocation.knapsack`, written again over levels so this package needs
none of the small-model space)::

    minimise    sum_{l,i} w[l][i] x[l,i]  -  1e-6 |w|max * sum c[l][i] x[l,i] / budget
    subject to  sum_i x[l,i] = 1                          for every layer l
                sum_{l,i} c[l][i] x[l,i] <= budget
                sum_l x[l, e_l] <= L - 1                  for every excluded assignment e

The tie-break prefers, among assignments of equal predicted loss, the one that spends more of the
budget (less compression). Damage is not additive (errors compound through the residual stream),
so the prediction's first answer is worth one evaluation, and the rest of the evaluation budget
goes to assignments the model ranks near it::

    x = solve(w); score(x)
    for r = 1, 2, ... while evaluations remain:
        w' = w (r % 3 == 1) | w * exp(sigma_r z) (r % 3 == 2) | w ** gamma_r (r % 3 == 0)
        score(solve(w', excluding everything scored))     # always a new assignment

``r % 3 == 1`` walks the prediction's k-best list; lognormal noise (sigma grows 0.1, 0.2, ... to
0.8) stands for sensitivity measurement noise; a power ``gamma`` (0.5, 2, 0.75, 1.5, ...)
reweights large against small sensitivities, a crude model of compounding. Budgets are not
scaled down: with a maximum on cost and fitness that worsens with compression, a smaller budget
only gives a worse candidate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from autosparse.search.levels.problem import (
    Evaluate,
    Index,
    Ledger,
    LevelProblem,
    LevelSearchResult,
    check_search_args,
)

if TYPE_CHECKING:
    from autosparse.compress.oneshot.levels import Level

Sensitivity = Mapping[tuple[str, str], float]  # (layer, level.key) -> predicted loss
TIEBREAK = 1e-6
_GAMMAS = (0.5, 2.0, 0.75, 1.5, 0.33, 3.0)


def sensitivity_weights(problem: LevelProblem, sensitivity: Sensitivity) -> list[list[float]]:
    """``w[l][i]`` from ``sensitivity[(layer, key)]``; a dense level may be absent (0). Raises
    ValueError naming the first other missing or non-finite entry."""
    out = []
    for name, row in zip(problem.layers, problem.options):
        weights = []
        for level in row:
            value = sensitivity.get((name, level.key))
            if value is None and level.is_dense:
                value = 0.0
            if value is None or not math.isfinite(float(value)):
                raise ValueError(f"sensitivity has no finite entry for ({name!r}, "
                                 f"{level.key!r}), got {value!r}")
            weights.append(float(value))
        out.append(weights)
    return out


def solve(problem: LevelProblem, weights: Sequence[Sequence[float]], *,
          exclude: Iterable[Sequence[int]] = ()) -> Index | None:
    """The fitting assignment of least summed ``weights`` (tie: the costlier), never one in
    ``exclude``; None when none is left."""
    if [len(w) for w in weights] != [len(o) for o in problem.options]:
        raise ValueError(f"weights must have one value per level of each layer "
                         f"(shape {[len(o) for o in problem.options]})")
    sizes = [len(o) for o in problem.options]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    n, layers = int(sum(sizes)), len(sizes)
    w = np.concatenate([np.asarray(row, float) for row in weights])
    c = np.concatenate([np.asarray(row, float) for row in problem.cost])
    c_scale = max(abs(problem.budget), float(np.abs(c).max(initial=0.0)), 1e-300)
    w_scale = float(np.abs(w).max(initial=0.0)) or 1.0
    objective = w - TIEBREAK * w_scale * c / c_scale / max(1, layers)
    one = np.zeros((layers, n))
    for layer, (s, k) in enumerate(zip(starts, sizes)):
        one[layer, s:s + k] = 1.0
    cuts = [tuple(e) for e in exclude if problem.fits(e)]  # the others cannot be chosen anyway
    rows = [LinearConstraint(one, 1.0, 1.0)]
    if cuts:
        a = np.zeros((len(cuts), n))
        for row, e in enumerate(cuts):
            a[row, starts + np.asarray(e, int)] = 1.0
        rows.append(LinearConstraint(a, -np.inf, layers - 1))
    # HiGHS meets rows to ~1e-7 (scaled); an answer a hair over the budget is solved again
    # with the budget pulled in by that much, so that what comes back fits in exact float64
    for pull in (0.0, 1e-6):
        limit = (problem.limit - pull * c_scale) / c_scale
        budget_row = LinearConstraint((c / c_scale)[None, :], -np.inf, limit)
        result = milp(objective, constraints=[*rows, budget_row], integrality=np.ones(n),
                      bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
        if result.x is None or result.status != 0:
            return None
        x = np.round(result.x).astype(int)
        index = tuple(int(np.argmax(x[s:s + k])) for s, k in zip(starts, sizes))
        if problem.fits(index) and index not in set(cuts):
            return index
    return None


def brute_force(problem: LevelProblem, weights: Sequence[Sequence[float]]) -> Index | None:
    """:func:`solve` by enumeration (tests only: the product of the option counts)."""
    best, best_key = None, None
    for index in itertools.product(*(range(len(o)) for o in problem.options)):
        if not problem.fits(index):
            continue
        key = (sum(weights[layer][i] for layer, i in enumerate(index)), -problem.total(index))
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best


def predicted(weights: Sequence[Sequence[float]], index: Sequence[int]) -> float:
    return float(sum(weights[layer][i] for layer, i in enumerate(index)))


def _variant(weights: np.ndarray, r: int, rng: np.random.Generator) -> np.ndarray:
    """The sweep's r-th sensitivity table (module docstring)."""
    kind = r % 3
    if kind == 1:
        return weights
    if kind == 2:
        sigma = min(0.8, 0.1 * (r // 3 + 1))
        return weights * np.exp(sigma * rng.standard_normal(weights.shape))
    gamma = _GAMMAS[(r // 3 - 1) % len(_GAMMAS)]
    positive = np.maximum(weights, 0.0)
    scale = float(positive.max(initial=0.0)) or 1.0
    return (positive / scale) ** gamma


def knapsack(layers: Sequence[str], options: Mapping[str, Sequence[Level]],
             cost: Mapping[str, Sequence[float]], evaluate: Evaluate, budget: float,
             evaluations: int, seed: int = 0, *, sensitivity: Sensitivity) -> LevelSearchResult:
    """The sensitivity knapsack's assignment, then its sweep, best scored returned.

    ``info``: ``first`` (the plain knapsack's assignment and fitness), ``predicted`` (summed
    sensitivity of the best), ``exhausted`` (True when every fitting assignment was scored).
    """
    check_search_args(evaluate, evaluations, seed)
    problem = LevelProblem.build(layers, options, cost, budget)
    ledger = Ledger(problem, evaluate, evaluations)
    table = sensitivity_weights(problem, sensitivity)
    rng = np.random.default_rng(seed)
    first = solve(problem, table)
    assert first is not None  # LevelProblem.build checked that something fits
    info: dict = {"first": {"assignment": problem.assignment(first),
                            "fitness": ledger.score(first)}}
    scored: list[Index] = [first]
    exhausted, r = False, 0
    flat = [np.asarray(row, float) for row in table]
    while ledger.can_pay() and not exhausted:
        r += 1
        variant = [list(row) for row in _ragged_variant(flat, r, rng)]
        nxt = solve(problem, variant, exclude=scored)
        if nxt is None:
            if r % 3 == 1:  # the plain table found nothing new: every fitting one was scored
                exhausted = True
            continue
        ledger.score(nxt)
        scored.append(nxt)
    result = ledger.result("knapsack", info)
    best = problem.index_of(result.assignment)
    result.info.update(predicted=predicted(table, best), exhausted=exhausted, solves=r + 1)
    return result


def _ragged_variant(rows: list[np.ndarray], r: int, rng: np.random.Generator
                    ) -> list[np.ndarray]:
    """:func:`_variant` over per-layer rows of different lengths (one flat draw)."""
    out = _variant(np.concatenate(rows), r, rng)
    cuts = np.cumsum([len(row) for row in rows])[:-1]
    return np.split(out, cuts)
