"""What happens when MLflow fails: tracking never kills a search.

Every public :class:`~autosparse.tracking.mlflow_tracker.Tracker` method is wrapped by
:func:`_safe`, which turns any MLflow, SQLAlchemy or network error into one
:class:`TrackingWarning` and a ``None`` result, with a cooldown (circuit breaker) for a store
found unreachable; :meth:`_FailureHandling._retry` retries SQLite's "database is locked" with a
jittered backoff. Kept apart so the policy reads in one place.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import warnings
from typing import Callable, TypeVar

from autosparse.tracking.naming import _truncate
from autosparse.tracking.ui import redact_uri

_log = logging.getLogger(__name__)

_LOCK_RETRIES = 6
_LOCK_BACKOFF_S = 0.1
_COOLDOWN_START_S = 30.0
_COOLDOWN_MAX_S = 900.0

T = TypeVar("T")


class _CallerError(ValueError):
    """A bad argument from our own caller: raised, never swallowed as a tracking failure."""


class TrackingWarning(UserWarning):
    """MLflow logging failed; the search goes on and nothing is lost (the study has it all)."""


def _exception_text(exc: BaseException) -> str:
    seen, parts, current = set(), [], exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " | ".join(parts).lower()


def _is_locked(exc: BaseException) -> bool:
    text = _exception_text(exc)
    return "database is locked" in text or "database table is locked" in text


_UNREACHABLE_HINTS = (
    "max retries exceeded",
    "connection refused",
    "failed to establish",
    "timed out",
    "timeout",
    "unable to open database",
    "name or service not known",
    "temporary failure in name resolution",
    "could not connect",
    "connection reset",
    "connection aborted",
    "readonly database",
    "read-only",
    "permission denied",
    "not a directory",
    "no such file or directory",
    "api request to",
)


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    text = _exception_text(exc)
    return any(hint in text for hint in _UNREACHABLE_HINTS)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {_truncate(line, limit)}"


class _FailureHandling:
    """The tracker's failure bookkeeping (cooldown after an unreachable store) and lock retry."""

    tracking_uri: str
    _down_until: float
    _cooldown: float
    def _note_failure(self, method: str, exc: BaseException) -> None:
        _log.debug("MLflow call %s failed", method, exc_info=exc)
        skipped = ""
        if _is_unreachable(exc):
            self._down_until = time.monotonic() + self._cooldown
            skipped = f"; per-trial logging paused for {self._cooldown:.0f} s"
            self._cooldown = min(self._cooldown * 2, _COOLDOWN_MAX_S)
        warnings.warn(
            f"MLflow tracking ({redact_uri(self.tracking_uri)}) failed in {method}: "
            f"{_first_line(exc)}{skipped}. The search continues and loses nothing (the Optuna "
            "study holds every trial); re-log later with `autosparse front`.",
            TrackingWarning,
            stacklevel=3,
        )

    def _note_success(self) -> None:
        self._down_until = 0.0
        self._cooldown = _COOLDOWN_START_S

    def _retry(self, call: Callable[[], T]) -> T:
        """Run one MLflow call, retrying SQLite lock contention with jittered backoff."""
        delay = _LOCK_BACKOFF_S
        for attempt in range(_LOCK_RETRIES):
            try:
                return call()
            except Exception as exc:
                if attempt == _LOCK_RETRIES - 1 or not _is_locked(exc):
                    raise
                time.sleep(delay * (1.0 + random.random()))
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


def _local_write_failure(tracking_uri: str, exc: BaseException) -> bool:
    """A local SQLite store that cannot be written (full disk, read-only): the study, in the
    same runs folder by default, is next; the search stops with one line instead of going on
    with a warning per trial. A server's failure never stops a search."""
    from autosparse.tracking.writable import storage_failure

    return tracking_uri.startswith("sqlite:") and storage_failure(exc) is not None


def _safe(*, breaker: bool = False) -> Callable:
    """Public-method wrapper: log-and-continue on any error, return None.

    With ``breaker``, a store that was just found unreachable is not retried until a cooldown
    (30 s, doubling up to 15 min) has passed, so a dead server costs one timeout per cooldown
    instead of one per trial. ``log_front``/``start_search`` always try: they are the recovery
    path.
    """

    def decorate(method: Callable[..., T]) -> Callable[..., T | None]:
        @functools.wraps(method)
        def wrapper(self: _FailureHandling, *args, **kwargs):
            if breaker and time.monotonic() < self._down_until:
                return None
            try:
                result = method(self, *args, **kwargs)
            except _CallerError:
                raise
            except Exception as exc:  # noqa: BLE001 - tracking must never kill a search
                if _local_write_failure(self.tracking_uri, exc):
                    raise  # a full disk or read-only folder here stops the study's writes too
                self._note_failure(method.__name__, exc)
                return None
            self._note_success()
            return result

        return wrapper

    return decorate
