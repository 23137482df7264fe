"""Fixtures for tests against a real MLflow SQLite store: one template database per session
(creating MLflow's schema takes seconds), copied into each test's fresh runs folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from autosparse.tracking.mlflow_tracker import Tracker
from autosparse.tracking.ui import default_tracking_uri


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def runs_dir(tmp_path, template_db) -> Path:
    runs = tmp_path / "runs"
    runs.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(template_db) + suffix)
        if source.exists():
            shutil.copy(source, runs / f"mlflow.db{suffix}")
    return runs


@pytest.fixture
def tracker(runs_dir) -> Tracker:
    return Tracker(tracking_uri=default_tracking_uri(runs_dir), experiment="demo",
                   runs_dir=runs_dir)


@pytest.fixture
def client(runs_dir) -> MlflowClient:
    return MlflowClient(tracking_uri=default_tracking_uri(runs_dir))
