"""Which budgets to fine-tune at: a sweep before any trial, then the front's largest gap.

Seeds (no trial yet; predictor = the prior). For each cost objective k, with n_k seeds::

    drop_j   = max_drop * ((j + 1) / n_k)^2                    j = 0 .. n_k - 1
    budget_j = cost_k of cheapest(allocation with predicted drop <= drop_j)
    seed_j   = solve(weights, k, budget_j, exclude=dense + seeds so far, extra_budgets=constraints)
    order    = round-robin over the objectives: (k0, j0), (k1, j0), (k0, j1), ...

so the budgets run from near the dense cost down to where the predicted drop reaches
``max_drop``, squeezed toward the near-lossless end (the lead's pilot: budgets spread evenly in
log-size spent a third of the fine-tunes far from the knee).

Next (after trials). Refit the predictor on the finished trials, then for objective k (round-robin
over trials so far)::

    front  = non-dominated (cost_k, drop) of finished trials with drop <= near_lossless,
             plus the dense model (dense cost, 0) and a low anchor (the cheapest trial past the
             region, or the predicted cost at which the drop reaches near_lossless)
    gap    = between neighbours on the front, log(c_hi / c_lo) x (drop_lo - drop_hi): the area
             a new point could add to the front's hypervolume, divided by 1 + the number of
             trials already inside it (dominated tries: the predictor is wrong there)
    budget = sqrt(c_lo c_hi) of the largest gap (the next gap if that budget has nothing new)
    next   = solve(refit weights, k, budget, exclude=dense + every allocation tried or in flight)

Constraints ``metric <= bound`` on additive metrics (size_kb, macs, bops, latency_ms, energy_uj,
bits_per_weight with oneshot; ``sparsity >= s`` as a kept share <= 1 - s)
become extra MILP budgets; ``accuracy_drop <= bound`` caps ``max_drop`` and ``near_lossless``.
Other constraints are left to the study (their trials are scored and marked infeasible as usual).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from autosparse.config.hardware import HardwareProfile
from autosparse.config.objectives import QUALITY_OBJECTIVES
from autosparse.search.allocation.knapsack import cheapest, solve
from autosparse.search.allocation.predictor import Predictor, fit, prior
from autosparse.search.allocation.problem import (
    ADDITIVE_METRICS,
    Allocation,
    AllocationProblem,
    StoredSizes,
    build_problem,
    cost_objectives,
)
from autosparse.search.allocation.table import SensitivityTable
from autosparse.space.layers import LayerTable
from autosparse.space.search_space import SearchSpace

MAX_DROP = 3.0  # points of predicted drop where the seed sweep stops
NEAR_LOSSLESS = 5.0  # points below dense: the region whose gaps the planner fills


@dataclass(frozen=True)
class Observation:
    """A trial the planner knows of. ``drop`` (points below dense) is None for a trial that
    failed or was pruned: never refit on, never proposed again. ``costs`` maps cost objectives
    to measured totals; an objective missing there takes the problem's additive total."""

    allocation: Allocation
    drop: float | None = None
    costs: Mapping[str, float] = field(default_factory=dict)


def _constraint_parts(constraint: Any) -> tuple[str, str, float]:
    if isinstance(constraint, (tuple, list)):
        metric, op, bound = constraint
    else:
        metric, op, bound = constraint.metric, constraint.op, constraint.bound
    if op not in ("<=", ">="):
        raise ValueError(f"constraint op {op!r} must be '<=' or '>='")
    return str(metric), str(op), float(bound)


class BudgetPlanner:
    """Budgeted allocations to fine-tune; the rule is in the module docstring."""

    def __init__(self, problem: AllocationProblem, objectives: Sequence[str],
                 constraints: Iterable[Any] = (), *, max_drop: float = MAX_DROP,
                 near_lossless: float = NEAR_LOSSLESS, signal: str = "loss",
                 prior_scale: float | None = None, ridge: float = 1.0) -> None:
        if not isinstance(problem, AllocationProblem):
            raise ValueError(f"problem must be an AllocationProblem, got {type(problem).__name__}")
        self.objectives = [o for o in objectives if o not in QUALITY_OBJECTIVES]
        if not self.objectives:
            raise ValueError(f"objectives {list(objectives)} name no cost objective")
        for o in self.objectives:
            problem.costs_of(o)  # raises naming the objective the problem lacks
        if not max_drop > 0 or not near_lossless > 0:
            raise ValueError(f"max_drop {max_drop!r} and near_lossless {near_lossless!r} "
                             "must be > 0")
        self.problem = problem
        self.extra_budgets: dict[str, float] = {}
        for constraint in constraints:
            metric, op, bound = _constraint_parts(constraint)
            if metric in ADDITIVE_METRICS and op == "<=":
                name = ADDITIVE_METRICS[metric]
                problem.costs_of(name)
                self.extra_budgets[name] = min(bound, self.extra_budgets.get(name, math.inf))
            elif metric == "sparsity" and op == ">=":  # one-shot: kept share <= 1 - bound
                problem.costs_of("density")
                self.extra_budgets["density"] = min(1.0 - bound,
                                                    self.extra_budgets.get("density", math.inf))
            elif metric == "accuracy_drop" and op == "<=":
                max_drop, near_lossless = min(max_drop, bound), min(near_lossless, bound)
        self.max_drop, self.near_lossless = max(max_drop, 0.0), max(near_lossless, 0.0)
        self._fit_args = {"signal": signal, "prior_scale": prior_scale, "ridge": ridge}
        self.prior: Predictor = prior(problem, signal, prior_scale)
        dense = problem.dense_allocation()
        self._known = [dense] if dense is not None else []  # its drop is 0 by definition

    # --- before any trial ---------------------------------------------------------------------

    def seeds(self, count: int, exclude: Iterable[Sequence[int]] = ()) -> list[Allocation]:
        """Up to ``count`` distinct allocations from the prior's budget sweep (fewer only when
        the space or the constraints hold fewer)."""
        if count < 0:
            raise ValueError(f"count {count!r} must be >= 0")
        weights = self.prior.weights()
        k = len(self.objectives)
        per = math.ceil(count / k) if count else 0
        tried = [tuple(e) for e in exclude] + self._known
        out: list[Allocation] = []
        for j in range(per):
            for objective in self.objectives:
                if len(out) == count:
                    return out
                drop = self.max_drop * ((j + 1) / per) ** 2
                budget = self._budget_at(weights, objective, drop)
                if budget is None:
                    continue
                allocation = self._solve(weights, objective, budget, tried + out)
                if allocation is not None:
                    out.append(allocation)
        while len(out) < count:  # drop levels met the same allocations: take the next best
            extra = self._far_end(weights, tried + out)
            if extra is None:
                break
            out.append(extra)
        return out

    # --- after trials -------------------------------------------------------------------------

    def predictor(self, observed: Iterable[Observation]) -> Predictor:
        """The prior refitted on the observations that have a drop."""
        pairs = [(o.allocation, o.drop) for o in observed if o.drop is not None]
        return fit(self.problem, pairs, **self._fit_args)

    def next(self, observed: Sequence[Observation],
             pending: Iterable[Sequence[int]] = ()) -> Allocation | None:
        """The next allocation to fine-tune, never one observed or ``pending`` (in flight)."""
        observed = list(observed)
        tried = ([tuple(o.allocation) for o in observed] + [tuple(p) for p in pending]
                 + self._known)
        predictor = self.predictor(observed)
        weights = predictor.weights()
        start = len(tried) % len(self.objectives)
        for objective in self.objectives[start:] + self.objectives[:start]:
            for budget in self.gap_budgets(objective, observed, predictor):
                allocation = self._solve(weights, objective, budget, tried)
                if allocation is not None:
                    return allocation
        return self._far_end(weights, tried)  # no gap gave anything new

    def gap_budgets(self, objective: str, observed: Iterable[Observation],
                    predictor: Predictor) -> list[float]:
        """Budgets in the middle of the front's gaps, largest gap first."""
        points, tried = [], []
        for o in observed:
            cost = o.costs.get(objective)
            cost = float(cost) if cost is not None else self.problem.total(objective, o.allocation)
            tried.append(cost)  # failed or screened-out trials tried a gap too
            if o.drop is not None:
                points.append((cost, float(o.drop)))
        region = [p for p in points if p[1] <= self.near_lossless]
        front = _front(region + [(self.problem.dense[objective], 0.0)])
        c_min = front[0][0]
        beyond = [c for c, d in points if d > self.near_lossless and c < c_min]
        if beyond:
            anchor = max(beyond)
        else:
            budget = self._budget_at(predictor.weights(), objective,
                                     self.near_lossless - predictor.b)
            anchor = budget if budget is not None and budget < c_min else None
        if anchor is not None:
            front = [(anchor, self.near_lossless)] + front
        gaps = []
        for (c_lo, d_lo), (c_hi, d_hi) in zip(front, front[1:]):
            if c_lo <= 0 or c_hi <= c_lo:
                continue
            area = math.log(c_hi / c_lo) * max(d_lo - d_hi, 0.0)
            inside = sum(c_lo < c < c_hi for c in tried)  # tried there, did not close it
            gaps.append((area / (1 + inside), math.sqrt(c_lo * c_hi)))
        gaps.sort(key=lambda g: -g[0])
        return [budget for area, budget in gaps if area > 0]

    # --- helpers ------------------------------------------------------------------------------

    def _budget_at(self, weights, objective: str, drop: float) -> float | None:
        """The least ``objective`` cost at which the predicted drop can be kept <= ``drop``."""
        allocation = cheapest(self.problem, weights, objective, drop,
                              extra_budgets=self.extra_budgets)
        return None if allocation is None else self.problem.total(objective, allocation)

    def _far_end(self, weights, exclude) -> Allocation | None:
        """The best new allocation at the sweep's far end (predicted drop ``max_drop``)."""
        for objective in self.objectives:
            budget = self._budget_at(weights, objective, self.max_drop)
            if budget is None:
                continue
            allocation = self._solve(weights, objective, budget, exclude)
            if allocation is not None:
                return allocation
        return None

    def _solve(self, weights, objective: str, budget: float, exclude) -> Allocation | None:
        return solve(self.problem, weights, objective, budget, exclude=exclude,
                     extra_budgets=self.extra_budgets)


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (cost, drop) points (both minimised), cheapest first."""
    front: list[tuple[float, float]] = []
    for cost, drop in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or drop < front[-1][1]:
            front.append((cost, drop))
    return front


def planner_for(space: SearchSpace, table: LayerTable, sensitivity: SensitivityTable,
                objectives: Sequence[str], constraints: Iterable[Any] = (),
                profile: HardwareProfile | None = None, stored: StoredSizes | None = None,
                **options: Any) -> BudgetPlanner:
    """The planner for a search: costs for its cost objectives and constrained additive metrics
    (with ``stored``, a one-shot search's exact stored sizes)."""
    constraints = list(constraints)
    metrics = [_constraint_parts(c)[0] for c in constraints]
    needed = cost_objectives(objectives, metrics)
    problem = build_problem(space, table, sensitivity, needed, profile, stored)
    return BudgetPlanner(problem, cost_objectives(objectives), constraints, **options)
