"""Contract tests every search strategy must pass (in the spirit of Optuna's
optuna/testing/pytest_samplers.py), then GA- and grid-specific behaviour."""

from __future__ import annotations

import random
import warnings

import numpy as np
import optuna
import pytest
from deap import creator

from autosparse.config.sections import StrategyConfig
from autosparse.config.space_rules import SpaceConfig
from autosparse.search.allocation import ChoiceSensitivity, SensitivityTable, choice_id
from autosparse.search.allocation.planner import planner_for
from autosparse.search.pareto import hypervolume
from autosparse.search.samplers import GeneticSampler, UniformGridSampler, make_sampler
from autosparse.space.layers import LayerInfo, LayerTable
from autosparse.space.search_space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ga-sens / bo-sens: GA and TPE with a sensitivity table (planner seeds aside: screening and
# sensitivity-weighted mutation); knapsack: budgeted allocation from the same table.
# ga-switch: ga-sens whose every child is mutated by a cost-keeping level switch (EvoPress);
# hybrid: knapsack for the first 8 trials, then ga-sens.
STRATEGIES = ["random", "bo", "ga", "grid-uniform", "knapsack", "ga-sens", "bo-sens", "ga-switch",
              "hybrid"]
DIRECTIONS = ["maximize", "minimize"]

TABLE = LayerTable(
    layers=(
        LayerInfo("conv1", "Conv2d", (16, 1, 3, 3), True, macs=16 * 9 * 64),  # 9-long rows: no 2:4
        LayerInfo("conv2", "Conv2d", (32, 16, 3, 3), True, macs=32 * 144 * 64),
        LayerInfo("fc1", "Linear", (64, 512), True, macs=64 * 512),
        LayerInfo("fc2", "Linear", (10, 64), True, macs=640),
    ),
    other_params=0,
    input_shape=(1, 8, 8),
    global_magnitude={0.5: {"conv1": 0.2, "conv2": 0.55, "fc1": 0.6, "fc2": 0.4}},
)
SPACE = SearchSpace.build(SpaceConfig(), TABLE)

# A clearly structured synthetic trade-off: sensitive layers lose accuracy fast when pruned.
SENS = {"conv1": 3.0, "conv2": 1.0, "fc1": 0.5, "fc2": 2.0}
PATTERN_COST = {"dense": 0.0, "unstructured": 1.0, "2:4": 1.2, "channel": 2.0}
BITS_COST = {4: 0.15, 8: 0.01, 32: 0.0}
DENSE_BITS = sum(layer.weight_count * 32 for layer in TABLE.layers)


def metrics(candidate):
    damage = sum(
        SENS[name] * (PATTERN_COST[c.pattern] * c.sparsity**2 + BITS_COST[c.bits])
        for name, c in candidate.items()
    )
    size = sum(TABLE[n].weight_count * c.density * c.bits for n, c in candidate.items())
    return 1.0 - damage / 10, size / DENSE_BITS


def objective(trial):
    return metrics(SPACE.suggest(trial))


def objective3(trial):
    candidate = SPACE.suggest(trial)
    accuracy, size = metrics(candidate)
    return accuracy, size, sum(c.bits for c in candidate.values()) / 128


def constrained(trial):
    accuracy, size = objective(trial)
    trial.set_constraint("accuracy_drop", (1.0 - accuracy) - 0.15)
    return accuracy, size


def _sensitivity() -> SensitivityTable:
    """Zero-shot-like loss changes from the synthetic trade-off below (pure: no model)."""
    entries = []
    for decision in SPACE.decisions:
        for choice in sorted(decision.distinct_choices()):
            if choice.pattern == "dense" and choice.bits == 32:
                continue
            damage = SENS[decision.name] * (PATTERN_COST[choice.pattern] * choice.sparsity ** 2
                                            + BITS_COST[choice.bits])
            entries.append(ChoiceSensitivity(decision.name, choice_id(choice), damage / 10,
                                             -damage * 10))
    return SensitivityTable(tuple(entries), dense_loss=0.1, dense_accuracy=100.0, samples=100)


OBJECTIVES = {2: ["accuracy", "size"], 3: ["accuracy", "size", "bops"]}
PLANNERS = {n: planner_for(SPACE, TABLE, _sensitivity(), objectives)
            for n, objectives in OBJECTIVES.items()}


def sampler_for(name, seed=0, n_objectives=2, **strategy):
    if name == "ga-switch":
        name, strategy = "ga-sens", {"level_switch": 1.0, **strategy}
    if name == "hybrid":
        strategy = {"knapsack_trials": 8, **strategy}
    if name in ("knapsack", "ga-sens", "bo-sens", "hybrid"):
        return make_sampler(StrategyConfig(name=name.removesuffix("-sens"), **strategy), SPACE,
                            seed, planner=PLANNERS[n_objectives],
                            objectives=OBJECTIVES[n_objectives], dense_accuracy=1.0)
    return make_sampler(StrategyConfig(name=name, **strategy), SPACE, seed)


def run(name, seed=0, n_trials=30, func=objective, directions=DIRECTIONS, **strategy):
    sampler = sampler_for(name, seed, n_objectives=len(directions), **strategy)
    study = optuna.create_study(directions=directions, sampler=sampler)
    study.optimize(func, n_trials=n_trials)
    return study


def keys(study):
    return [SPACE.decode(t.params).key for t in study.trials if t.state.is_finished() and t.params]


def assert_in_space(candidate):
    for decision in SPACE.decisions:
        allowed = decision.distinct_choices()
        for layer in decision.layers:
            assert candidate[layer] in allowed, (layer, candidate[layer])


# ---------------------------------------------------------------------- contract tests


@pytest.mark.parametrize("name", STRATEGIES)
def test_candidates_decode_and_lie_in_space(name):
    study = run(name)
    assert len(study.trials) == 30
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert_in_space(SPACE.decode(trial.params))


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_sequence(name):
    assert keys(run(name, seed=3, n_trials=20)) == keys(run(name, seed=3, n_trials=20))


@pytest.mark.parametrize("name", STRATEGIES)
def test_different_seeds_differ(name):
    # (the grid's is a permutation of the same points: it must differ in order)
    if name == "knapsack":
        pytest.skip("deterministic by design: the allocation is a solve, the seed only feeds "
                    "the random fallback when the planner has nothing new")
    assert keys(run(name, seed=1, n_trials=20)) != keys(run(name, seed=2, n_trials=20))


@pytest.mark.parametrize("name", STRATEGIES)
def test_three_objectives(name):
    study = run(name, n_trials=20, func=objective3, directions=["maximize", "minimize", "minimize"])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(len(t.values) == 3 for t in study.trials)


@pytest.mark.parametrize("name", STRATEGIES)
def test_constraints(name):
    study = run(name, n_trials=30, func=constrained)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(set(t.constraints) == {"accuracy_drop"} for t in study.trials)
    feasible = [t for t in study.trials if t.constraints["accuracy_drop"] <= 0]
    assert feasible  # dense-ish candidates are feasible; every strategy finds some in 30 trials


@pytest.mark.parametrize("name", STRATEGIES)
def test_enqueued_trials_are_respected(name):
    seeds = SPACE.warm_start_candidates(TABLE, 4, seed=0)
    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler_for(name))
    for candidate in seeds:
        study.enqueue_trial(SPACE.params_of(candidate))
    study.optimize(objective, n_trials=len(seeds) + 6)
    assert keys(study)[: len(seeds)] == [c.key for c in seeds]
    for trial in study.trials[len(seeds):]:
        assert_in_space(SPACE.decode(trial.params))


@pytest.mark.parametrize("name", STRATEGIES)
def test_failing_objective_does_not_break_the_search(name):
    def flaky(trial):
        candidate = SPACE.suggest(trial)
        if trial.number % 3 == 1:
            raise RuntimeError("out of memory (simulated)")
        return metrics(candidate)

    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler_for(name))
    study.optimize(flaky, n_trials=30, catch=(RuntimeError,))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 10
    assert states.count(optuna.trial.TrialState.COMPLETE) == 20
    for trial in study.trials:
        assert_in_space(SPACE.decode(trial.params))


@pytest.mark.parametrize("name", STRATEGIES)
def test_global_random_state_untouched(name):
    random.seed(1234)
    before = random.getstate()
    run(name, n_trials=25, func=constrained)
    assert random.getstate() == before


@pytest.mark.parametrize("name", STRATEGIES)
def test_workers_sharing_one_storage(name):
    """Two sampler instances (two "processes") alternate trials of one study via ask/tell."""
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", directions=DIRECTIONS,
                                sampler=sampler_for(name, seed=0))
    second = optuna.load_study(storage=storage, study_name="s", sampler=sampler_for(name, seed=0))
    for i in range(30):
        study = (first, second)[i % 2]
        trial = study.ask()
        study.tell(trial, objective(trial))
    trials = first.get_trials()
    assert len(trials) == 30
    for trial in trials:
        assert_in_space(SPACE.decode(trial.params))
    if name in ("ga", "grid-uniform", "knapsack", "ga-sens"):  # state from storage: no repeats
        assert len(set(keys(first))) == 30


def test_gp_bo_works_with_conditional_params_and_constraints():
    """GP is slow on CPU (seconds per trial), so one short run covers it."""
    study = run("bo", n_trials=6, func=constrained, bo_kind="gp", startup_trials=5)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for trial in study.trials:
        assert_in_space(SPACE.decode(trial.params))


def test_make_sampler_kinds_and_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(sampler_for("random"), optuna.samplers.RandomSampler)
        assert isinstance(sampler_for("bo"), optuna.samplers.TPESampler)
        assert isinstance(sampler_for("bo", bo_kind="gp"), optuna.samplers.GPSampler)
        assert isinstance(sampler_for("ga"), GeneticSampler)
        assert isinstance(sampler_for("grid-uniform"), UniformGridSampler)


# ---------------------------------------------------------------------- genetic algorithm


def test_ga_beats_random_on_a_structured_objective():
    def front_hv(name, seed):
        study = run(name, seed=seed, n_trials=60)
        values = np.array([t.values for t in study.trials])
        return hypervolume(values, DIRECTIONS, [0.5, 1.0])

    ga = np.mean([front_hv("ga", s) for s in range(3)])
    rnd = np.mean([front_hv("random", s) for s in range(3)])
    assert ga > rnd


def test_ga_proposes_few_duplicates():
    assert SPACE.size() > 100_000
    study = run("ga", n_trials=40)
    assert len(set(keys(study))) >= 36


def test_ga_deduplicates_when_the_population_converges():
    """In a small space (1,296 candidates) a converging population re-breeds its own members;
    without the duplicate check this run repeats ~15-20 of 60 candidates."""
    from autosparse.config.space_rules import ChoiceSet

    small = SearchSpace.build(
        SpaceConfig(default=ChoiceSet(sparsity=[0.0, 0.5, 0.75], patterns=["unstructured"],
                                      bits=[8, 32])),
        TABLE,
    )
    study = optuna.create_study(directions=DIRECTIONS,
                                sampler=GeneticSampler(space=small, population_size=8, seed=0))
    study.optimize(lambda trial: metrics(small.suggest(trial)), n_trials=60)
    assert len({small.decode(t.params).key for t in study.trials}) >= 58


def test_ga_prefers_feasible_children():
    ga = run("ga", n_trials=60, func=constrained)
    rnd = run("random", n_trials=60, func=constrained)

    def late_feasible(study):
        return sum(t.constraints["accuracy_drop"] <= 0 for t in study.trials[30:])

    assert late_feasible(ga) > late_feasible(rnd)


def test_ga_instances_do_not_interfere():
    """Two GA studies interleaved in one process give the same trials as when run alone."""
    alone = [keys(run("ga", seed=s, n_trials=25)) for s in (0, 1)]
    creator_before = set(vars(creator))
    studies = [
        optuna.create_study(directions=DIRECTIONS, sampler=sampler_for("ga", seed=s))
        for s in (0, 1)
    ]
    for _ in range(25):
        for study in studies:
            trial = study.ask()
            study.tell(trial, objective(trial))
    assert [keys(s) for s in studies] == alone
    assert set(vars(creator)) == creator_before


def test_ga_resumes_from_storage():
    """A fresh instance on the same storage continues exactly like an uninterrupted run."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s", directions=DIRECTIONS,
                                sampler=sampler_for("ga", seed=5))
    study.optimize(objective, n_trials=20)
    resumed = optuna.load_study(storage=storage, study_name="s", sampler=sampler_for("ga", seed=5))
    resumed.optimize(objective, n_trials=20)
    assert keys(resumed) == keys(run("ga", seed=5, n_trials=40))


@pytest.mark.parametrize("n_objectives", [2, 3, 4])
def test_ga_many_objectives_with_constraints_past_the_first_generation(n_objectives):
    def func(trial):
        candidate = SPACE.suggest(trial)
        accuracy, size = metrics(candidate)
        extra = [sum(c.bits for c in candidate.values()) / 128,
                 sum(c.sparsity for c in candidate.values())]
        trial.set_constraint("accuracy_drop", (1.0 - accuracy) - 0.15)
        return (accuracy, size, *extra)[:n_objectives]

    directions = ["maximize", "minimize", "minimize", "maximize"][:n_objectives]
    study = run("ga", n_trials=40, func=func, directions=directions, population_size=8)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len(set(keys(study))) >= 36


def test_ga_threads_and_params_outside_the_space():
    """``n_jobs=2`` shares one instance; a param the space does not know gets a valid value."""

    def func(trial):
        candidate = SPACE.suggest(trial)
        width = trial.suggest_categorical("width", [16, 32, 64])
        assert width in (16, 32, 64)
        return metrics(candidate)

    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler_for("ga", population_size=4))
    study.optimize(func, n_trials=24, n_jobs=2)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 24
    for trial in study.trials:
        assert_in_space(SPACE.decode(trial.params))


def test_search_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, autosparse.search.samplers, autosparse.search.pareto, autosparse.space.search_space; "
            "sys.exit(int(any(m in sys.modules for m in ('torch', 'mlflow'))))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"space": "not a space"}, "space"),
        ({"population_size": 1}, "population_size"),
        ({"population_size": 8.0}, "population_size"),
        ({"crossover_prob": 1.5}, "crossover_prob"),
        ({"mutation_prob": -0.1}, "mutation_prob"),
        ({"seed": "zero"}, "seed"),
    ],
)
def test_ga_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GeneticSampler(**{"space": SPACE, **kwargs})


def test_ga_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        GeneticSampler(SPACE)  # type: ignore[misc]


# ---------------------------------------------------------------------- uniform grid


def test_grid_visits_distinct_uniform_candidates_then_repeats_in_order():
    grid = SPACE.uniform_candidates()
    uniform = {c.key for c in grid}
    study = run("grid-uniform", n_trials=len(grid) + 3)
    visited = keys(study)
    assert set(visited[: len(grid)]) == uniform  # every point once before any repeats
    assert visited[len(grid):] == visited[:3]


def test_grid_candidates_are_uniform_where_allowed():
    study = run("grid-uniform", n_trials=len(SPACE.uniform_candidates()))
    for key, trial in zip(keys(study), study.trials):
        candidate = SPACE.decode(trial.params)
        wish = candidate["conv2"]  # conv2 admits every pattern, sparsity and bits
        for decision in SPACE.decisions:
            if wish in decision.distinct_choices():
                assert all(candidate[layer] == wish for layer in decision.layers), key


def test_grid_resumes_without_revisiting():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s", directions=DIRECTIONS,
                                sampler=sampler_for("grid-uniform", seed=0))
    study.optimize(objective, n_trials=10)
    other = optuna.load_study(storage=storage, study_name="s",
                              sampler=sampler_for("grid-uniform", seed=7))  # another order
    other.optimize(objective, n_trials=10)
    assert len(set(keys(other))) == 20


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="space"):
        UniformGridSampler(space=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        UniformGridSampler(space=SPACE, seed=1.5)  # type: ignore[arg-type]


def test_ga_level_switch_mutation_moves_two_decisions_toward_the_parents_cost():
    """With level_switch 1, a mutation is one switch: one decision moves, and a second one
    moves only when it brings the planner's cost back toward the parent's."""
    import random as stdlib_random

    sampler = sampler_for("ga-switch")
    problem = PLANNERS[2].problem
    rng = stdlib_random.Random(3)
    for _ in range(30):
        genome = [rng.randrange(len(c)) for c in sampler._choices]
        parent, _, _ = sampler._decode(list(genome))
        stdlib_random.seed(rng.random())
        child, _, _ = sampler._decode(sampler._mutate(list(genome)))
        before, after = problem.allocation_of(parent), problem.allocation_of(child)
        moved = [d for d in range(len(before)) if before[d] != after[d]]
        assert 1 <= len(moved) <= 2
        if len(moved) == 2:  # the second move brought the total closer than the first alone
            change = [abs(problem.costs_of("size")[d][after[d]]
                          - problem.costs_of("size")[d][before[d]]) for d in moved]
            assert abs(problem.total("size", after) - problem.total("size", before)) \
                < max(change)


# ---------------------------------------------------------------------- hybrid

def test_hybrid_proposes_as_the_knapsack_then_breeds():
    """The first ``knapsack_trials`` trials are the knapsack's own proposals, the rest GA
    children (the knapsack alone goes on differently)."""
    hybrid = run("hybrid", n_trials=20, func=constrained)
    knapsack = run("knapsack", n_trials=20, func=constrained)
    assert keys(hybrid)[:8] == keys(knapsack)[:8]
    assert keys(hybrid)[8:] != keys(knapsack)[8:]
    sampler = hybrid.sampler
    assert sampler.knapsack_trials == 8
    assert [sampler._route(t) for t in hybrid.trials[7:9]] == [sampler._knapsack, sampler._ga]


def test_hybrid_default_hand_over_is_the_population_size():
    assert StrategyConfig(name="hybrid", population_size=12).handoff() == 12
    assert StrategyConfig(name="hybrid", population_size=12, knapsack_trials=5).handoff() == 5


def test_knapsack_trials_belongs_to_hybrid():
    with pytest.raises(ValueError, match="knapsack_trials 5 is the hand-over of strategy "
                                         "'hybrid' \\(got name 'ga'\\)"):
        StrategyConfig(name="ga", knapsack_trials=5)


def test_hybrid_needs_a_planner():
    with pytest.raises(ValueError, match="strategy 'hybrid' needs a budget planner"):
        make_sampler(StrategyConfig(name="hybrid"), SPACE, 0)
