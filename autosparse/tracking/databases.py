"""The study's database and MLflow's are never the same: both tools create their own tables in
whatever database they are given, so one pointed at the other's file would add its tables there
and mix two tools' data (and an MLflow store read as a study, or the reverse, fails later in a
stranger way).

    refuse  storage == tracking URI (the same SQLite file, or the same server URL)
    refuse  storage: an existing SQLite file holding MLflow's tables
    refuse  tracking URI: an existing SQLite file holding Optuna's tables

Checked before anything is built; files are opened read-only, never created.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from autosparse.config.validation import ConfigError
from autosparse.tracking.ui import _sqlite_path

OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})
MLFLOW_TABLES = frozenset({"experiments", "runs", "alembic_version"})


def sqlite_tables(path: Path) -> set[str]:
    """Table names of an existing SQLite file (read-only); empty for a file that is not one."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {str(name) for (name,) in rows}
    except sqlite3.DatabaseError:
        return set()


def _holds(path: Path | None, tables: frozenset[str]) -> bool:
    return path is not None and path.is_file() and tables <= sqlite_tables(path)


def check_tracking_store(tracking_uri: str) -> None:
    """Refuse a tracking URI that is an Optuna study's database."""
    path = _sqlite_path(tracking_uri)
    if _holds(path, OPTUNA_TABLES):
        raise ConfigError(f"tracking URI {tracking_uri} is an Optuna study database ({path}), "
                          "not MLflow's: give MLflow its own file (default runs/mlflow.db)")


def check_separate_stores(storage_url: str, tracking_uri: str) -> None:
    """Refuse a study storage and an MLflow store that are one database, or each other's."""
    storage_path, tracking_path = _sqlite_path(storage_url), _sqlite_path(tracking_uri)
    same = (storage_path == tracking_path) if storage_path and tracking_path \
        else storage_url.split("?")[0] == tracking_uri.split("?")[0]
    if same:
        raise ConfigError(f"storage and the MLflow tracking URI are the same database "
                          f"({storage_path or storage_url}): the study and MLflow's runs need "
                          "one each; remove 'storage' (default runs/<name>/study.db) or set "
                          "tracking.uri elsewhere")
    if _holds(storage_path, MLFLOW_TABLES):
        raise ConfigError(f"storage {storage_url} is an MLflow tracking database "
                          f"({storage_path}), not a study's: give the study its own file "
                          "(remove 'storage' for runs/<name>/study.db)")
    check_tracking_store(tracking_uri)


__all__ = ["check_separate_stores", "check_tracking_store", "sqlite_tables"]
