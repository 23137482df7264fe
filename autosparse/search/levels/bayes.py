"""Bayesian optimisation (Optuna's TPE) over per-layer level indices, repaired into the budget.

Why repair rather than a constraint: with a tight budget most of the index box is over budget,
and a constrained TPE (``constraints_func``) spends its startup trials and much of its model on
infeasible points; over-budget points cost nothing to recognise (cost is known in closed form),
but telling TPE about them without a fitness teaches it little. So every proposal is repaired
(cheaper steps on the least compressed layers first, deterministic) and the *repaired*
assignment is what TPE learns from (Lamarckian repair)::

    study = in-memory TPE study (seeded), uniform enqueued first
    repeat while evaluations remain:
        x = ask()                                   # one integer level index per layer
        y = repair(x)                               # into the budget
        f = score(y)                                # cached when y was scored before (free)
        tell(x, f) if x == y else (tell(x, FAIL), add_trial(y, f))

Levels are ordered (increasing compression), so each index is an integer parameter, letting TPE's
Parzen estimators use the order. The study lives in memory: the main search's storage is
elsewhere, and this one's trials are reported through the result's history.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from autosparse.search.levels.problem import (
    Evaluate,
    Index,
    Ledger,
    LevelProblem,
    LevelSearchResult,
    check_search_args,
    tightest_uniform,
)

if TYPE_CHECKING:
    from autosparse.compress.oneshot.levels import Level

_ASKS_PER_EVALUATION = 10  # proposals that only repeat scored assignments are free: cap them


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's per-trial log lines and experimental warnings off, the caller's level back after."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


def bayesian(layers: Sequence[str], options: Mapping[str, Sequence[Level]],
             cost: Mapping[str, Sequence[float]], evaluate: Evaluate, budget: float,
             evaluations: int, seed: int = 0, *,
             seeds: Sequence[Mapping[str, Level]] = (), seed_uniform: bool = True,
             n_startup_trials: int | None = None, multivariate: bool = True
             ) -> LevelSearchResult:
    """TPE over level indices (module docstring). ``seeds`` (and the tightest uniform assignment
    when ``seed_uniform``) are scored first; ``n_startup_trials`` defaults to a quarter of the
    evaluations, between 5 and 20. ``info``: ``trials`` (asked), ``repaired`` (how many
    proposals were over budget)."""
    check_search_args(evaluate, evaluations, seed)
    problem = LevelProblem.build(layers, options, cost, budget)
    startup = n_startup_trials if n_startup_trials is not None \
        else min(20, max(5, evaluations // 4))
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise ValueError(f"n_startup_trials must be an integer >= 0, got {n_startup_trials!r}")
    ledger = Ledger(problem, evaluate, evaluations)
    names = [f"{i:04d}:{name}" for i, name in enumerate(problem.layers)]
    distributions = {name: IntDistribution(0, len(row) - 1)
                     for name, row in zip(names, problem.options)}
    first: list[Index] = tightest_uniform(problem)[:1] if seed_uniform else []
    first += [problem.repair(problem.index_of(s)) for s in seeds]
    repaired = asks = 0
    with _quiet_optuna():
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                             multivariate=multivariate, constant_liar=False)
        study = optuna.create_study(sampler=sampler, direction="minimize")
        for index in dict.fromkeys(first):
            study.enqueue_trial(dict(zip(names, index)))
        while ledger.can_pay() and asks < _ASKS_PER_EVALUATION * evaluations + 100:
            trial = study.ask()
            asks += 1
            proposed = tuple(trial.suggest_int(name, 0, len(row) - 1)
                             for name, row in zip(names, problem.options))
            index = problem.repair(proposed)
            value = ledger.score(index)
            if index == proposed:
                study.tell(trial, value)
                continue
            repaired += 1
            study.tell(trial, state=TrialState.FAIL)
            study.add_trial(create_trial(params=dict(zip(names, index)),
                                         distributions=distributions, value=value))
    return ledger.result("bayesian", {"trials": asks, "repaired": repaired})
