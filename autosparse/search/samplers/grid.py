"""The by-hand baselines as samplers: a fixed grid of candidates visited in a seeded order.

``grid-uniform``: the same pattern, sparsity and bits on every layer; ``grid-global``: one global
magnitude threshold (exact per-layer sparsities) x one uniform bit-width.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Protocol, Sequence

from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autosparse.search.samplers._proposing import ProposingSampler
from autosparse.space.candidate import Candidate
from autosparse.space.search_space import SearchSpace

__all__ = ["GridSampler", "UniformGridSampler"]


class GridDecoder(Protocol):
    """Maps a grid point to trial params and back (a SearchSpace, or a GridSpace)."""

    def decode(self, params: Mapping[str, Any]) -> Candidate: ...

    def params_of(self, candidate: Candidate) -> dict[str, Any]: ...


class GridSampler(ProposingSampler):
    """Walks ``points`` in a seeded shuffled order::

        grid = shuffle(points, seed)
        used = candidates of the study's complete, running and failed trials
        point = first grid point used the fewest times (0 until the grid is exhausted)
        trial.params = decoder.params_of(point)

    A budget smaller than the grid therefore samples it evenly at random. Everything is derived
    from storage (plus the trials this instance is sampling right now), so it works across
    processes and on resume; two workers that start a trial at the same instant may still pick
    the same point. Once every point is used, points repeat in the same order.
    """

    def __init__(self, *, points: Sequence[Candidate], decoder: GridDecoder,
                 seed: int | None = None) -> None:
        if not points:
            raise ValueError("points must hold at least one candidate")
        super().__init__(seed)
        self._decoder = decoder
        self._grid: list[Candidate] = list(points)
        random.Random(self._seed).shuffle(self._grid)

    @property
    def grid(self) -> list[Candidate]:
        """The grid points in this sampler's visiting order."""
        return list(self._grid)

    def _propose(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._decoder.params_of(self._next_point(study, trial.number))

    def _next_point(self, study: Study, number: int) -> Candidate:
        uses = {c.key: 0 for c in self._grid}
        counted = set()
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL)
        for t in study.get_trials(deepcopy=False, states=states):
            if t.number == number:
                continue
            try:
                key = self._decoder.decode(t.params).key
            except (ValueError, KeyError):
                continue  # still being sampled elsewhere, or foreign params
            counted.add(t.number)
            if key in uses:
                uses[key] += 1
        for other, params in self._in_flight(number).items():
            if other not in counted:
                uses[self._decoder.decode(params).key] += 1
        fewest = min(uses.values())
        return next(c for c in self._grid if uses[c.key] == fewest)


class UniformGridSampler(GridSampler):
    """``grid-uniform``: :meth:`SearchSpace.uniform_candidates` through the categorical space."""

    def __init__(self, *, space: SearchSpace, seed: int | None = None) -> None:
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
        super().__init__(points=space.uniform_candidates(), decoder=space, seed=seed)
