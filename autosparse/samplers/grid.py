"""The by-hand baseline as a sampler: the same pattern, sparsity and bits on every layer."""

from __future__ import annotations

import random
import threading
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from ..candidate import Candidate
from ..space import SearchSpace
from .ga import stable_seed

__all__ = ["UniformGridSampler"]


class UniformGridSampler(optuna.samplers.BaseSampler):
    """Walks ``space.uniform_candidates()`` in a seeded shuffled order::

        grid = shuffle(space.uniform_candidates(), seed)
        used = candidates of the study's complete, running and failed trials
        point = first grid point used the fewest times (0 until the grid is exhausted)
        trial.params = space.params_of(point)

    A budget smaller than the grid therefore samples it evenly at random. Everything is derived
    from storage (plus the trials this instance is sampling right now), so it works across
    processes and on resume; two workers that start a trial at the same instant may still pick
    the same point. Once every point is used, points repeat in the same order.
    """

    def __init__(self, *, space: SearchSpace, seed: int | None = None) -> None:
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        self._space = space
        self._seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self._grid: list[Candidate] = space.uniform_candidates()
        random.Random(self._seed).shuffle(self._grid)
        self._chosen: dict[int, Candidate] = {}  # trial number -> point, in memory only
        self._lock = threading.Lock()

    @property
    def grid(self) -> list[Candidate]:
        """The grid points in this sampler's visiting order."""
        return list(self._grid)

    def reseed_rng(self) -> None:
        # The visiting order is fixed at construction; fallback draws use the trial number.
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
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        with self._lock:
            point = self._chosen.get(trial.number)
            if point is None:
                point = self._chosen[trial.number] = self._next_point(study, trial.number)
        params = self._space.params_of(point)
        choices = getattr(param_distribution, "choices", None)
        if param_name in params and choices is not None and params[param_name] in choices:
            return params[param_name]
        rng = random.Random(stable_seed(self._seed, trial.number, param_name))
        if isinstance(param_distribution, CategoricalDistribution):
            return choices[rng.randrange(len(choices))]
        sampler = optuna.samplers.RandomSampler(seed=rng.getrandbits(32))
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        with self._lock:
            self._chosen.pop(trial.number, None)

    def _next_point(self, study: Study, number: int) -> Candidate:
        uses = {c.key: 0 for c in self._grid}
        counted = set()
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL)
        for t in study.get_trials(deepcopy=False, states=states):
            if t.number == number:
                continue
            try:
                key = self._space.decode(t.params).key
            except (ValueError, KeyError):
                continue  # still being sampled elsewhere, or foreign params
            counted.add(t.number)
            if key in uses:
                uses[key] += 1
        for other, point in self._chosen.items():
            if other != number and other not in counted:
                uses[point.key] += 1
        fewest = min(uses.values())
        return next(c for c in self._grid if uses[c.key] == fewest)
