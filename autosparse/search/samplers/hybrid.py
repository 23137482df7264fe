"""Knapsack first, GA after: the planner's budgeted allocations become the GA's first population.

Why: the knapsack planner reaches good allocations over the whole size range in few trials but
then refines only along its additive prediction; the GA refines well but spends its first
generation finding what the planner knows from sensitivity. Handing over once the planner has
spent ``knapsack_trials`` trials gives the GA a first population that already spans the front.
"""

from __future__ import annotations

from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autosparse.search.samplers.ga import GeneticSampler
from autosparse.search.samplers.knapsack import KnapsackSampler

__all__ = ["HybridSampler"]


class HybridSampler(optuna.samplers.BaseSampler):
    """Routes trial ``n`` to the knapsack sampler when ``n < knapsack_trials``, else to the GA::

        trial.number <  knapsack_trials -> KnapsackSampler (seeds, then the front's gaps)
        trial.number >= knapsack_trials -> GeneticSampler (its population: every finished trial,
                                           the planner's included; screened by the predictor)

    Routing by trial number keeps the choice the same in every worker and on resume (numbers are
    unique in a study); a re-run of an interrupted trial is enqueued with its params fixed, so it
    repeats whichever sampler proposed it.
    """

    def __init__(self, *, knapsack: KnapsackSampler, ga: GeneticSampler,
                 knapsack_trials: int) -> None:
        if isinstance(knapsack_trials, bool) or not isinstance(knapsack_trials, int) \
                or knapsack_trials < 0:
            raise ValueError(f"knapsack_trials must be an integer >= 0, got {knapsack_trials!r}")
        self._knapsack, self._ga, self._handoff = knapsack, ga, knapsack_trials

    @property
    def knapsack_trials(self) -> int:
        return self._handoff

    def _route(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        return self._knapsack if trial.number < self._handoff else self._ga

    def infer_relative_search_space(self, study: Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._route(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._route(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._route(trial).sample_independent(study, trial, param_name,
                                                     param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._route(trial).before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._route(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._knapsack.reseed_rng()
        self._ga.reseed_rng()
