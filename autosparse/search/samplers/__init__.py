"""Search strategies as Optuna samplers: ``make_sampler`` maps a strategy config to one.

=============== ==============================================================================
``random``      ``optuna.samplers.RandomSampler`` (the honest baseline)
``bo`` / tpe    multivariate, grouped TPE with the constant liar (``group`` handles the
                conditional ``sparsity`` params; reads ``trial.constraints`` on its own)
``bo`` / gp     ``optuna.samplers.GPSampler`` on the params every trial has; the conditional
                ``sparsity`` params (absent when a layer takes 2:4) fall outside GP's
                intersection space and are sampled by a univariate TPE instead of at random
``ga``          :class:`GeneticSampler` (steady-state NSGA-II on DEAP operators)
``hybrid``      :class:`HybridSampler`: ``knapsack`` for the first ``knapsack_trials`` trials,
                then ``ga`` (screened, sensitivity-weighted) breeding from them
``grid-uniform`` :class:`UniformGridSampler` (same pattern/sparsity/bits on every layer)
``grid-global`` :class:`GridSampler` over ``SearchSpace.global_grid_candidates`` (one global
                magnitude threshold x one uniform bit-width: the practitioner's recipe)
=============== ==============================================================================
"""

from __future__ import annotations

import warnings
from typing import Sequence

import optuna
from optuna.exceptions import ExperimentalWarning

from autosparse.config.sections import STRATEGIES, StrategyConfig
from autosparse.search.allocation.planner import BudgetPlanner
from autosparse.search.samplers.ga import GeneticSampler
from autosparse.search.samplers.grid import GridSampler, UniformGridSampler
from autosparse.search.samplers.hybrid import HybridSampler
from autosparse.search.samplers.knapsack import KnapsackSampler
from autosparse.search.samplers.level_switch import LevelSwitch
from autosparse.search.samplers.screening import (
    AllocationPredictor,
    ScreenedSampler,
    gene_weights,
)
from autosparse.search.samplers.seeding import (
    TrialSeededRandomSampler,
    TrialSeededTPESampler,
)
from autosparse.space.search_space import GridSpace, SearchSpace

__all__ = ["GeneticSampler", "GridSampler", "HybridSampler", "UniformGridSampler", "make_sampler"]


def make_sampler(
    strategy: StrategyConfig, space: SearchSpace, seed: int, *, grid: GridSpace | None = None,
    planner: BudgetPlanner | None = None, objectives: Sequence[str] = (),
    dense_accuracy: float | None = None, maximize: bool = True,
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``strategy``, seeded with ``seed``.

    ``grid-global`` needs ``grid``; ``knapsack`` and ``hybrid`` need the budget ``planner``;
    with a planner, ``ga`` and ``bo`` screen ``strategy.screen`` proposals per trial by its
    predictor (which needs the search's ``objectives`` and the ``dense_accuracy``) and the GA
    mutates sensitive genes more often.
    """
    name = strategy.name
    predictor = None
    if planner is not None and name in ("ga", "bo", "hybrid"):
        if dense_accuracy is None or not objectives:
            raise ValueError("screening needs the search's objectives and the dense accuracy")
        predictor = AllocationPredictor(planner, objectives, dense_accuracy, maximize)
    if name in ("knapsack", "hybrid"):
        if planner is None:
            raise ValueError(f"strategy {name!r} needs a budget planner (per-layer sensitivity)")
        knapsack = KnapsackSampler(space=space, planner=planner, seed=seed,
                                   dense_accuracy=dense_accuracy)
        if name == "knapsack":
            return knapsack
        return HybridSampler(knapsack=knapsack, ga=_genetic(strategy, space, seed, planner,
                                                            predictor),
                             knapsack_trials=strategy.handoff())
    if name == "grid-global":
        if grid is None:
            raise ValueError("strategy 'grid-global' needs its grid (SearchSpace.global_grid_candidates)")
        return GridSampler(points=grid.points, decoder=grid, seed=seed)
    if name == "random":
        return TrialSeededRandomSampler(seed=seed)
    if name == "ga":
        return _genetic(strategy, space, seed, planner, predictor)
    if name == "grid-uniform":
        return UniformGridSampler(space=space, seed=seed)
    if name == "bo":
        with warnings.catch_warnings():
            # ``group`` is an experimental argument: expected, not news to the user.
            warnings.simplefilter("ignore", ExperimentalWarning)
            tpe = TrialSeededTPESampler(
                seed=seed,
                multivariate=strategy.bo_kind == "tpe",
                group=strategy.bo_kind == "tpe",
                n_startup_trials=strategy.startup_trials,
                constant_liar=True,
            )
        if strategy.bo_kind == "tpe":
            return _screened(tpe, space, predictor, strategy.screen, seed)
        if strategy.bo_kind == "gp":
            return _screened(optuna.samplers.GPSampler(
                seed=seed,
                n_startup_trials=strategy.startup_trials,
                independent_sampler=tpe,
                # Conditional params always fall back to the independent sampler; by design.
                warn_independent_sampling=False,
            ), space, predictor, strategy.screen, seed)
        raise ValueError(f"strategy.bo_kind {strategy.bo_kind!r} must be 'tpe' or 'gp'")
    raise ValueError(
        f"strategy.name {name!r} must be one of {', '.join(STRATEGIES)}"
    )


def _genetic(strategy: StrategyConfig, space: SearchSpace, seed: int,
             planner: BudgetPlanner | None,
             predictor: AllocationPredictor | None) -> GeneticSampler:
    return GeneticSampler(
        space=space,
        population_size=strategy.population_size,
        crossover_prob=strategy.crossover_prob,
        mutation_prob=strategy.mutation_prob,
        seed=seed,
        screen=strategy.screen,
        predictor=predictor,
        gene_weights=gene_weights(planner) if planner is not None else None,
        level_switch=(LevelSwitch(planner.problem, planner.objectives[0])
                      if planner is not None and strategy.switch_prob() > 0 else None),
        switch_prob=strategy.switch_prob() if planner is not None else 0.0,
    )


def _screened(inner: optuna.samplers.BaseSampler, space: SearchSpace,
              predictor: AllocationPredictor | None, screen: int,
              seed: int) -> optuna.samplers.BaseSampler:
    if predictor is None or screen <= 1:
        return inner
    return ScreenedSampler(inner=inner, space=space, predictor=predictor, screen=screen, seed=seed)
