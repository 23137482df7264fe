"""Budgeted allocation as a sampler: seeds from the sensitivity sweep, then the front's gaps.

Each trial is one exact solve of a multiple-choice knapsack (``autosparse.search.allocation``) on the
sensitivity table, whose additive prediction is refitted on the study's finished trials.
"""

from __future__ import annotations

from typing import Any

from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autosparse.config.objectives import metric_of
from autosparse.search.allocation.planner import BudgetPlanner, Observation
from autosparse.search.allocation.problem import Allocation
from autosparse.search.samplers._proposing import ProposingSampler
from autosparse.search.trial_attrs import METRICS_ATTR
from autosparse.space.candidate import Candidate
from autosparse.space.search_space import SearchSpace

__all__ = ["KnapsackSampler", "seed_candidates"]

SEEDS_PER_OBJECTIVE = 4


def seed_candidates(space: SearchSpace, planner: BudgetPlanner, count: int) -> list[Candidate]:
    """The planner's first ``count`` budgeted allocations as candidates (GA/BO warm starts)."""
    _check_match(space, planner)
    return [planner.problem.candidate(a) for a in planner.seeds(count)]


def _check_match(space: SearchSpace, planner: BudgetPlanner) -> None:
    if not isinstance(space, SearchSpace):
        raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
    if not isinstance(planner, BudgetPlanner):
        raise ValueError(f"planner must be a BudgetPlanner, got {type(planner).__name__}")
    names = tuple(d.name for d in space.decisions)
    if planner.problem.decisions != names:
        raise ValueError(f"planner's decisions {planner.problem.decisions} are not the space's "
                         f"{names}: build the problem from this space")


class KnapsackSampler(ProposingSampler):
    """Proposes the allocation the budget planner asks for next::

        tried   = allocations of every trial in storage (any state, enqueued ones too) + in flight
        trial   = first of planner.seeds(n_seeds) not in tried and still admissible given
                  the finished trials (outside every infeasible trial's boxes, predicted within
                  the calibrated ceiling), else
                  planner.next(finished trials, pending=running + waiting + in flight)
        finished: COMPLETE -> (allocation, accuracy drop, costs from user_attrs["metrics"]);
                  FAIL / PRUNED -> excluded from the refit, never proposed again
        trial.params = space.params_of(candidate of the allocation)

    The drop is ``metrics["accuracy_drop"]``, else ``dense_accuracy - values[0]`` (values[0] is
    the accuracy in %); a trial with neither is only excluded. Deterministic: everything comes
    from storage, so workers share a study and a resumed search continues where it stopped (two
    workers starting a trial at the same instant may still pick the same allocation). When the
    planner has nothing new, the trial falls back to a seeded random candidate.
    """

    def __init__(self, *, space: SearchSpace, planner: BudgetPlanner, seed: int | None = None,
                 n_seeds: int | None = None, dense_accuracy: float | None = None) -> None:
        _check_match(space, planner)
        if n_seeds is not None and (isinstance(n_seeds, bool) or not isinstance(n_seeds, int)
                                    or n_seeds < 0):
            raise ValueError(f"n_seeds must be None or an integer >= 0, got {n_seeds!r}")
        super().__init__(seed)
        self._space = space
        self._planner = planner
        self._n_seeds = (SEEDS_PER_OBJECTIVE * len(planner.objectives) if n_seeds is None
                         else n_seeds)
        self._dense_accuracy = dense_accuracy
        self._seeds: list[Allocation] | None = None

    @property
    def planner(self) -> BudgetPlanner:
        return self._planner

    def seeds(self) -> list[Allocation]:
        if self._seeds is None:
            self._seeds = self._planner.seeds(self._n_seeds)
        return list(self._seeds)

    def _propose(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        observed, pending = self._history(study, trial.number)
        tried = {o.allocation for o in observed} | set(pending)
        allocation = next((s for s in self.seeds() if s not in tried
                           and (not observed or self._planner.admissible(s, observed))), None)
        if allocation is None:
            allocation = self._planner.next(observed, pending=pending)
        if allocation is None:
            return {}  # every param falls back to a seeded random draw
        return self._space.params_of(self._planner.problem.candidate(allocation))

    def _allocation(self, params: dict[str, Any]) -> Allocation | None:
        try:
            return self._planner.problem.allocation_of(self._space.decode(params))
        except (ValueError, KeyError):
            return None  # still being sampled elsewhere, or foreign params

    def _history(self, study: Study, number: int) -> tuple[list[Observation], list[Allocation]]:
        observed: list[Observation] = []
        pending: list[Allocation] = []
        for t in study.get_trials(deepcopy=False):
            if t.number == number:
                continue
            params = t.params if t.state != TrialState.WAITING else t.system_attrs.get(
                "fixed_params", {})
            allocation = self._allocation(params)
            if allocation is None:
                continue
            if t.state == TrialState.COMPLETE:
                drop = self._drop(t)
                if drop is None:
                    pending.append(allocation)
                    continue
                metrics = t.user_attrs.get(METRICS_ATTR) or {}
                costs = {o: float(metrics[metric_of(o)]) for o in self._planner.objectives
                         if metric_of(o) in metrics}
                observed.append(Observation(allocation, drop, costs))
            elif t.state in (TrialState.FAIL, TrialState.PRUNED):
                observed.append(Observation(allocation, None))
            else:  # RUNNING, WAITING
                pending.append(allocation)
        for params in self._in_flight(number).values():
            allocation = self._allocation(params)
            if allocation is not None:
                pending.append(allocation)
        return observed, pending

    def _drop(self, trial: FrozenTrial) -> float | None:
        metrics = trial.user_attrs.get(METRICS_ATTR) or {}
        if "accuracy_drop" in metrics:
            return float(metrics["accuracy_drop"])
        if self._dense_accuracy is not None and trial.values:
            return self._dense_accuracy - float(trial.values[0])
        return None
