"""Trials left RUNNING by a dead process are failed as interrupted (and stop using budget)."""

import os
import socket

import optuna

from autosparse.objective import WORKER_ATTR
from autosparse.study import counted_trials, fail_interrupted_trials, is_interrupted


def _study(tmp_path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")


def test_untagged_trial_is_failed_once_older_than_the_grace(tmp_path):
    study = _study(tmp_path)
    study.ask()  # what a worker killed between creating a trial and tagging it leaves behind
    assert counted_trials(study) == 1
    assert fail_interrupted_trials(study, grace_s=0.2) == 1
    (trial,) = study.trials
    assert is_interrupted(trial) and "before it started" in trial.user_attrs["fail_reason"]
    assert counted_trials(study) == 0


def test_live_workers_trial_is_left_running(tmp_path):
    study = _study(tmp_path)
    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    assert fail_interrupted_trials(study, grace_s=0.2) == 0
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING


def test_dead_workers_trial_on_this_host_is_failed(tmp_path):
    study = _study(tmp_path)
    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:999999999")
    assert fail_interrupted_trials(study, grace_s=0.2) == 1
    assert is_interrupted(study.trials[0])
