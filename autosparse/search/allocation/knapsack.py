"""Exact budgeted allocation: a multiple-choice knapsack solved as a MILP (HiGHS via scipy).

Binary ``x[d, o]`` (decision d takes option o), one option per decision::

    minimise   sum w[d][o] x[d,o]   (+ a tie-break 1e-6 x the normalised cost, so that among
                                      allocations of equal predicted loss the cheaper one wins)
    subject to sum_o x[d,o] = 1                              for every decision d
               fixed[k] + sum c_k[d][o] x[d,o] <= budget_k   for the objective and extra budgets
               sum_d x[d, e_d] <= D - 1                      for every excluded allocation e
               sum_d sum_{o in B_d} x[d,o] <= D - 1          for every forbidden box B
               sum w[d][o] x[d,o] <= max_weight              (optional: a predicted-drop cap)

The exclusion rows are no-good cuts: each forbids exactly one allocation, so a planner can ask for
"the best allocation not tried yet"; a box (one option set per decision) forbids every allocation
whose options all lie in their decision's set (e.g. everything compressing at least as hard as
an allocation that turned out infeasible). Only excluded allocations that fit the budgets get a
cut (the others cannot be chosen anyway): cuts are weak rows, and each one slows HiGHS down; and
the first solve has no cuts at all (see :func:`_milp`). Constraint rows are scaled by their budget
so HiGHS's absolute tolerances mean the same for kB and for BOPs; the answer is re-checked in
float64.
"""

from __future__ import annotations

import itertools
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from autosparse.search.allocation.problem import Allocation, AllocationProblem

Weights = Sequence[Sequence[float]]
TIEBREAK = 1e-6
_REL_TOL = 1e-9  # budget slack allowed when re-checking a solution (and in brute force)


def _budgets(objective: str | None, budget: float | None,
             extra_budgets: Mapping[str, float] | None) -> dict[str, float]:
    out = dict(extra_budgets or {})
    if objective is not None:
        out[objective] = min(float(budget),  # type: ignore[arg-type]
                             out.get(objective, float("inf")))
    return out


def _check_weights(problem: AllocationProblem, weights: Weights) -> None:
    if [len(w) for w in weights] != [len(o) for o in problem.options]:
        raise ValueError(f"weights must have one value per option of each decision "
                         f"(shape {[len(o) for o in problem.options]})")


def _fits(problem: AllocationProblem, allocation: Sequence[int],
          budgets: Mapping[str, float]) -> bool:
    return all(problem.total(k, allocation) <= b + _REL_TOL * max(1.0, abs(b))
               for k, b in budgets.items())


def _tiebreak_costs(problem: AllocationProblem, objective: str | None) -> np.ndarray:
    """Per option, its share of the dense model's cost (sums to about 1 over an allocation)."""
    names = [objective] if objective is not None else list(problem.objectives)
    flat = np.zeros(sum(len(o) for o in problem.options))
    for name in names:
        dense = abs(problem.dense[name]) or 1.0
        flat += np.concatenate([np.asarray(row, float) for row in problem.costs[name]]) / dense
    return flat / max(1, len(names))


Box = Sequence[Collection[int]]  # per decision, a set of option indices


def _boxes(problem: AllocationProblem, exclude: Iterable[Sequence[int]],
           forbid: Iterable[Box]) -> list[tuple[frozenset[int], ...]]:
    out = []
    for e in exclude:
        problem.check(e)
        out.append(tuple(frozenset([int(o)]) for o in e))
    for box in forbid:
        box = tuple(frozenset(int(o) for o in s) for s in box)
        if len(box) != len(problem.options):
            raise ValueError(f"a forbidden box needs one option set per decision "
                             f"({len(problem.options)}), got {len(box)}")
        out.append(box)
    return out


def _forbidden(allocation: Sequence[int], boxes: Sequence[Sequence[Collection[int]]]) -> bool:
    return any(all(o in s for o, s in zip(allocation, box)) for box in boxes)


def _milp(problem: AllocationProblem, cost: np.ndarray, rows: list[tuple[np.ndarray, float]],
          boxes: list[tuple[frozenset[int], ...]]) -> Allocation | None:
    """Lazily cut: the optimum without cuts is the answer unless a cut forbids it (usual in a
    planner, whose exclusions are mostly far from the current optimum); only then add them all."""
    first = _milp_once(problem, cost, rows, [])
    if first is None or not _forbidden(first, boxes):
        return first
    return _milp_once(problem, cost, rows, boxes)


def _milp_once(problem: AllocationProblem, cost: np.ndarray, rows: list[tuple[np.ndarray, float]],
               cuts: list[tuple[frozenset[int], ...]]) -> Allocation | None:
    sizes = [len(o) for o in problem.options]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    n, D = int(sum(sizes)), len(sizes)
    one = np.zeros((D, n))
    for d, (s, k) in enumerate(zip(starts, sizes)):
        one[d, s:s + k] = 1.0
    constraints = [LinearConstraint(one, 1.0, 1.0)]
    if rows:
        A = np.vstack([r for r, _ in rows])
        ub = np.asarray([b for _, b in rows])
        constraints.append(LinearConstraint(A, -np.inf, ub))
    if cuts:
        A = np.zeros((len(cuts), n))
        for i, box in enumerate(cuts):
            for d, allowed in enumerate(box):
                A[i, starts[d] + np.asarray(sorted(allowed), int)] = 1.0
        constraints.append(LinearConstraint(A, -np.inf, D - 1))
    result = milp(cost, constraints=constraints, integrality=np.ones(n),
                  bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if result.x is None or result.status not in (0,):
        return None
    x = np.round(result.x).astype(int)
    return tuple(int(np.argmax(x[s:s + k])) for s, k in zip(starts, sizes))


def _budget_rows(problem: AllocationProblem, budgets: Mapping[str, float]):
    rows = []
    for name, b in budgets.items():
        row = np.concatenate([np.asarray(r, float) for r in problem.costs_of(name)])
        rhs = float(b) - problem.fixed[name]
        scale = max(abs(rhs), float(np.abs(row).max(initial=0.0)), 1e-300)
        rows.append((row / scale, rhs / scale))
    return rows


def _weight_row(weights: Weights, max_weight: float) -> tuple[np.ndarray, float]:
    w = np.concatenate([np.asarray(row, float) for row in weights])
    scale = max(abs(max_weight), float(np.abs(w).max(initial=0.0)), 1e-300)
    return w / scale, max_weight / scale


def _weight_ok(weights: Weights, allocation: Sequence[int], max_weight: float | None) -> bool:
    return max_weight is None or allocation_weight(weights, allocation) <= (
        max_weight + _REL_TOL * max(1.0, abs(max_weight)))


def solve(problem: AllocationProblem, weights: Weights, objective: str | None,
          budget: float | None, *, exclude: Iterable[Sequence[int]] = (),
          extra_budgets: Mapping[str, float] | None = None, forbid: Iterable[Box] = (),
          max_weight: float | None = None) -> Allocation | None:
    """The option per decision minimising the summed ``weights`` within ``budget`` of
    ``objective`` (total, fixed part included; ``objective`` None: no such budget) and every
    ``extra_budgets`` entry, never one of the ``exclude`` allocations nor in a ``forbid`` box,
    with summed weights <= ``max_weight`` when given; None when no allocation is feasible."""
    _check_weights(problem, weights)
    budgets = _budgets(objective, budget, extra_budgets)
    exclude = [e for e in map(tuple, exclude) if _fits(problem, e, budgets)  # others can't win
               and _weight_ok(weights, e, max_weight)]
    boxes = _boxes(problem, exclude, forbid)
    w = np.concatenate([np.asarray(row, float) for row in weights])
    scale = float(np.abs(w).max(initial=0.0)) or 1.0
    cost = w + TIEBREAK * scale * _tiebreak_costs(problem, objective)
    rows = _budget_rows(problem, budgets)
    if max_weight is not None:
        rows.append(_weight_row(weights, max_weight))
    allocation = _milp(problem, cost, rows, boxes)
    if (allocation is None or not _fits(problem, allocation, budgets)
            or _forbidden(allocation, boxes) or not _weight_ok(weights, allocation, max_weight)):
        return None
    return allocation


def cheapest(problem: AllocationProblem, weights: Weights, objective: str, max_weight: float, *,
             exclude: Iterable[Sequence[int]] = (),
             extra_budgets: Mapping[str, float] | None = None,
             forbid: Iterable[Box] = ()) -> Allocation | None:
    """The dual question: the allocation of least ``objective`` cost whose summed ``weights``
    (predicted loss) is at most ``max_weight``, within ``extra_budgets`` and outside the
    ``forbid`` boxes; None if there is none."""
    _check_weights(problem, weights)
    budgets = _budgets(None, None, extra_budgets)
    w = np.concatenate([np.asarray(row, float) for row in weights])
    c = np.concatenate([np.asarray(row, float) for row in problem.costs_of(objective)])
    c_scale = float(np.abs(c).max(initial=0.0)) or 1.0
    w_scale = max(abs(max_weight), float(np.abs(w).max(initial=0.0)), 1e-300)
    rows = _budget_rows(problem, budgets) + [(w / w_scale, max_weight / w_scale)]
    limit = max_weight + _REL_TOL * max(1.0, abs(max_weight))
    exclude = [e for e in map(tuple, exclude)
               if _fits(problem, e, budgets) and allocation_weight(weights, e) <= limit]
    boxes = _boxes(problem, exclude, forbid)
    allocation = _milp(problem, c / c_scale + TIEBREAK * w / w_scale, rows, boxes)
    if allocation is None or not _fits(problem, allocation, budgets) or _forbidden(allocation,
                                                                                    boxes):
        return None
    if allocation_weight(weights, allocation) > limit:
        return None
    return allocation


def brute_force(problem: AllocationProblem, weights: Weights, objective: str, budget: float, *,
                exclude: Iterable[Sequence[int]] = (),
                extra_budgets: Mapping[str, float] | None = None) -> Allocation | None:
    """:func:`solve` by enumeration (tests only: the product of the option counts)."""
    _check_weights(problem, weights)
    budgets = _budgets(objective, budget, extra_budgets)
    excluded = {tuple(e) for e in exclude}
    best, best_key = None, None
    for allocation in itertools.product(*(range(len(o)) for o in problem.options)):
        if allocation in excluded or not _fits(problem, allocation, budgets):
            continue
        key = (sum(weights[d][o] for d, o in enumerate(allocation)),
               problem.total(objective, allocation))
        if best_key is None or key < best_key:
            best, best_key = allocation, key
    return best


def allocation_weight(weights: Weights, allocation: Sequence[int]) -> float:
    return float(sum(weights[d][o] for d, o in enumerate(allocation)))
