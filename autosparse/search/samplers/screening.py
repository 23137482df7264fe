"""A cheap model in the loop: many proposals, one fine-tune.

A sampler (GA child, TPE proposal) draws ``screen`` distinct candidates; a predictor gives each a
predicted objective vector (accuracy from the additive sensitivity model refit on the finished
trials, costs from the layer table, exact for size/MACs/BOPs); the one that would add the most
hypervolume to the observed front gets the trial. Candidates that add none are ranked by how
far they are from the front (additive epsilon), so the closest to it still wins::

    front = non-dominated values of the finished trials (normalised by the dense model's costs)
    gain(c) = HV(front + predict(c)) - HV(front)          # reference: worst observed + margin
    pick argmax gain; ties (all 0) by argmin epsilon-distance to the front

With an ``accuracy_drop`` bound in the config, only candidates the budget planner would propose
compete (:mod:`~autosparse.search.allocation.feasibility`: not at least as hard in every layer
as a finished infeasible trial, not one step from it, predicted drop within the ceiling
calibrated on the finished trials), so the GA and BO keep to the bound as the knapsack does.
When none of the draws is admitted, the one predicted to lose least accuracy gets the trial
(:func:`pick_screened`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import moocore
import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autosparse.search.pareto import _signs, pareto_mask
from autosparse.search.samplers._proposing import ProposingSampler
from autosparse.search.trial_attrs import CANDIDATE_ATTR, METRICS_ATTR
from autosparse.space.candidate import Candidate
from autosparse.space.search_space import SearchSpace

if TYPE_CHECKING:
    from autosparse.search.allocation.planner import BudgetPlanner

__all__ = ["AllocationPredictor", "Predictor", "ScreenedSampler", "gene_weights",
           "pick_most_promising", "pick_screened"]


class Predictor(Protocol):
    """Predicted objective values of a candidate, in the study's objective order and units."""

    def refit(self, trials: Sequence[FrozenTrial]) -> None: ...

    def predict(self, candidate: Candidate) -> np.ndarray: ...

    def admissible(self, candidate: Candidate) -> bool: ...

    def predicted_drop(self, candidate: Candidate) -> float: ...


def pick_most_promising(predicted: np.ndarray, observed: np.ndarray,
                        directions: Sequence) -> int:
    """Index of the predicted row that adds most hypervolume to the observed rows' front."""
    predicted = np.asarray(predicted, dtype=float)
    if len(predicted) == 1:
        return 0
    signs = _signs(directions, predicted.shape[1])
    observed = np.asarray(observed, dtype=float).reshape(-1, predicted.shape[1])
    observed = observed[np.isfinite(observed).all(axis=1)]
    if len(observed) == 0:
        return 0
    front = observed[pareto_mask(observed, directions)] * signs
    points = predicted * signs
    both = np.vstack([front, points])
    low, high = both.min(axis=0), both.max(axis=0)
    scale = np.where(high > low, high - low, 1.0)
    front_n, points_n = (front - low) / scale, (points - low) / scale
    reference = np.full(predicted.shape[1], 1.1)
    base = moocore.hypervolume(front_n, ref=reference)
    gains = np.array([moocore.hypervolume(np.vstack([front_n, p]), ref=reference) - base
                      for p in points_n])
    if gains.max() > 1e-12:
        return int(np.argmax(gains))
    # distance each point must improve on every objective to be non-dominated
    epsilon = np.array([np.min(np.max(p - front_n, axis=1)) for p in points_n])
    return int(np.argmin(epsilon))


def pick_screened(chosen: Sequence[tuple[Candidate, dict[str, Any]]], predictor: Predictor,
                  study: Study) -> dict[str, Any]:
    """The params of the screened proposal to fine-tune (the predictor refitted already)::

        allowed = proposals the predictor admits (the planner's rules; all without a bound)
        allowed -> the one adding most predicted hypervolume (pick_most_promising)
        none    -> the one of least predicted accuracy drop
    """
    if len(chosen) == 1:
        return chosen[0][1]
    allowed = [i for i, (candidate, _) in enumerate(chosen) if predictor.admissible(candidate)]
    if not allowed:
        drops = [predictor.predicted_drop(candidate) for candidate, _ in chosen]
        return chosen[int(np.argmin(drops))][1]
    predicted = np.asarray([predictor.predict(chosen[i][0]) for i in allowed])
    return chosen[allowed[pick_most_promising(predicted, observed_values(study),
                                              study.directions)]][1]


def admits_none(chosen: Sequence[tuple[Candidate, Any]], predictor: Predictor | None) -> bool:
    """Whether a screened batch holds nothing the predictor admits (draw another then)."""
    return predictor is not None and not any(predictor.admissible(c) for c, _ in chosen)


def observed_values(study: Study) -> np.ndarray:
    """Objective values of the study's feasible complete trials (the front to improve on)."""
    rows = [t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(c <= 0 for c in t.constraints.values())]
    return np.asarray(rows, dtype=float).reshape(len(rows), len(study.directions))


class ScreenedSampler(ProposingSampler):
    """Wraps an Optuna sampler (TPE, GP): ``screen`` complete proposals per trial, the most
    promising by the predictor is the trial's. Duplicates of finished, running or already drawn
    candidates are drawn again (a duplicate never costs a trial), up to a few spare draws.

    Each proposal is the inner sampler's relative sample (TPE's multivariate model, or its
    random start-up) completed param by param with its independent sampler, in the order
    ``space.suggest`` asks, so conditional params (sparsity of an N:M layer) are handled as in
    an ordinary trial.
    """

    def __init__(self, *, inner: optuna.samplers.BaseSampler, space: SearchSpace,
                 predictor: Predictor, screen: int, seed: int | None = None) -> None:
        if isinstance(screen, bool) or not isinstance(screen, int) or screen < 1:
            raise ValueError(f"screen must be an integer >= 1, got {screen!r}")
        super().__init__(seed)
        self._inner, self._space = inner, space
        self._predictor, self._screen = predictor, screen

    def reseed_rng(self) -> None:
        super().reseed_rng()
        self._inner.reseed_rng()

    def _propose(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
        trials = study.get_trials(deepcopy=False, states=states)
        seen = {self._key(t.params) for t in trials if t.number != trial.number}
        seen |= {self._key(p) for p in self._in_flight(trial.number).values()}
        proposals: dict[str, tuple[Candidate, dict[str, Any]]] = {}
        self._predictor.refit([t for t in trials if t.state == TrialState.COMPLETE])
        for batch in (self._screen, 2 * self._screen):  # a second batch when none is admitted
            wanted = len(proposals) + batch
            for _ in range(batch * 3):
                candidate, params = self._draw(study, trial)
                if candidate.key not in seen:
                    proposals.setdefault(candidate.key, (candidate, params))
                if len(proposals) == wanted:
                    break
            if not admits_none(list(proposals.values()), self._predictor):
                break
        if not proposals:  # nothing new was drawn: let the trial repeat (it costs no training)
            return params
        return pick_screened(list(proposals.values()), self._predictor, study)

    def _draw(self, study: Study, trial: FrozenTrial) -> tuple[Candidate, dict[str, Any]]:
        relative_space = self._inner.infer_relative_search_space(study, trial)
        relative = self._inner.sample_relative(study, trial, relative_space) if relative_space else {}
        params: dict[str, Any] = {}

        class _Asker:
            def suggest_categorical(inner_self, name: str, choices: Any) -> Any:
                if name in relative and relative[name] in choices:
                    params[name] = relative[name]
                else:
                    params[name] = self._inner.sample_independent(
                        study, trial, name, CategoricalDistribution(list(choices)))
                return params[name]

        candidate = self._space.suggest(_Asker())
        return candidate, params

    def _key(self, params: dict[str, Any]) -> str | None:
        try:
            return self._space.decode(params).key
        except (ValueError, KeyError):
            return None

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._inner.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        super().after_trial(study, trial, state, values)
        self._inner.after_trial(study, trial, state, values)


class AllocationPredictor:
    """The screening predictor from a budget planner: accuracy = dense accuracy minus the
    additive sensitivity model refit on the finished trials; costs = the problem's additive
    costs (exact for size, MACs and BOPs; per-layer sums of the cost model for latency/energy)."""

    def __init__(self, planner: "BudgetPlanner", objectives: Sequence[str],
                 dense_accuracy: float, maximize: bool = True) -> None:
        self._planner, self._objectives = planner, list(objectives)
        self._dense_accuracy = float(dense_accuracy)
        self._sign = 1.0 if maximize else -1.0  # a minimised task metric (mse) grows by its drop
        self._model = planner.prior
        self._admits: Callable[[Sequence[int]], bool] | None = None  # None: no accuracy bound

    def refit(self, trials: Sequence[FrozenTrial]) -> None:
        from autosparse.search.allocation.planner import Observation

        problem, observed = self._planner.problem, []
        for trial in trials:
            drop = (trial.user_attrs.get(METRICS_ATTR) or {}).get("accuracy_drop")
            candidate = trial.user_attrs.get(CANDIDATE_ATTR)
            if drop is None or not candidate:
                continue
            try:
                allocation = problem.allocation_of(Candidate.from_json(candidate))
            except ValueError:
                continue  # not a candidate of this space (e.g. a grid-global point)
            observed.append(Observation(allocation, float(drop)))
        self._model = self._planner.predictor(observed)
        if self._planner.drop_bound is not None:  # the knapsack's three rules
            self._admits = self._planner.admissibility(observed)

    def admissible(self, candidate: Candidate) -> bool:
        """Whether the planner would propose ``candidate`` given the finished trials: outside
        its boxes around infeasible ones and predicted within its calibrated ceiling (always,
        without an ``accuracy_drop`` bound in the config)."""
        if self._admits is None:
            return True
        return self._admits(self._planner.problem.allocation_of(candidate))

    def predicted_drop(self, candidate: Candidate) -> float:
        return float(self._model.predict(self._planner.problem.allocation_of(candidate)))

    def predict(self, candidate: Candidate) -> np.ndarray:
        problem = self._planner.problem
        allocation = problem.allocation_of(candidate)
        return np.asarray([
            self._dense_accuracy - self._sign * self._model.predict(allocation)
            if name == "accuracy"
            else problem.total(name, allocation) for name in self._objectives], dtype=float)


def gene_weights(planner: "BudgetPlanner") -> dict[str, float]:
    """Mutation weight per decision: the spread of its sensitivity over its choices, so genes
    whose choices matter mutate more often than genes whose every choice costs nothing."""
    problem = planner.problem
    return {name: float(max(row) - min(row)) for name, row in zip(problem.decisions, problem.loss)}
