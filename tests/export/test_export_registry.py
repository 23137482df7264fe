"""Tracker.log_exported_model against a real SQLite MLflow store (no mocks).

As in test_tracking: one migrated template database per session, copied for each test.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # noqa: E402
from mlflow_store import client, runs_dir, template_db, tracker  # noqa: E402,F401

from autosparse.tracking.errors import TrackingWarning  # noqa: E402
from autosparse.workload.models import DigitsCNN  # noqa: E402


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    out = {}
    for name, content in (("model.onnx", b"\x08\x07onnx"), ("report.md", b"# export\n"),
                          ("packed.pt", b"packed-bytes")):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        out[name] = path
    return out


def _strict(call, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # a swallowed failure fails the test
        return call(**kwargs)


def test_exported_model_is_registered_loadable_linked_and_has_its_files(
    tracker, client, files, tmp_path, one_thread, monkeypatch
):
    # MLflow's default store is ./mlflow.db: nothing may reach it (checked at the end)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parent = _strict(tracker.log_standalone_run, run_name="search", params={}, metrics={},
                     artifacts={})
    trial = _strict(tracker.log_standalone_run, run_name="trial-3", params={}, metrics={},
                    artifacts={})
    torch.manual_seed(0)
    model = DigitsCNN(1, 8, 8, 10).eval()
    example = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    uri_before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))

    run_id, version = _strict(
        tracker.log_exported_model,
        model=model, input_example=example, registered_name="digits-best",
        parent_run_id=parent, trial_run_id=trial, artifacts=files,
        metrics={"accuracy": 97.5, "int8_accuracy": 97.1, "latency_ms": 0.05,
                 "bad": float("nan")},
        params={"trial": "3", "format": "onnx+int8"},
    )
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == uri_before

    run = client.get_run(run_id)
    assert run.info.run_name == "export-digits-best" and run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["autosparse.parent_run_id"] == parent
    assert tags["autosparse.trial_run_id"] == trial
    assert tags["autosparse.role"] == "export"
    assert run.data.metrics == {"accuracy": 97.5, "int8_accuracy": 97.1, "latency_ms": 0.05}
    assert run.data.params == {"trial": "3", "format": "onnx+int8"}
    assert {a.path for a in client.list_artifacts(run_id)} >= set(files)
    download = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    for name, path in files.items():
        assert (download / name).read_bytes() == path.read_bytes()

    mv = client.get_model_version("digits-best", version)
    assert mv.status == "READY" and mv.run_id == run_id
    assert mv.tags["autosparse.trial_run_id"] == trial
    assert mv.tags["autosparse.parent_run_id"] == parent

    batch = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    # scoped to this store: a global set_tracking_uri would leak into later tests' searches
    with _use_tracking_uri(tracker.tracking_uri):
        loaded = mlflow.pyfunc.load_model(f"models:/digits-best/{version}")
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == uri_before
    assert "pickle_module_name" in loaded.metadata.flavors["python_function"]
    assert mv.source.startswith("models:/m-")
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run_id
    assert str(logged.status).endswith("READY")
    assert logged.artifact_location.startswith((tracker.runs_dir / "mlartifacts").as_uri())
    np.testing.assert_allclose(np.asarray(loaded.predict(batch)), expected, rtol=1e-6,
                               atol=1e-6)

    # a second export of the same name is the next version, without a parent it is not nested
    again = _strict(
        tracker.log_exported_model,
        model=model, input_example=example, registered_name="digits-best",
        parent_run_id=None, trial_run_id=None, artifacts={}, metrics={}, params={},
    )
    assert again is not None and again[1] == str(int(version) + 1)
    assert "mlflow.parentRunId" not in client.get_run(again[0]).data.tags
    assert list(cwd.iterdir()) == []


def test_missing_artifact_file_is_a_caller_error(tracker, client, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        tracker.log_exported_model(
            model=DigitsCNN(1, 8, 8, 10), input_example=np.zeros((1, 1, 8, 8), np.float32),
            registered_name="x", parent_run_id=None, trial_run_id=None,
            artifacts={"model.onnx": tmp_path / "nope.onnx"}, metrics={}, params={},
        )
    assert client.search_registered_models() == []
