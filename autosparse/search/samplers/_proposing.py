"""Base for samplers that decide all of a trial's params at once (GA child, grid point)."""

from __future__ import annotations

import random
import threading
from abc import abstractmethod
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autosparse.search.samplers.seeding import stable_seed


class ProposingSampler(optuna.samplers.BaseSampler):
    """Lifecycle::

        first param asked for a trial -> params = self._propose(study, trial), kept in memory
        each param -> params[name] if it is one of the distribution's choices, else a seeded draw
        after_trial -> forget the trial's params

    Nothing is written into Optuna storage: a trial's params are stored by Optuna itself as they
    are suggested, and other processes derive everything from those.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        self._seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self._proposals: dict[int, dict[str, Any]] = {}  # trial number -> params, in flight
        self._lock = threading.Lock()

    @abstractmethod
    def _propose(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        """All params of a new trial."""

    def _in_flight(self, number: int) -> dict[int, dict[str, Any]]:
        """Params this instance proposed for other trials that are still running."""
        return {other: params for other, params in self._proposals.items() if other != number}

    def reseed_rng(self) -> None:
        self._seed = random.SystemRandom().getrandbits(63)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        with self._lock:
            params = self._proposals.get(trial.number)
            if params is None:
                params = self._proposals[trial.number] = self._propose(study, trial)
        choices = getattr(param_distribution, "choices", None)
        if param_name in params and choices is not None and params[param_name] in choices:
            return params[param_name]
        return self._fallback(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        with self._lock:
            self._proposals.pop(trial.number, None)

    def _fallback(
        self, study: Study, trial: FrozenTrial, name: str, distribution: BaseDistribution
    ) -> Any:
        """A seeded random value for a param outside the proposal (or a foreign distribution)."""
        rng = random.Random(stable_seed(self._seed, trial.number, name))
        if isinstance(distribution, CategoricalDistribution):
            return distribution.choices[rng.randrange(len(distribution.choices))]
        sampler = optuna.samplers.RandomSampler(seed=rng.getrandbits(32))
        return sampler.sample_independent(study, trial, name, distribution)
