"""Two "machines" share one study on a real PostgreSQL server.

Two independent ``autosparse search`` processes, each with its own runs directory (its own dense
cache and MLflow store), point at one PostgreSQL URL and split the budget of one study between
them. scripts/test.sh starts a throwaway server (scripts/postgres.sh) and sets
AUTOSPARSE_TEST_POSTGRES_URL; without it this test is skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from autosparse.config.schema import ConfigError
from autosparse.search.runner import run_search

POSTGRES_URL = os.environ.get("AUTOSPARSE_TEST_POSTGRES_URL", "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not POSTGRES_URL,
        reason=os.environ.get("AUTOSPARSE_TEST_POSTGRES_SKIP_REASON")
        or "AUTOSPARSE_TEST_POSTGRES_URL is not set (scripts/test.sh sets it when "
        "scripts/postgres.sh can start a PostgreSQL server)",
    ),
]
ROOT = Path(__file__).resolve().parents[2]
BUDGET = 6

CONFIG = {
    "model": {"builtin": "digits-cnn", "train_epochs": 3},
    "space": {"default": {"sparsity": [0.0, 0.5, 0.8], "patterns": ["unstructured", "channel", "2:4"],
                          "bits": [4, 8, 32]}},
    "strategy": {"name": "ga", "population_size": 4},
    "budget": {"trials": BUDGET},
    "constraints": ["accuracy_drop <= 30"],
    "finetune": {"steps": 100},  # about 1 s a trial: both processes get to run some
}


def _delete_study(name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=POSTGRES_URL)
    except KeyError:
        pass


@pytest.fixture
def study_name():
    """A fresh study name per run; the study is dropped before and after the test."""
    name = f"pg-share-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    _delete_study(name)  # also creates the schema once, before two processes race to do it
    yield name
    _delete_study(name)


def _write_config(path: Path, name: str, **changes) -> Path:
    path.write_text(yaml.safe_dump({"name": name, **CONFIG, "storage": POSTGRES_URL, **changes}))
    return path


def test_two_processes_share_one_study_on_postgres(tmp_path, study_name, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each "machine" its own MLflow store
    config = _write_config(tmp_path / "search.yaml", study_name)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two processes on few cores: no spinning threads
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    processes, logs = [], []
    try:
        for machine in ("a", "b"):
            log = (tmp_path / f"search-{machine}.log").open("w")
            logs.append(log)
            command = [sys.executable, "-m", "autosparse.cli", "--runs-dir",
                       str(tmp_path / f"runs-{machine}"), "search", str(config)]
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              cwd=tmp_path, start_new_session=True))
        deadline = time.time() + 240
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()
    outputs = {m: (tmp_path / f"search-{m}.log").read_text() for m in ("a", "b")}
    for process, (machine, output) in zip(processes, outputs.items()):
        assert process.returncode == 0, f"search on machine {machine} failed:\n{output[-3000:]}"

    study = optuna.load_study(study_name=study_name, storage=POSTGRES_URL)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    assert BUDGET <= len(finished) <= BUDGET + 1, "both processes may start the last trial"
    assert {t.state for t in finished} == {optuna.trial.TrialState.COMPLETE}
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    workers = {t.user_attrs["worker"] for t in finished}
    assert all(t.user_attrs.get("device") for t in finished), "each trial records its device"
    pids = {worker.rpartition(":")[2] for worker in workers}
    assert pids == {str(p.pid) for p in processes}, f"both processes ran trials: {workers}"

    # A third machine finds the budget used up and only reports the shared front.
    lines: list[str] = []
    again = run_search(config, runs_dir=tmp_path / "runs-c", printer=lines.append)
    assert again.new_trials == 0 and len(again.trials) == len(finished)
    assert any("already used" in line for line in lines)
    assert set(again.trials["trial"]) == {t.number for t in finished}
    assert again.storage_url == POSTGRES_URL

    # Same name, other objectives: the shared study refuses it instead of mixing two searches.
    other = _write_config(tmp_path / "other.yaml", study_name, objectives=["accuracy", "macs"])
    with pytest.raises(ConfigError, match="new 'name'"):
        run_search(other, runs_dir=tmp_path / "runs-c", printer=lambda line: None)
    assert len(optuna.load_study(study_name=study_name, storage=POSTGRES_URL).trials) == len(trials)
