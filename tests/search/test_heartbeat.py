"""Optuna's heartbeat: a trial whose worker died on another machine is re-run, never counted twice.

The stale trial is written with the real storage API (ask, the objective's own tags, Optuna's
``record_heartbeat``); the heartbeat goes stale by waiting past a short grace period (SQLite's
clock has one-second steps, hence ~3 s per test).
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from autosparse.config.runtime import HeartbeatConfig
from autosparse.config.schema import ConfigError, parse_config
from autosparse.search.objective import WORKER_ATTR, start_trial
from autosparse.search.study import (
    RERUN_OF_ATTR,
    await_other_hosts,
    counted_trials,
    fail_interrupted_trials,
    fail_stale_trials,
    is_interrupted,
    make_storage,
    requeue_interrupted,
)

FAST = HeartbeatConfig(interval=1, grace=2)
STALE_AFTER_S = FAST.grace + 1.2  # past the grace on a clock with one-second steps


def _stale_trial(study: optuna.Study, suggest) -> optuna.trial.FrozenTrial:
    """A trial as a worker on another machine leaves it when that machine dies mid-trial."""
    with warnings.catch_warnings():  # "heartbeat is meant for optimize": we play a worker here
        warnings.simplefilter("ignore")
        trial = study.ask()
    start_trial(trial)
    trial.set_user_attr(WORKER_ATTR, "a-machine-that-died:4242")
    suggest(trial)
    study._storage.record_heartbeat(trial._trial_id)  # its last beat, then silence
    return study.trials[trial.number]


def _study(tmp_path: Path, heartbeat: HeartbeatConfig = FAST, url: str | None = None,
           name: str = "hb") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(url or f"sqlite:///{tmp_path / 'study.db'}", heartbeat)
    return optuna.create_study(study_name=name, storage=storage)


POSTGRES_URL = os.environ.get("AUTOSPARSE_TEST_POSTGRES_URL", "")  # set by scripts/test.sh


@pytest.fixture(params=["sqlite", "postgresql"])
def study(request, tmp_path):
    """The study on SQLite, and on the real PostgreSQL server where the suite has one (what
    several machines share: the case the heartbeat is for)."""
    if request.param == "sqlite":
        yield _study(tmp_path)
        return
    if not POSTGRES_URL:
        pytest.skip("AUTOSPARSE_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)")
    name = f"hb-{uuid.uuid4().hex[:12]}"
    yield _study(tmp_path, url=POSTGRES_URL, name=name)
    optuna.delete_study(study_name=name, storage=POSTGRES_URL)


def test_stale_trial_is_interrupted_and_requeued_once_with_its_params(study):
    stale = _stale_trial(study, lambda t: t.suggest_float("x", 0, 1))
    assert fail_interrupted_trials(study, grace_s=0.1) == 0  # still beating: left alone
    time.sleep(STALE_AFTER_S)
    assert fail_interrupted_trials(study, grace_s=0.1) == 1
    cut, rerun = study.trials
    assert is_interrupted(cut) and "no heartbeat" in cut.user_attrs["fail_reason"]
    assert rerun.state == optuna.trial.TrialState.WAITING
    assert rerun.user_attrs == {RERUN_OF_ATTR: stale.number}  # nothing of the dead worker's
    assert requeue_interrupted(study) == 0  # the restart path sees it is re-queued already
    assert counted_trials(study) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = study.ask()
    assert again.suggest_float("x", 0, 1) == stale.params["x"]


def test_waiting_at_the_end_of_the_budget_picks_up_a_dead_machines_trial(tmp_path):
    """Machine A's budget looks used up while machine B's last trial is RUNNING; B died: A waits
    until the heartbeat says so, and then has work again (the re-run)."""
    study = _study(tmp_path)
    _stale_trial(study, lambda t: t.suggest_int("n", 0, 9))
    exhausted = lambda s: counted_trials(s) >= 1  # noqa: E731 - the budget: one trial
    assert exhausted(study)
    start = time.time()
    assert await_other_hosts(study, exhausted, FAST, poll_s=0.2)
    assert time.time() - start <= FAST.grace + FAST.interval + 1.5
    assert not exhausted(study) and study.trials[-1].state == optuna.trial.TrialState.WAITING


def test_journal_storage_has_no_heartbeat(tmp_path):
    study = optuna.create_study(storage=make_storage(str(tmp_path / "journal.log"), FAST))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, "elsewhere:1")
    assert fail_stale_trials(study) == 0
    assert not await_other_hosts(study, lambda s: True, FAST)  # nothing to learn: no wait


@pytest.mark.parametrize("heartbeat, words", [
    ({"interval": 60, "grace": 60}, ["storage_heartbeat", "grace (60)", "interval (60)"]),
    ({"interval": 0}, ["storage_heartbeat.interval", "0"]),
    ({"grace": 1}, ["storage_heartbeat.grace", "1"]),
    ({"intervall": 5}, ["storage_heartbeat.intervall", "interval"]),
])
def test_bad_heartbeat_settings_are_config_errors(heartbeat, words):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "model": {"builtin": "digits-cnn"},
                      "storage_heartbeat": heartbeat})
    assert all(word in str(err.value) for word in words), str(err.value)


@pytest.mark.integration
def test_next_search_reruns_a_stale_trial_and_ends_at_the_budget(tmp_path, one_thread):
    import mlflow

    from autosparse.search.runner import prepare, run_search

    runs = tmp_path / "runs"
    config = {"name": "heartbeat", "model": {"builtin": "digits-cnn", "train_epochs": 1},
              "space": {"default": {"sparsity": [0.0, 0.5, 0.8], "patterns": ["unstructured"],
                                    "bits": [8, 32]}},
              "strategy": {"name": "random"}, "budget": {"trials": 3},
              "finetune": {"steps": 8, "reeval_seeds": 0},
              "storage_heartbeat": {"interval": FAST.interval, "grace": FAST.grace},
              "tracking": {"uri": f"sqlite:///{runs / 'mlflow.db'}"}}
    path = tmp_path / "heartbeat.yaml"
    path.write_text(yaml.safe_dump(config))
    context = prepare(path, runs)
    stale = _stale_trial(context.open_study(), context.space.suggest)
    time.sleep(STALE_AFTER_S)

    lines: list[str] = []
    outcome = run_search(path, runs_dir=runs, printer=lines.append)

    frame = pd.read_csv(runs / "heartbeat" / "trials.csv", keep_default_na=False)
    assert list(frame["state"]) == ["INTERRUPTED", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert (frame.loc[frame["state"] == "COMPLETE", "fail_reason"] == "").all()
    study = optuna.load_study(study_name="heartbeat", storage=outcome.storage_url)
    reruns = [t for t in study.trials if t.user_attrs.get(RERUN_OF_ATTR) == stale.number]
    assert len(reruns) == 1 and reruns[0].params == stale.params
    assert reruns[0].state == optuna.trial.TrialState.COMPLETE
    assert counted_trials(study) == 3 and outcome.new_trials == 3
    assert any("1 trial(s) cut short" in line for line in lines)
    progress = [line for line in lines if line.startswith("[")]
    assert progress[-1].startswith("[3/3] failed 0") and len(progress) == 3

    client = mlflow.MlflowClient(tracking_uri=config["tracking"]["uri"])
    experiment = client.get_experiment_by_name("heartbeat")
    runs_ = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs_ if r.data.tags.get("autosparse.role") == "search"]
    children = {int(r.data.tags["autosparse.trial"]): r.info.status for r in runs_
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {0: "KILLED", 1: "FINISHED", 2: "FINISHED", 3: "FINISHED"}
    assert parent.data.metrics["n_failed"] == 0 and parent.data.metrics["n_trials"] == 3


def test_a_second_worker_taking_the_last_trial_stops_it_uncounted(tmp_path):
    """Workers read the budget, then ask: both may take the last trial. The one numbered
    behind a full budget is cut short (INTERRUPTED: not counted, not a failure)."""
    from autosparse.search.study import cut_short, trials_ahead

    study = _study(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            study.tell(study.ask(), 1.0)
        last, extra = study.ask(), study.ask()  # two workers, one trial left in a budget of 4
    assert trials_ahead(study, last.number) == 3 and trials_ahead(study, extra.number) == 4
    cut_short(extra, "the budget was used up by other workers first")
    study.tell(extra, state=optuna.trial.TrialState.FAIL)
    study.tell(last, 1.0)
    assert is_interrupted(study.trials[extra.number]) and counted_trials(study) == 4
    assert requeue_interrupted(study) == 0  # it never had params: nothing to re-run
