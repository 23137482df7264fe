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

    front  = non-dominated (cost_k, drop) of finished trials with drop <= near_lossless
             (cost_k the problem's additive total, the solver's units),
             plus the dense model (dense cost, 0) and a low anchor at drop near_lossless: the
             larger of the costliest trial past the region cheaper than the front and the least
             cost at which the refit's predicted drop reaches the guard's ceiling
    gap    = between neighbours on the front, log(c_hi / c_lo) x (drop_lo - drop_hi): the area
             a new point could add to the front's hypervolume, divided by 1 + the number of
             trials already inside it (dominated tries: the predictor is wrong there)
    budget = sqrt(c_lo c_hi) of the largest gap (the next gap if that budget has nothing new)
    next   = solve(refit weights, k, budget, exclude=dense + every allocation tried or in flight,
                   forbid=guard.boxes, predicted drop <= guard.ceiling)
    if no gap gives one: the far end (predicted drop min(max_drop, ceiling)), else the allowed
                   allocation of least predicted drop (no budget, still outside the boxes)

The guard keeps proposals inside the accuracy bound ``near_lossless`` given what finished trials
showed (rules in :mod:`~autosparse.search.allocation.feasibility`)::

    infeasible = finished trials with drop > near_lossless
    boxes      = per infeasible trial: every allocation at least as hard in every decision, and
                 the trial with one decision moved one step (near copies)
    refit      = the predictor refitted on drops clipped at 2 x near_lossless
    ceiling    = where the isotonic curve of drop on leave-one-out prediction reaches the bound

so the gap rule spends nothing below the cost the calibrated prediction allows, and seeds still
to come are skipped when the guard rules them out (:meth:`BudgetPlanner.admissible`).

Constraints ``metric <= bound`` on additive metrics (size_kb, macs, bops, latency_ms, energy_uj,
bits_per_weight with oneshot; ``sparsity >= s`` as a kept share <= 1 - s)
become extra MILP budgets; ``accuracy_drop <= bound`` caps ``max_drop`` and ``near_lossless``.
Other constraints are left to the study (their trials are scored and marked infeasible as usual).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from autosparse.config.hardware import HardwareProfile
from autosparse.config.objectives import QUALITY_OBJECTIVES
from autosparse.search.allocation.feasibility import (
    DROP_CLIP,
    Guard,
    calibrated_ceiling,
    dominating_box,
    near_boxes,
)
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
    to measured totals, kept for callers: the gap rule places its budgets in the problem's
    additive totals, the units the solver is given them in (a measured size counts what channel
    pruning removes from the next layer, up to 2.7x below the additive total on digits-cnn, so a
    measured budget handed to the solver aimed at the wrong allocations)."""

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
        self.drop_bound: float | None = None  # the config's accuracy_drop bound, if it has one
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
                self.drop_bound = min(bound, self.drop_bound or math.inf)
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

    def _clipped(self, observed: Iterable[Observation]) -> list[tuple[Allocation, float]]:
        """(allocation, drop) with drops clipped at DROP_CLIP x near_lossless: a collapsed
        trial (60 points down) says "far too hard", not a number for a linear fit to chase."""
        top = DROP_CLIP * self.near_lossless
        return [(tuple(o.allocation), min(float(o.drop), top)) for o in observed
                if o.drop is not None]

    def refit(self, observed: Iterable[Observation]) -> Predictor:
        """The predictor the planner proposes with: refitted on the clipped drops."""
        return fit(self.problem, self._clipped(observed), **self._fit_args)

    def guard(self, observed: Iterable[Observation]) -> Guard:
        """What finished trials rule out (:mod:`~autosparse.search.allocation.feasibility`):
        the calibrated ceiling on the predicted drop, and boxes around every trial whose drop
        exceeded ``near_lossless`` (the accuracy-drop bound when there is one)."""
        observed = list(observed)
        limit = self.near_lossless
        infeasible = tuple(dict.fromkeys(tuple(o.allocation) for o in observed
                                         if o.drop is not None and o.drop > limit))
        boxes = []
        for allocation in infeasible:
            boxes.append(dominating_box(self.problem, allocation))
            boxes.extend(near_boxes(self.problem, allocation))
        fitted = lambda subset: fit(self.problem, subset, **self._fit_args).predict  # noqa: E731
        ceiling = calibrated_ceiling(self._clipped(observed), limit, fitted)
        return Guard(ceiling=ceiling, margin=limit - ceiling, boxes=tuple(boxes),
                     infeasible=infeasible)

    def admissible(self, allocation: Sequence[int], observed: Iterable[Observation]) -> bool:
        """Whether ``allocation`` may still be proposed given the finished trials: outside every
        infeasible trial's boxes and predicted (refit) within the calibrated ceiling."""
        return self.admissibility(observed)(allocation)

    def admissibility(self, observed: Iterable[Observation]
                      ) -> Callable[[Sequence[int]], bool]:
        """``admissible`` for many allocations against the same finished trials: the refit and
        the guard are computed once."""
        observed = list(observed)
        guard = self.guard(observed)
        predictor = self.refit(observed)
        return lambda allocation: (not guard.forbids(allocation)
                                   and predictor.predict(allocation) <= guard.ceiling + 1e-9)

    def next(self, observed: Sequence[Observation],
             pending: Iterable[Sequence[int]] = ()) -> Allocation | None:
        """The next allocation to fine-tune, never one observed or ``pending`` (in flight), never
        one the guard forbids; within the calibrated ceiling unless nothing new is, and then the
        allowed allocation of least predicted drop."""
        observed = list(observed)
        tried = ([tuple(o.allocation) for o in observed] + [tuple(p) for p in pending]
                 + self._known)
        predictor = self.refit(observed)
        guard = self.guard(observed)
        weights = predictor.weights()
        start = len(tried) % len(self.objectives)
        for objective in self.objectives[start:] + self.objectives[:start]:
            for budget in self.gap_budgets(objective, observed, predictor, guard):
                allocation = self._solve(weights, objective, budget, tried, guard, predictor)
                if allocation is not None:
                    return allocation
        allocation = self._far_end(weights, tried, guard, predictor)  # no gap gave anything new
        if allocation is None:  # nothing new within the ceiling: the safest allowed
            allocation = solve(self.problem, weights, None, None, exclude=tried,
                               extra_budgets=self.extra_budgets, forbid=guard.boxes)
        return allocation

    def gap_budgets(self, objective: str, observed: Iterable[Observation],
                    predictor: Predictor, guard: Guard | None = None) -> list[float]:
        """Budgets in the middle of the front's gaps, largest gap first; with a ``guard``, the
        range starts where the calibrated prediction reaches its ceiling (no gap below it)."""
        points, tried = [], []
        for o in observed:
            cost = self.problem.total(objective, o.allocation)  # the solver's own units
            tried.append(cost)  # failed or screened-out trials tried a gap too
            if o.drop is not None:
                points.append((cost, float(o.drop)))
        region = [p for p in points if p[1] <= self.near_lossless]
        front = _front(region + [(self.problem.dense[objective], 0.0)])
        c_min = front[0][0]
        ceiling = self.near_lossless if guard is None else guard.ceiling
        lowest = self._budget_at(predictor.weights(), objective, ceiling - predictor.b,
                                 guard.boxes if guard is not None else ())
        beyond = [c for c, d in points if d > self.near_lossless and c < c_min]
        candidates = [max(beyond)] if beyond else []
        if lowest is not None and (guard is not None or not beyond):
            candidates.append(lowest)  # not below what the calibrated prediction allows
        anchor = max(candidates) if candidates else None
        if anchor is not None and anchor < c_min:
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

    def _budget_at(self, weights, objective: str, drop: float,
                   forbid: Sequence = ()) -> float | None:
        """The least ``objective`` cost at which the predicted drop can be kept <= ``drop``."""
        allocation = cheapest(self.problem, weights, objective, drop,
                              extra_budgets=self.extra_budgets, forbid=forbid)
        return None if allocation is None else self.problem.total(objective, allocation)

    def _far_end(self, weights, exclude, guard: Guard | None = None,
                 predictor: Predictor | None = None) -> Allocation | None:
        """The best new allocation at the sweep's far end (predicted drop ``max_drop``, or the
        guard's ceiling when lower)."""
        drop = self.max_drop
        if guard is not None and predictor is not None:
            drop = min(drop, guard.ceiling - predictor.b)
        forbid = guard.boxes if guard is not None else ()
        for objective in self.objectives:
            budget = self._budget_at(weights, objective, drop, forbid)
            if budget is None:
                continue
            allocation = self._solve(weights, objective, budget, exclude, guard, predictor)
            if allocation is not None:
                return allocation
        return None

    def _solve(self, weights, objective: str, budget: float, exclude,
               guard: Guard | None = None, predictor: Predictor | None = None
               ) -> Allocation | None:
        if guard is None or predictor is None:
            return solve(self.problem, weights, objective, budget, exclude=exclude,
                         extra_budgets=self.extra_budgets)
        return solve(self.problem, weights, objective, budget, exclude=exclude,
                     extra_budgets=self.extra_budgets, forbid=guard.boxes,
                     max_weight=guard.ceiling - predictor.b)


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
