"""MLflow tracking against a real SQLite store in tmp_path (no mocks).

Creating a fresh MLflow SQLite database runs ~100 schema migrations (about 10 s), so one
template database is migrated per session and each test works on its own copy of it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from autosparse.space.candidate import Candidate  # noqa: E402
from autosparse.tracking import naming, ui  # noqa: E402
from autosparse.tracking.errors import TrackingWarning  # noqa: E402
from autosparse.tracking.mlflow_tracker import Tracker  # noqa: E402
from autosparse.tracking.naming import sanitize_key  # noqa: E402
from autosparse.tracking.ui import (  # noqa: E402
    default_tracking_uri,
    redact_uri,
    resolve_tracking_uri,
    ui_command,
    ui_environment,
)

DENSE = {"accuracy": 98.0, "test_accuracy": 97.5, "size_kb": 400.0, "macs": 2.0e6}
from helpers import two_conv_candidate  # noqa: E402

CONFIG_TEXT = "name: demo\nmodel:\n  builtin: digits-cnn\n"


_candidate = two_conv_candidate


def make_trials() -> pd.DataFrame:
    rows = [
        (0, "COMPLETE", _candidate(("dense", 0, 32), ("dense", 0, 32)), "", True, True, False,
         98.0, 400.0, 2.0e6),
        (1, "COMPLETE", _candidate(("unstructured", 0.5, 8), ("2:4", 0.5, 4)), "", True, True,
         False, 97.5, 40.0, 1.5e6),
        (2, "COMPLETE", _candidate(("channel", 0.75, 4), ("unstructured", 0.9, 4)), "", True,
         False, True, 95.0, 80.0, 0.5e6),
        (3, "FAIL", _candidate(("unstructured", 0.5, 4), ("dense", 0, 4)),
         "RuntimeError: boom", False, False, False, math.nan, math.nan, math.nan),
        (4, "COMPLETE", _candidate(("channel", 0.9, 2), ("channel", 0.9, 2)), "", True, True,
         False, 90.0, 2.0, 0.1e6),
    ]
    frame = pd.DataFrame(
        rows,
        columns=["trial", "state", "candidate", "fail_reason", "feasible", "on_front", "cached",
                 "accuracy", "size_kb", "macs"],
    )
    frame["accuracy_drop"] = 98.0 - frame["accuracy"]
    frame["compression"] = 400.0 / frame["size_kb"]
    frame["bops"] = frame["macs"] * 8
    frame["latency_ms"] = frame["macs"] / 1e6
    return frame


def _row_metrics(row: pd.Series) -> dict[str, float]:
    skip = {"trial", "state", "candidate", "fail_reason", "feasible", "on_front", "cached"}
    return {k: v for k, v in row.items() if k not in skip}


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


from mlflow_store import client, runs_dir, template_db, tracker  # noqa: E402,F401


def _start(tracker: Tracker, small_table, **overrides) -> str:
    kwargs = dict(
        study_name="demo",
        storage_url="postgresql://alice:s3cret@db.example:5432/optuna",
        strategy="ga",
        config_text=CONFIG_TEXT,
        layer_table=small_table,
        dense_metrics=DENSE,
        params={"strategy": "ga", "budget_trials": 40, "objectives": "accuracy,size"},
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # a failure here is a test failure
        return tracker.start_search(**kwargs)


def _children(client: MlflowClient, parent) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {info.path for info in client.list_artifacts(run_id)}


# --------------------------------------------------------------------------------------------
# URIs and UI command (no MLflow store needed)
# --------------------------------------------------------------------------------------------


def test_default_and_resolved_tracking_uri(tmp_path, monkeypatch):
    default = default_tracking_uri(tmp_path / "runs")
    assert default == f"sqlite:///{(tmp_path / 'runs').absolute()}/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute path: four slashes
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "runs") == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert resolve_tracking_uri(None, tmp_path / "runs") == "http://mlflow.team:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path / "runs") == "sqlite:///x.db"


def test_ui_command_serves_the_same_store_on_localhost(tmp_path):
    uri = default_tracking_uri(tmp_path)
    command = ui_command(uri, tmp_path, port=5123)
    assert command[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5123"
    assert command[command.index("--backend-store-uri") + 1] == uri
    root = command[command.index("--default-artifact-root") + 1]
    assert root == (tmp_path.absolute() / "mlartifacts").as_uri()
    remote = ui_command("postgresql://u:p@host/db", tmp_path)
    assert "--default-artifact-root" not in remote
    with pytest.raises(ValueError, match="server"):
        ui_command("http://mlflow.team:5000", tmp_path)
    assert ui_environment({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_keys_are_sanitised_and_passwords_redacted():
    assert sanitize_key("blocks[0].conv:1") == "blocks_0_.conv_1"
    assert sanitize_key("features.0.weight") == "features.0.weight"
    assert sanitize_key("../up") == "_up" or not sanitize_key("../up").startswith("..")
    assert sanitize_key("a//b") == "a__b"
    assert redact_uri("postgresql://alice:s3cret@db:5432/optuna") == "postgresql://alice:***@db:5432/optuna"
    assert redact_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, autosparse.tracking.mlflow_tracker; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lock_errors_are_retried(tracker):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracker._retry(flaky) == "ok" and len(calls) == 3
    with pytest.raises(RuntimeError, match="other"):
        tracker._retry(lambda: (_ for _ in ()).throw(RuntimeError("other")))


# --------------------------------------------------------------------------------------------
# parent run
# --------------------------------------------------------------------------------------------


def test_start_search_creates_the_parent_run(tracker, client, small_table, runs_dir, tmp_path):
    parent = _start(tracker, small_table)
    run = client.get_run(parent)
    assert run.info.run_name == "demo" and run.info.status == "RUNNING"
    tags = run.data.tags
    assert tags["autosparse.search.study"] == "demo" and tags["autosparse.role"] == "search"
    assert tags["autosparse.strategy"] == "ga"
    assert tags["autosparse.compress.storage"] == "postgresql://alice:***@db.example:5432/optuna"
    assert run.data.params == {"strategy": "ga", "budget_trials": "40",
                               "objectives": "accuracy,size"}
    assert run.data.metrics == {"dense_accuracy": 98.0, "dense_test_accuracy": 97.5,
                                "dense_size_kb": 400.0, "dense_macs": 2.0e6}
    assert {"config.yaml", "layer_table.csv"} <= _artifacts(client, parent)
    local = Path(client.download_artifacts(parent, "layer_table.csv", str(tmp_path)))
    table = pd.read_csv(local)
    assert list(table.columns) == ["name", "kind", "weight_shape", "params", "macs"]
    assert list(table["name"]) == ["conv1", "conv2", "fc"]
    assert table.loc[0, "weight_shape"] == "16x1x3x3" and table.loc[0, "params"] == 16 * 9 + 16
    config = Path(client.download_artifacts(parent, "config.yaml", str(tmp_path)))
    assert config.read_text() == CONFIG_TEXT
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (runs_dir.absolute() / "mlartifacts" / "demo").as_uri()
    assert (runs_dir / "mlartifacts" / "demo").is_dir()


def test_resumed_search_reuses_its_parent_run(tracker, client, small_table, runs_dir):
    parent = _start(tracker, small_table)
    tracker.end_search(parent, "KILLED")
    assert client.get_run(parent).info.status == "KILLED"
    # A new process (new Tracker) resumes with a bigger budget and one new param.
    again = Tracker(tracking_uri=default_tracking_uri(runs_dir), experiment="demo",
                    runs_dir=runs_dir)
    resumed = _start(again, small_table,
                     params={"strategy": "ga", "budget_trials": 80, "seed": 3})
    assert resumed == parent
    run = client.get_run(parent)
    assert run.info.status == "RUNNING"
    assert run.data.params["budget_trials"] == "40"  # params are immutable: first value kept
    assert run.data.params["seed"] == "3"
    assert run.data.tags["autosparse.changed_on_resume"] == "budget_trials"
    assert len(client.get_metric_history(parent, "dense_accuracy")) == 1  # not re-logged
    # Another study in the same experiment gets its own parent.
    other = _start(tracker, small_table, study_name="other")
    assert other != parent
    tracker.end_search(parent)
    assert client.get_run(parent).info.status == "FINISHED"


# --------------------------------------------------------------------------------------------
# child runs
# --------------------------------------------------------------------------------------------


def test_log_trial_creates_nested_child_runs(tracker, client, small_table, tmp_path):
    parent = _start(tracker, small_table)
    trials = make_trials()
    ok = trials.iloc[1]
    start, end = 1_700_000_000_000, 1_700_000_042_500  # the trial's own times, epoch ms
    child = tracker.log_trial(
        parent_run_id=parent, trial=1, state="COMPLETE", candidate_json=ok["candidate"],
        metrics={**_row_metrics(ok), "energy_mj": math.inf}, cached=True, strategy="ga",
        start_ms=start, end_ms=end,
    )
    run = client.get_run(child)
    # the figures that matter in the name: the runs table shows it without picking columns
    assert run.info.run_name == "t1 97.5% 10x 1.5ms" and run.info.status == "FINISHED"
    assert (run.info.start_time, run.info.end_time) == (start, end)  # "Duration" = 42.5 s
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["autosparse.trial"] == "1" and tags["autosparse.on_front"] == "false"
    assert tags["autosparse.cached"] == "true" and tags["autosparse.strategy"] == "ga"
    assert tags["autosparse.candidate_key"] == Candidate.from_json(ok["candidate"]).key
    assert run.data.params["conv1.pattern"] == "unstructured"
    assert run.data.params["conv1.sparsity"] == "0.5"
    assert run.data.params["conv1.bits"] == "8"
    assert run.data.params["conv2.pattern"] == "2:4"
    assert run.data.params["conv2.criterion"] == "magnitude"
    assert run.data.metrics["accuracy"] == 97.5 and run.data.metrics["latency_ms"] == 1.5
    assert "energy_mj" not in run.data.metrics  # non-finite values are not logged
    saved = Path(client.download_artifacts(child, "candidate.json", str(tmp_path)))
    assert json.loads(saved.read_text()) == json.loads(ok["candidate"])

    failed = tracker.log_trial(
        parent_run_id=parent, trial=3, state="FAIL", candidate_json="",
        metrics={"accuracy": math.nan}, fail_reason="RuntimeError: " + "x" * 5000,
    )
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and run.info.run_name == "t3 failed"
    reason = run.data.tags["autosparse.fail_reason"]
    assert reason.startswith("RuntimeError: ") and len(reason) <= 1000
    assert run.data.metrics == {} and run.data.params == {}


def test_log_trial_is_idempotent(tracker, client, small_table):
    parent = _start(tracker, small_table)
    row = make_trials().iloc[0]
    kwargs = dict(parent_run_id=parent, trial=0, state="COMPLETE",
                  candidate_json=row["candidate"], metrics=_row_metrics(row))
    first = tracker.log_trial(**kwargs)
    second = tracker.log_trial(**kwargs)
    assert first == second
    assert len(_children(client, parent)) == 1
    assert len(client.get_metric_history(first, "accuracy")) == 1


def test_log_front_fills_gaps_tags_the_front_and_extends_histories(
    tracker, client, small_table, tmp_path
):
    parent = _start(tracker, small_table)
    trials = make_trials()
    # MLflow was "down" for trials 2..4: only 0 and 1 were logged live.
    for _, row in trials.iloc[:2].iterrows():
        tracker.log_trial(parent_run_id=parent, trial=int(row["trial"]), state=row["state"],
                          candidate_json=row["candidate"], metrics=_row_metrics(row))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        tracker.log_front(parent_run_id=parent, trials=trials.iloc[:4],
                          objectives=["accuracy", "size"],
                          hypervolumes={"hypervolume": [0.1, 0.2, 0.3, 0.3],
                                        "hypervolume_wide": [math.nan, 0.0, 0.05, 0.05]},
                          dense_metrics=DENSE)
    children = {int(r.data.tags["autosparse.trial"]): r for r in _children(client, parent)}
    assert sorted(children) == [0, 1, 2, 3]
    assert {n: r.data.tags["autosparse.on_front"] for n, r in children.items()} == {
        0: "true", 1: "true", 2: "false", 3: "false"}
    assert children[3].info.status == "FAILED"
    assert children[3].data.tags["autosparse.fail_reason"] == "RuntimeError: boom"
    assert children[2].data.metrics["compression"] == 5.0
    assert _artifacts(client, parent) >= {"pareto.csv", "pareto.html", "pareto.png", "trials.csv",
                                          "config.yaml", "layer_table.csv"}
    front = pd.read_csv(client.download_artifacts(parent, "pareto.csv", str(tmp_path / "a")))
    assert list(front["trial"]) == [1, 0]

    # Later: one more trial finished, the front changed (trial 1 still on it, 4 joins).
    trials.loc[trials["trial"] == 0, "on_front"] = False
    trials["datetime_start"] = ["", "", "", "", "2026-01-02T03:04:05.000"]
    trials["datetime_complete"] = ["", "", "", "", "2026-01-02T03:04:17.250"]
    tracker.log_front(parent_run_id=parent, trials=trials, objectives=["accuracy", "size"],
                      hypervolumes={"hypervolume": [0.1, 0.2, 0.3, 0.3, 0.5],
                                    "hypervolume_wide": [math.nan, 0.0, 0.05, 0.05, 0.2]},
                      dense_metrics=DENSE)
    children = {int(r.data.tags["autosparse.trial"]): r for r in _children(client, parent)}
    assert sorted(children) == [0, 1, 2, 3, 4]  # no duplicates, the new one created
    assert children[0].data.tags["autosparse.on_front"] == "false"
    assert children[4].data.tags["autosparse.on_front"] == "true"
    # the front marker follows the front: trial 0 left it, trial 4 (created here) joined it
    names = {n: r.info.run_name for n, r in children.items()}
    assert names[0] == "t0 98.0% 1x 2ms" and names[1].startswith("★ t1 97.5%")
    assert names[4] == "★ t4 90.0% 200x 0.1ms" and names[3] == "t3 failed"
    # a run created from storage gets the trial's own start and end (trials_frame's columns)
    assert (children[4].info.start_time, children[4].info.end_time) == (
        naming._iso_ms("2026-01-02T03:04:05.000"), naming._iso_ms("2026-01-02T03:04:17.250"))
    history = client.get_metric_history(parent, "hypervolume")
    assert sorted((m.step, m.value) for m in history) == [
        (0, 0.1), (1, 0.2), (2, 0.3), (3, 0.3), (4, 0.5)]
    wide = client.get_metric_history(parent, "hypervolume_wide")
    assert sorted(m.step for m in wide) == [1, 2, 3, 4]
    metrics = client.get_run(parent).data.metrics
    assert metrics["hypervolume"] == 0.5  # the latest value is the final one
    assert metrics["n_trials"] == 5 and metrics["n_failed"] == 1 and metrics["front_size"] == 2
    assert [m.step for m in client.get_metric_history(parent, "n_trials")] == [4, 5]
    front = pd.read_csv(client.download_artifacts(parent, "pareto.csv", str(tmp_path / "b")))
    assert list(front["trial"]) == [4, 1]  # re-logging overwrote the artifact
    html = Path(client.download_artifacts(parent, "pareto.html", str(tmp_path / "b"))).read_text()
    assert "trial 4" in html


def test_the_experiment_opens_in_the_model_training_view(tracker, client, small_table):
    """MLflow 3 shows an experiment without a kind in its GenAI view (no runs table)."""
    from autosparse.tracking.store import KIND_TAG, MODEL_TRAINING

    parent = _start(tracker, small_table)
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id)
    assert experiment.tags[KIND_TAG] == MODEL_TRAINING == "custom_model_development"


def test_log_front_stores_the_runs_table_view_and_ui_links_to_it(tracker, client, small_table):
    parent = _start(tracker, small_table)
    tracker.log_front(parent_run_id=parent, trials=make_trials(), objectives=["accuracy", "size"],
                      hypervolumes={})
    experiment = client.get_run(parent).info.experiment_id
    view = json.loads(client.get_experiment(experiment).tags[ui.VIEW_TAG])
    assert view["selectedColumns"][:4] == ["attributes.`Duration`", "metrics.`accuracy`",
                                           "metrics.`size_kb`", "metrics.`compression`"]
    base = "http://127.0.0.1:5000"
    urls = ui.runs_table_urls(tracker.tracking_uri, base)
    assert urls == {"demo": f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
                            "&viewStateShareKey=autosparse"}


def test_run_names_carry_the_figures_and_the_front_marker():
    metrics = {"accuracy": 97.24, "compression": 24.71, "latency_ms": 0.8123, "size_kb": 7.7}
    assert naming.run_name(12, "COMPLETE", metrics) == "t12 97.2% 24.7x 0.812ms"
    assert naming.run_name(12, "COMPLETE", metrics, on_front=True).startswith("★ t12 97.2%")
    assert naming.run_name(3, "FAIL", {}) == "t3 failed"
    assert naming.run_name(4, "PRUNED", {"accuracy": 50.0}) == "t4 screened 50.0%"
    assert naming.run_name(5, "COMPLETE", {"mse": 0.0312, "compression": 3.0},
                             metric_name="mse") == "t5 mse 0.0312 3x"



def test_a_re_evaluated_front_point_is_named_with_the_mean_that_decided_its_star():
    row = {"accuracy": 98.14, "accuracy_single": 97.77, "accuracy_seeds": 3.0}
    own = {"accuracy": 97.77, "compression": 28.27}
    figures, seeds = naming.name_figures(row, own, "accuracy")
    assert naming.run_name(35, "COMPLETE", figures, on_front=True, seeds=seeds) == \
        "★ t35 98.1% (3 seeds) 28.3x"
    single = {"accuracy": 97.0, "accuracy_seeds": float("nan")}
    assert naming.name_figures(single, own, "accuracy") == (own, None)


def test_child_left_running_by_a_crash_is_completed(tracker, client, small_table):
    parent = _start(tracker, small_table)
    experiment = client.get_run(parent).info.experiment_id
    # A worker died right after creating its child run.
    client.create_run(experiment, run_name="trial-2", tags={
        "mlflow.parentRunId": parent, "autosparse.trial": "2", "autosparse.on_front": "false"})
    trials = make_trials().iloc[:3]
    tracker.log_front(parent_run_id=parent, trials=trials, objectives=["accuracy", "size"],
                      hypervolumes={})
    children = {int(r.data.tags["autosparse.trial"]): r for r in _children(client, parent)}
    assert sorted(children) == [0, 1, 2]
    assert children[2].info.status == "FINISHED"
    assert children[2].data.params["conv1.pattern"] == "channel"


def test_duplicate_children_from_a_race_collapse_to_the_oldest(tracker, client, small_table):
    parent = _start(tracker, small_table)
    row = make_trials().iloc[0]
    kwargs = dict(parent_run_id=parent, trial=0, state="COMPLETE",
                  candidate_json=row["candidate"], metrics=_row_metrics(row))
    first = tracker.log_trial(**kwargs)
    experiment = client.get_run(parent).info.experiment_id
    time.sleep(0.01)
    twin = client.create_run(experiment, run_name="trial-0", tags={
        "mlflow.parentRunId": parent, "autosparse.trial": "0"}).info.run_id
    tracker.log_front(parent_run_id=parent, trials=make_trials().iloc[:1],
                      objectives=["accuracy", "size"], hypervolumes={})
    assert [r.info.run_id for r in _children(client, parent)] == [first]
    assert client.get_run(twin).info.lifecycle_stage == "deleted"


# --------------------------------------------------------------------------------------------
# resilience
# --------------------------------------------------------------------------------------------


def _call_everything(tracker: Tracker, small_table) -> list:
    trials = make_trials()
    return [
        tracker.start_search(study_name="demo", storage_url="sqlite:///x.db", strategy="ga",
                             config_text=CONFIG_TEXT, layer_table=small_table,
                             dense_metrics=DENSE, params={"a": 1}),
        tracker.log_trial(parent_run_id="0" * 32, trial=0, state="COMPLETE",
                          candidate_json=trials.loc[0, "candidate"], metrics={"accuracy": 1.0}),
        tracker.log_front(parent_run_id="0" * 32, trials=trials, objectives=["accuracy", "size"],
                          hypervolumes={"hypervolume": [0.1]}),
        tracker.end_search("0" * 32),
    ]


def test_unusable_sqlite_store_warns_and_returns_none(tmp_path, small_table):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker}/runs/mlflow.db"
    tracker = Tracker(tracking_uri=uri, experiment="demo", runs_dir=tmp_path)
    start = time.monotonic()
    with pytest.warns(TrackingWarning, match="search continues"):
        results = _call_everything(tracker, small_table)
    assert results == [None, None, None, None]
    assert time.monotonic() - start < 10


def test_unreachable_server_warns_and_returns_none(tmp_path, small_table, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker(tracking_uri="http://127.0.0.1:9", experiment="demo", runs_dir=tmp_path)
    start = time.monotonic()
    with pytest.warns(TrackingWarning) as record:
        results = _call_everything(tracker, small_table)
    assert results == [None, None, None, None]
    messages = [str(w.message) for w in record]
    assert all("\n" not in m and "autosparse front" in m for m in messages)
    # log_trial was skipped by the breaker right after start_search found the server down.
    assert not any("log_trial" in m for m in messages)
    assert time.monotonic() - start < 30


def test_bad_status_is_a_caller_error(tracker):
    with pytest.raises(ValueError, match="status"):
        tracker.end_search("abc", status="DONE")


# --------------------------------------------------------------------------------------------
# the UI, for real
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, data: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


@pytest.mark.integration
def test_mlflow_ui_serves_the_search(tracker, small_table, runs_dir):
    parent = _start(tracker, small_table)
    tracker.end_search(parent)
    port = _free_port()
    command = ui_command(default_tracking_uri(runs_dir), runs_dir, port)
    log = runs_dir / "ui.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   env=ui_environment(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _get(f"{base}/health").strip() == b"OK":
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow UI did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        found = json.loads(_get(f"{base}/api/2.0/mlflow/experiments/search",
                                data=json.dumps({"max_results": 100}).encode()))
        assert "demo" in [e["name"] for e in found["experiments"]]
        listed = json.loads(_get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={parent}"))
        assert {"config.yaml", "layer_table.csv"} <= {f["path"] for f in listed["files"]}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=5)


def test_an_unreadable_candidate_does_not_stop_the_front(tracker, client, small_table):
    parent = _start(tracker, small_table)
    trials = make_trials().iloc[:2].copy()
    trials.loc[0, "candidate"] = '{"conv1": {"pattern": "nonsense"}}'
    tracker.log_front(parent_run_id=parent, trials=trials, objectives=["accuracy", "size"],
                      hypervolumes={})
    children = {int(r.data.tags["autosparse.trial"]): r for r in _children(client, parent)}
    assert sorted(children) == [0, 1]
    assert children[0].data.params == {} and children[0].data.metrics["accuracy"] == 98.0
    assert children[1].data.params["conv2.pattern"] == "2:4"


@pytest.mark.integration
def test_autosparse_ui_prints_the_runs_url_and_stops_its_server_on_sigterm(tracker, small_table,
                                                                          runs_dir):
    import psutil

    parent = _start(tracker, small_table)
    tracker.end_search(parent)
    port = _free_port()
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "autosparse.cli", "--runs-dir", str(runs_dir), "ui", "--port",
         str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"MLflow UI on http://127.0.0.1:{port}"), lines
        assert f"http://127.0.0.1:{port}/#/experiments/" in lines[1], lines
        assert lines[1].rstrip().endswith("/runs?workflowType=machine_learning")
        deadline = time.monotonic() + 90
        while True:
            try:
                if _get(f"http://127.0.0.1:{port}/health").strip() == b"OK":
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert process.poll() is None and time.monotonic() < deadline, "UI did not start"
            time.sleep(0.5)
        servers = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) != 0
        _, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive, "the MLflow server outlived autosparse ui"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the port still serves"
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()
