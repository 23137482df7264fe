"""Trials left RUNNING by a dead process are failed as interrupted (and stop using budget)."""

import os
import socket

import optuna

from autosparse.search.objective import WORKER_ATTR
from autosparse.search.study import (
    counted_trials,
    fail_interrupted_trials,
    is_interrupted,
)


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


def test_enqueued_seed_cut_before_its_first_suggest_is_requeued_with_its_params(tmp_path):
    """A warm-start seed popped from the queue and killed before any suggest has no params,
    only Optuna's fixed_params: resume must still re-run it, exactly once."""
    from autosparse.search.front import trials_frame
    from autosparse.search.study import requeue_interrupted

    study = _study(tmp_path)
    study.enqueue_trial({"x": 0.25})
    study.ask()  # popped from the queue, never suggested: killed here
    assert study.trials[0].params == {}
    assert fail_interrupted_trials(study, grace_s=0.1) == 1
    assert requeue_interrupted(study) == 1 and requeue_interrupted(study) == 0
    rerun = study.ask()
    assert rerun.suggest_float("x", 0, 1) == 0.25
    study.tell(rerun, 1.0)
    frame = trials_frame(study, ["accuracy"])
    # the cut-short one is INTERRUPTED (neither a failure nor budget), the re-run counts
    assert list(frame["state"]) == ["INTERRUPTED", "COMPLETE"]
    assert counted_trials(study) == 1


def test_a_new_study_names_its_metrics_for_optuna_dashboard(tmp_path):
    from autosparse.config.schema import parse_config
    from autosparse.search.study import open_study

    config = parse_config({"name": "named", "model": {"builtin": "digits-cnn"},
                           "objectives": ["accuracy", "size"]})
    study = open_study(config, f"sqlite:///{tmp_path / 'named.db'}",
                       optuna.samplers.RandomSampler(seed=0))
    assert study.metric_names == ["accuracy", "size_kb"]


def test_a_worker_opening_a_study_another_is_still_creating_joins_it(tmp_path):
    """Two machines start one search at once: the first has created the study and named its
    metrics but not yet stored its signature when the second opens it. The second must join
    (it stores the same signature), not refuse the study as made for another search - the race
    the two-machine PostgreSQL drill once hit."""
    from autosparse.config.schema import parse_config
    from autosparse.config.validation import ConfigError
    from autosparse.search.study import _UID_ATTR, open_study
    from autosparse.search.study_identity import SIGNATURE_ATTR as _SIGNATURE_ATTR

    config = parse_config({"name": "race", "model": {"builtin": "digits-cnn"},
                           "objectives": ["accuracy", "size"]})
    url = f"sqlite:///{tmp_path / 'race.db'}"
    first = optuna.create_study(study_name="race", storage=url,
                                directions=config.objective_directions())
    first.set_metric_names(["accuracy", "size_kb"])  # the first worker, part-way
    first.set_user_attr(_UID_ATTR, "first")
    second = open_study(config, url, optuna.samplers.RandomSampler(seed=0))
    assert second.user_attrs[_SIGNATURE_ATTR] and second.user_attrs[_UID_ATTR] == "first"
    other = parse_config({"name": "race", "model": {"builtin": "digits-cnn"},
                          "objectives": ["accuracy", "macs"]})
    try:
        open_study(other, url, optuna.samplers.RandomSampler(seed=0))
    except ConfigError as err:  # a search with other objectives is still refused
        assert "made for another configuration" in str(err)
    else:
        raise AssertionError("a study of other objectives was joined")
