"""KnapsackSampler on real in-memory Optuna studies with a fake "fine-tune" objective.

The fake fine-tuned drop is a known multiple of the synthetic sensitivity (with per-layer
factors the prior does not know), so a test can tell whether the sampler learnt from trials.
"""

from __future__ import annotations

import random

import optuna
import pytest
from test_allocation import DIGITS, QUICKSTART, sensitivity_for, synthetic_loss

from autosparse.compress.footprint import footprint_metrics
from autosparse.search.allocation.planner import BudgetPlanner, planner_for
from autosparse.search.allocation.problem import build_problem
from autosparse.search.samplers.knapsack import (
    METRICS_ATTR,
    KnapsackSampler,
    seed_candidates,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SENS = sensitivity_for(QUICKSTART)
DENSE_ACCURACY = 97.0


def make_objective(factors: dict[str, float], cost_metrics=("size_kb",)):
    """accuracy = dense - sum_d factor_d * loss_d; metrics stored like SearchObjective does."""

    def objective(trial):
        candidate = QUICKSTART.suggest(trial)
        drop = sum(factors.get(d.name, 1.0) * synthetic_loss(d.name, candidate[d.layers[0]])
                   for d in QUICKSTART.decisions)
        metrics = {**footprint_metrics(DIGITS, candidate), "accuracy": DENSE_ACCURACY - drop,
                   "accuracy_drop": drop}
        trial.set_user_attr(METRICS_ATTR, metrics)
        return (metrics["accuracy"], *(metrics[m] for m in cost_metrics))

    return objective


def sampler(objectives=("size",), constraints=(), **kwargs):
    planner = planner_for(QUICKSTART, DIGITS, SENS, ["accuracy", *objectives], constraints)
    return KnapsackSampler(space=QUICKSTART, planner=planner, **kwargs)


def run(n_trials=16, factors=None, objectives=("size",), constraints=(), study=None, **kwargs):
    metrics = tuple({"size": "size_kb", "macs": "macs", "bops": "bops"}[o] for o in objectives)
    if study is None:
        study = optuna.create_study(directions=["maximize"] + ["minimize"] * len(objectives),
                                    sampler=sampler(objectives, constraints, **kwargs))
    study.optimize(make_objective(factors or {}, metrics), n_trials=n_trials)
    return study


def keys(study):
    return [QUICKSTART.decode(t.params).key for t in study.trials if t.params]


def in_space(candidate):
    return all(candidate[layer] in d.distinct_choices()
               for d in QUICKSTART.decisions for layer in d.layers)


def test_proposals_are_distinct_in_space_and_not_dense():
    study = run(20)
    assert len(set(keys(study))) == 20
    for t in study.trials:
        candidate = QUICKSTART.decode(t.params)
        assert in_space(candidate)
        assert any(c.bits < 32 or c.sparsity > 0 for c in candidate.values())  # dense is known


def test_size_budget_from_a_constraint_is_respected():
    limit = 0.15 * footprint_metrics(DIGITS, QUICKSTART.decode(QUICKSTART.params_of(
        QUICKSTART.snap({}))))["size_kb"]
    study = run(14, constraints=[("size_kb", "<=", limit)])
    sizes = [t.user_attrs[METRICS_ATTR]["size_kb"] for t in study.trials]
    assert len(set(keys(study))) == 14
    assert max(sizes) <= limit * (1 + 1e-9)


def test_refit_on_trials_changes_the_proposals():
    """Same first seed, then different trials once the fine-tuned drops differ from the prior.
    A harsh model also skips the seeds its infeasible trials ruled out (harder or past the
    calibrated ceiling), so only the forgiving run uses every seed."""
    forgiving = run(14, factors={name: 0.5 for name in SENS.decisions()})
    harsh = run(14, factors={name: 20.0 for name in SENS.decisions()})
    seeds = [QUICKSTART.decode(QUICKSTART.params_of(sampler().planner.problem.candidate(s))).key
             for s in sampler().seeds()]
    n_seeds = len(seeds)
    assert keys(forgiving)[:n_seeds] == seeds
    assert keys(harsh)[0] == seeds[0]
    used = [k for k in keys(harsh)[:n_seeds] if k in seeds]
    assert used == [s for s in seeds if s in used] and len(used) < n_seeds  # in order, some skipped
    assert keys(forgiving)[n_seeds:] != keys(harsh)[n_seeds:]
    # a forgiving model gets pushed to cheaper allocations than a harsh one
    size = lambda s: min(t.user_attrs[METRICS_ATTR]["size_kb"] for t in s.trials[n_seeds:])  # noqa: E731
    assert size(forgiving) < size(harsh)


def test_two_cost_objectives():
    study = run(16, objectives=("size", "macs"))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len(set(keys(study))) == 16
    assert all(len(t.values) == 3 for t in study.trials)
    macs = {t.user_attrs[METRICS_ATTR]["macs"] for t in study.trials}
    assert len(macs) > 4  # the MACs sweep proposes structured sparsity, not only bit-widths


def test_same_study_same_sequence_and_global_random_untouched():
    random.seed(7)
    before = random.getstate()
    first = keys(run(12))
    assert random.getstate() == before
    assert keys(run(12, seed=123)) == first  # deterministic: the seed only feeds the fallback


def test_failed_trials_are_never_proposed_again_and_not_refit_on():
    objective = make_objective({})

    def flaky(trial):
        if trial.number % 3 == 1:
            QUICKSTART.suggest(trial)
            raise RuntimeError("out of memory (simulated)")
        return objective(trial)

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler())
    study.optimize(flaky, n_trials=15, catch=(RuntimeError,))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 5
    assert len(set(keys(study))) == 15
    knapsack = study.sampler
    observed, pending = knapsack._history(study, number=-1)
    assert sum(o.drop is None for o in observed) == 5 and not pending
    assert knapsack.planner.predictor(observed).observations == 10


def test_workers_sharing_storage_and_resume_never_repeat():
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s",
                                directions=["maximize", "minimize"], sampler=sampler())
    second = optuna.load_study(storage=storage, study_name="s", sampler=sampler())
    objective = make_objective({})
    for i in range(12):
        study = (first, second)[i % 2]
        trial = study.ask()
        study.tell(trial, objective(trial))
    resumed = optuna.load_study(storage=storage, study_name="s", sampler=sampler())
    resumed.optimize(objective, n_trials=6)
    assert len(set(keys(resumed))) == 18


def test_enqueued_and_in_flight_allocations_are_excluded():
    seeds = sampler().seeds()
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler())
    problem = study.sampler.planner.problem
    for seed in seeds[:2]:
        study.enqueue_trial(QUICKSTART.params_of(problem.candidate(seed)))
    observed, pending = study.sampler._history(study, number=-1)
    assert not observed and pending == seeds[:2]  # waiting trials count as pending
    trials = [study.ask() for _ in range(4)]  # none told: the last two are in flight together
    got = [QUICKSTART.suggest(t).key for t in trials]
    assert got[:2] == [problem.candidate(s).key for s in seeds[:2]]
    assert len(set(got)) == 4
    assert got[2:] == [problem.candidate(s).key for s in seeds[2:4]]  # the next seeds


def test_seed_candidates_and_constructor_checks():
    planner = planner_for(QUICKSTART, DIGITS, SENS, ["accuracy", "size"])
    candidates = seed_candidates(QUICKSTART, planner, 5)
    assert len({c.key for c in candidates}) == 5 and all(in_space(c) for c in candidates)
    assert [planner.problem.allocation_of(c) for c in candidates] == planner.seeds(5)
    other = BudgetPlanner(build_problem(QUICKSTART, DIGITS, SENS, ["size"]), ["size"])
    with pytest.raises(ValueError, match="space"):
        KnapsackSampler(space="nope", planner=other)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="planner"):
        KnapsackSampler(space=QUICKSTART, planner=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_seeds"):
        KnapsackSampler(space=QUICKSTART, planner=other, n_seeds=-1)
    with pytest.raises(ValueError, match="seed"):
        KnapsackSampler(space=QUICKSTART, planner=other, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        KnapsackSampler(QUICKSTART, other)  # type: ignore[misc]


def test_metrics_attr_matches_the_objective():
    from autosparse.search.objective import METRICS_ATTR as REAL

    assert METRICS_ATTR == REAL


def test_allocation_and_sampler_do_not_import_torch_or_optuna():
    import subprocess
    import sys

    code = ("import sys, autosparse.search.allocation.planner; "
            "bad = any(m in sys.modules for m in ('torch', 'optuna', 'mlflow')); "
            "import autosparse.search.samplers.knapsack; "
            "sys.exit(int(bad or 'torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
