"""One search process per study in a runs folder at a time; its own ``--workers`` share it.

Two ``autosparse search`` commands on one study would share its budget correctly but race on
everything around it: MLflow's parent run, the report files, a trial's child run. The search
therefore holds an exclusive ``flock`` on ``runs/<name>/.search.lock`` for as long as it runs.
The kernel drops the lock with the process, however it ends (SIGKILL included), so a killed
search never leaves a stale lock behind; the file only records who holds it, for the message.
``autosparse front`` reads the lock: while a search runs, it prints the front from storage but
leaves the search's MLflow run and report files to the search.

Several machines on one shared study (PostgreSQL) each hold the lock of their own runs folder.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from autosparse.config.schema import ConfigError
from autosparse.tracking.runs_list import LOCK_FILE, lock_holder, running_search


class SearchRunning(ConfigError):
    """Another search process holds the study's lock."""


def _running(folder: Path, name: str, holder: str) -> str:
    return (f"the search {name!r} is already running in {folder.parent} ({holder}): wait for "
            "it, or stop it and run the command again (it resumes); for more speed give one "
            "command --workers N")


def refuse_if_running(folder: Path, name: str) -> None:
    """Raise :class:`SearchRunning` while a search holds ``folder``'s lock."""
    holder = running_search(folder)
    if holder:
        raise SearchRunning(_running(folder, name, holder))


class SearchLock:
    """The exclusive lock a search holds on ``folder`` (``runs/<name>``) while it runs."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self._fd: int | None = None
        self._created: list[Path] = []  # folders acquire() made, innermost first

    def acquire(self) -> None:
        self._created = [f for f in (self.folder, *self.folder.parents) if not f.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SearchRunning(_running(self.folder, self.name, lock_holder(path))) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": started}).encode())
        self._fd = fd

    def release(self) -> None:
        """Unlock; a search that wrote nothing (refused while preparing) leaves nothing: the
        lock file and the folders it created go too."""
        if self._fd is None:
            return
        path = self.folder / LOCK_FILE
        if [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            for folder in self._created:  # innermost first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "SearchLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_FILE", "SearchLock", "SearchRunning", "refuse_if_running", "running_search"]
