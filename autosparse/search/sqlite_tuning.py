"""SQLite settings for the embedded stores (the Optuna study and MLflow under runs/).

Every Optuna param and attribute and every MLflow call is its own transaction; with SQLite's
defaults each commit waits for an fsync (~10 ms here), which made storage the largest cost of a
trial outside training. Write-ahead logging with ``synchronous=NORMAL`` commits without waiting:
a killed process loses nothing (the log is in the OS cache), only a power cut can drop the last
commits, and the database is never corrupted. WAL also lets worker processes read while one writes.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import event
from sqlalchemy.engine import Engine

_installed = False


def _tune(dbapi_connection, _record) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def use_fast_sqlite() -> None:
    """Apply the settings to every SQLite connection SQLAlchemy opens in this process."""
    global _installed
    if not _installed:
        event.listen(Engine, "connect", _tune)
        _installed = True
