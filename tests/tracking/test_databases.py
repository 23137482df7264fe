"""The study's database and MLflow's are never one: each pointed at the other's file is refused in
one line before anything runs, and the file keeps exactly its tables."""

from __future__ import annotations

import mlflow
import optuna
import pytest

from autosparse.cli import main
from autosparse.tracking.databases import MLFLOW_TABLES, OPTUNA_TABLES, sqlite_tables
from tests.search_helpers import write_config


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A real Optuna study database and a real MLflow store, as a search leaves them."""
    folder = tmp_path_factory.mktemp("stores")
    study_db, mlflow_db = folder / "study.db", folder / "mlflow.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{study_db}")
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}").create_experiment("e")
    assert OPTUNA_TABLES <= sqlite_tables(study_db) and MLFLOW_TABLES <= sqlite_tables(mlflow_db)
    return study_db, mlflow_db


def _refused(argv: list[str], capsys, words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


@pytest.mark.parametrize("which", ["storage-is-mlflow", "tracking-is-study", "same-file"])
def test_a_search_pointing_one_store_at_the_other_is_refused(which, stores, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_db, mlflow_db = stores
    before = {path: sqlite_tables(path) for path in stores}
    fields, words = {
        "storage-is-mlflow": ({"storage": f"sqlite:///{mlflow_db}"},
                              "is an MLflow tracking database"),
        "tracking-is-study": ({"tracking": {"uri": f"sqlite:///{study_db}"}},
                              "is an Optuna study database"),
        "same-file": ({"storage": f"sqlite:///{tmp_path / 'one.db'}",
                       "tracking": {"uri": f"sqlite:///{tmp_path / 'one.db'}"}},
                      "are the same database"),
    }[which]
    config = write_config(tmp_path, "x", **fields)
    runs = tmp_path / "runs"
    _refused(["--runs-dir", str(runs), "search", str(config)], capsys, words)
    assert not runs.exists() and not (tmp_path / "one.db").exists()
    assert {path: sqlite_tables(path) for path in stores} == before


def test_the_ui_refuses_a_study_database(stores, tmp_path, capsys):
    study_db, _ = stores
    before = sqlite_tables(study_db)
    _refused(["--runs-dir", str(tmp_path), "ui", "--tracking-uri", f"sqlite:///{study_db}",
              "--port", "5931"], capsys, "is an Optuna study database")
    assert sqlite_tables(study_db) == before
