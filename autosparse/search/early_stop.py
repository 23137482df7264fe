"""Stop a search whose whole first generation misses a constraint.

A constraint no model of the space meets (``size_kb <= 5`` on a space whose smallest model is
20 kB) otherwise spends the whole budget and ends with an empty front. A search that is merely
slow to find feasible points must not be stopped, so the judgement is narrow: it is made once,
when the first ``max(population or startup trials, 8)`` trials have completed in this run, and
stops only when every one of them violates the same constraint and no completed trial of the
study is feasible. A resumed study that already held that many trials is never judged again:
running the same command once more continues it regardless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autosparse.config.sections import StrategyConfig
from autosparse.config.task_metric import QUALITY_METRICS, Constraint
from autosparse.config.validation import ConfigError
from autosparse.search.trial_attrs import METRICS_ATTR

MIN_GENERATION = 8  # judged on no fewer trials, whatever the strategy's first generation


class InfeasibleStart(ConfigError):
    """The first generation all violates one constraint: stopped with a hint."""


def first_generation(strategy: StrategyConfig) -> int:
    """Trials of the strategy's first generation (GA population, BO startup), at least 8."""
    if strategy.name == "ga":
        return max(strategy.population_size, MIN_GENERATION)
    if strategy.name == "hybrid":
        return max(strategy.handoff(), MIN_GENERATION)
    if strategy.name == "bo":
        return max(strategy.startup_trials, MIN_GENERATION)
    return MIN_GENERATION


class InfeasibleStartGuard:
    """Called after each trial with the study; raises InfeasibleStart once, when it applies."""

    def __init__(self, constraints: Sequence[Constraint], size: int, completed_before: int,
                 budget: int | None):
        self.constraints, self.size = list(constraints), size
        # judged only when this run takes the study past its first generation, and only when
        # the budget goes beyond it (a budget that small ends soon anyway)
        self.armed = bool(self.constraints) and completed_before < size and (
            budget is None or budget > size)

    def __call__(self, study: Any) -> None:
        if not self.armed:
            return
        completed = sorted((t for t in study.get_trials(deepcopy=False)
                            if t.state.name == "COMPLETE"), key=lambda t: t.number)
        if len(completed) < self.size:
            return
        self.armed = False  # judged once
        if any(_feasible(t) for t in completed):
            return
        first = completed[: self.size]
        for constraint in self.constraints:
            key = str(constraint)
            if all(t.constraints.get(key, 0.0) > 0 for t in first):
                raise InfeasibleStart(_message(constraint, first))


def _feasible(trial: Any) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def _message(constraint: Constraint, trials: list[Any]) -> str:
    values = [t.user_attrs.get(METRICS_ATTR, {}).get(constraint.metric) for t in trials]
    values = [float(v) for v in values if isinstance(v, (int, float))]
    best = ""
    if values:
        closest = min(values) if constraint.op == "<=" else max(values)
        best = f"; the best {constraint.metric} seen is {closest:.4g}"
    if constraint.metric in QUALITY_METRICS:  # the compression costs too much accuracy
        widen = "offer milder choices (more bits, lower sparsity) or fine-tune longer"
    else:  # the space holds no model that small, fast or frugal
        widen = "offer smaller choices (fewer bits, higher sparsity)"
    return (f"constraints: all of the first {len(trials)} trials violate '{constraint}'"
            f"{best}: loosen that bound or {widen}; the search stopped early, its trials stay "
            "in the study (run the same command again to continue regardless)")
