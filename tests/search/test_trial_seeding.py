"""Random draws keyed on the trial number: a resume or a second worker draws new candidates,
one process with a given seed repeats exactly (random strategy and TPE's startup)."""

from __future__ import annotations

import optuna
import pytest

from autosparse.search.samplers.seeding import (
    TrialSeededRandomSampler,
    TrialSeededTPESampler,
)

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1) + trial.suggest_int("n", 0, 1000)


def _params(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials]


@pytest.mark.parametrize("make", [lambda: TrialSeededRandomSampler(seed=3),
                                  lambda: TrialSeededTPESampler(seed=3, n_startup_trials=10)])
def test_same_seed_repeats_and_a_resume_draws_new_candidates(make):
    one = optuna.create_study(sampler=make())
    one.optimize(_objective, n_trials=6)
    again = optuna.create_study(sampler=make())
    again.optimize(_objective, n_trials=6)
    assert _params(one) == _params(again)  # one process, one seed: the same trials

    storage = optuna.storages.InMemoryStorage()
    cut = optuna.create_study(storage=storage, study_name="s", sampler=make())
    cut.optimize(_objective, n_trials=3)
    resumed = optuna.load_study(storage=storage, study_name="s", sampler=make())  # new process
    resumed.optimize(_objective, n_trials=3)
    assert _params(resumed) == _params(one)  # trial k draws the same wherever it runs
    assert len(set(_params(resumed))) == 6  # the resume did not re-draw trials 0..2


def test_two_workers_on_one_study_draw_different_candidates():
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="s")
    a = optuna.load_study(storage=storage, study_name="s", sampler=TrialSeededRandomSampler(0))
    b = optuna.load_study(storage=storage, study_name="s", sampler=TrialSeededRandomSampler(0))
    for _ in range(4):  # interleaved, as two processes would be
        for study in (a, b):
            trial = study.ask()
            study.tell(trial, _objective(trial))
    assert len(set(_params(a))) == 8


def test_plain_optuna_random_sampler_repeats_on_resume():
    """The failure this fixes: a sampler seeded once per process re-proposes trial 0 on resume."""
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    first.optimize(_objective, n_trials=2)
    resumed = optuna.load_study(storage=storage, study_name="s",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    resumed.optimize(_objective, n_trials=1)
    assert _params(resumed)[2] == _params(resumed)[0]
