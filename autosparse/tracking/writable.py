"""Where results go is checked before any work: the runs folder, the study's database and
MLflow's store must be writable (or reachable) before the dense model trains, and a write
that fails later (a full disk, a folder made read-only) is one line, not a traceback.

    check_folder(path)      a folder (or the nearest existing parent of a missing one) in
                            which a file can be created; nothing is left behind
    check_database(url)     SQLite: its folder passes check_folder (nothing is created);
                            a server URL: its driver imports and a connection opens
    storage_failure(err)    the one line for an error that is a failed write, else None
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from autosparse.config.validation import ConfigError
from autosparse.tracking.ui import _sqlite_path, redact_uri

CONNECT_TIMEOUT_S = 10
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}
# What SQLite and the database drivers say when a write cannot land (errors lose their errno
# on the way through SQLAlchemy and Optuna, so the words are what is left to recognise).
_WRITE_WORDS = ("database or disk is full", "disk i/o error", "readonly database",
                "read-only file system", "no space left on device", "disk quota exceeded",
                "file too large", "unable to open database file")
DRIVERS = {"postgresql": "psycopg[binary] (or psycopg2-binary)", "mysql": "pymysql"}


def check_folder(path: Path, what: str) -> None:
    """Refuse, in one line, a folder that is a file or where nothing can be written. Nothing
    is left behind: a missing folder is judged by its nearest existing parent (a file is
    created and removed there), so a command refused later has made no folder."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder: give a folder (it is made "
                          "if missing)")
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    try:
        if existing is None or not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {path}: nothing can be written there "
                          f"({err.strerror or err}): give a folder you can write to") from None


def check_database(url: str, what: str) -> None:
    """Refuse a study or MLflow database that cannot be written or reached, before any work.

    SQLite: the file's folder must be writable (judged as ``check_folder`` does: nothing is
    created); an existing file must be writable too. A server URL (PostgreSQL, MySQL): its
    driver must import and a connection must open within ``CONNECT_TIMEOUT_S``.
    """
    path = _sqlite_path(url)
    if path is not None:
        check_folder(path.parent, f"{what} folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"{what} {path} is read-only: make it writable, or give another "
                              "file")
        return
    scheme = url.partition("://")[0].split("+", 1)[0]
    if scheme not in DRIVERS:
        return  # sqlite in memory, a file journal, an MLflow server over http(s)
    import sqlalchemy

    shown = redact_uri(url)
    try:
        engine = sqlalchemy.create_engine(
            url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:
        raise ConfigError(f"{what} {shown}: the {scheme} driver is not installed ({err}): "
                          f"pip install {DRIVERS[scheme]}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise ConfigError(f"{what} {shown}: cannot connect ({_first_line(err)}): start the "
                          "database server or fix the URL") from None
    finally:
        engine.dispose()


def storage_failure(err: BaseException) -> str | None:
    """One line for an error that is a write that could not land (full disk, read-only
    folder or file); None for any other error, which keeps its traceback."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _WRITE_ERRNOS:
            where = f" {current.filename}" if current.filename else ""
            verb = ("no permission for" if current.errno in (errno.EACCES, errno.EPERM)
                    else "cannot write")  # a permission error may be a read: not "write"
            return f"{verb}{where}: {current.strerror or current}"
        text = str(current).lower()
        if any(words in text for words in _WRITE_WORDS):
            reason = re.sub(r"^\([\w.]+\)\s*", "", _first_line(current))  # the driver's class
            return f"cannot write the study or MLflow database: {reason}"
        current = current.__cause__ or current.__context__
    return None


def _first_line(err: BaseException) -> str:
    """The driver's own first line (SQLAlchemy keeps it as ``orig``), else the error's."""
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["check_database", "check_folder", "storage_failure"]
