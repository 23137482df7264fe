"""MLflow as the window on a search: parent run = the search, one child run per trial.

The Optuna study is the source of truth; everything here is a best-effort copy of it. So:

- every public :class:`Tracker` method catches whatever MLflow, SQLAlchemy or the network throws,
  emits one :class:`TrackingWarning` line and returns ``None``: tracking never kills a search, and
  ``autosparse front`` re-logs everything from storage later (:meth:`Tracker.log_front` creates
  the child runs that are missing);
- everything is idempotent: the parent run is found again by its tags on resume, a trial's child
  run is created once, metric histories are only extended;
- only ``MlflowClient`` with an explicit tracking URI is used, never the fluent API's global
  active-run state, so several worker processes can log into one store; SQLite's "database is
  locked" is retried with a short backoff.

This is the only module of the project that imports mlflow. The import costs seconds, so it
happens on first use, not at import time: the CLI can build a UI command or resolve a URI for free.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import os
import posixpath
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar
from urllib.parse import urlsplit, urlunsplit

from autosparse.config.objectives import OBJECTIVES, shown_metric, shown_metrics
from autosparse.space.candidate import Candidate
from autosparse.space.layers import LayerTable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
    """One library logger raised to ``level`` for a block, then restored."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)

TAG_STUDY = "autosparse.search.study"
TAG_STUDY_UID = "autosparse.study_uid"
TAG_ROLE = "autosparse.role"
TAG_STRATEGY = "autosparse.strategy"
TAG_STORAGE = "autosparse.compress.storage"
TAG_TRIAL = "autosparse.trial"
TAG_STATE = "autosparse.state"
TAG_ON_FRONT = "autosparse.on_front"
TAG_CACHED = "autosparse.cached"
TAG_CANDIDATE_KEY = "autosparse.candidate_key"
TAG_LAYERS = "autosparse.space.layers"
TAG_FAIL_REASON = "autosparse.fail_reason"
TAG_PARENT = "mlflow.parentRunId"
ROLE_SEARCH = "search"
ROLE_TRIAL = "trial"

_STATE_TO_STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED",
                    "INTERRUPTED": "KILLED"}
_TERMINAL = {"FINISHED", "FAILED", "KILLED"}
_RUN_STATUSES = {"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"}

# MLflow limits (mlflow.utils.validation), kept below so a change upstream cannot bite.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 5000
_MAX_KEY = 250
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_FAIL_REASON_CHARS = 1000

_LOCK_RETRIES = 6
_LOCK_BACKOFF_S = 0.1
_COOLDOWN_START_S = 30.0
_COOLDOWN_MAX_S = 900.0

T = TypeVar("T")


class _CallerError(ValueError):
    """A bad argument from our own caller: raised, never swallowed as a tracking failure."""


class TrackingWarning(UserWarning):
    """MLflow logging failed; the search goes on and nothing is lost (the study has it all)."""


# --------------------------------------------------------------------------------------------
# URIs and the UI
# --------------------------------------------------------------------------------------------


def default_tracking_uri(runs_dir: Path) -> str:
    """``sqlite:///<absolute runs_dir>/mlflow.db``."""
    return f"sqlite:///{(Path(runs_dir).expanduser().absolute() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(config_uri: str | None, runs_dir: Path) -> str:
    """The config's URI if given, else ``$MLFLOW_TRACKING_URI``, else the SQLite default."""
    if config_uri:
        return config_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return default_tracking_uri(runs_dir)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), None for other or in-memory URIs."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw).expanduser().absolute()


def local_artifact_root(tracking_uri: str, runs_dir: Path) -> Path | None:
    """Where artifacts of experiments we create go when the store is a local SQLite file.

    ``<directory of the database>/mlartifacts``: for the default URI that is
    ``<runs_dir>/mlartifacts``; a shared SQLite file elsewhere keeps its artifacts beside it.
    None for a server or another database (the server decides).
    """
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    return db.parent / "mlartifacts"


def ui_command(tracking_uri: str, runs_dir: Path, port: int = 5000, *, workers: int = 1) -> list[str]:
    """argv that serves the MLflow UI on 127.0.0.1 against the same store as the search.

    One worker is plenty for one person browsing and starts much faster on a small machine.
    A tracking *server* (``http(s)://``) already has a UI: open it instead.
    """
    scheme = urlsplit(tracking_uri).scheme.lower()
    if scheme in ("http", "https", "databricks"):
        raise ValueError(
            f"tracking URI {redact_uri(tracking_uri)} is a tracking server: open it in a browser "
            "instead of starting a local UI"
        )
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    root = local_artifact_root(tracking_uri, runs_dir)
    if root is not None:
        command += ["--default-artifact-root", root.as_uri()]
    command += ["--host", "127.0.0.1", "--port", str(int(port)), "--workers", str(int(workers))]
    return command


def runs_table_urls(tracking_uri: str, base: str) -> dict[str, str]:
    """Experiment name -> URL of its runs table (MLflow 3 opens an experiment on its GenAI page,
    where no runs show), with autosparse's view (metric columns shown, see :data:`VIEW_TAG`)
    where a search logged one. {} if the store is unreadable."""
    urls = {}
    for name, (experiment_id, has_view) in _experiments(tracking_uri).items():
        url = f"{base}/#/experiments/{experiment_id}/runs"
        urls[name] = f"{url}?viewStateShareKey={VIEW_KEY}" if has_view else url
    return urls


def _experiments(tracking_uri: str) -> dict[str, tuple[str, bool]]:
    try:
        from mlflow import MlflowClient  # lazy, as everywhere here: a slow import

        with contextlib.redirect_stdout(io.StringIO()):  # MLflow's "Registry store URI" note
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            experiments = client.search_experiments()
        return {e.name: (e.experiment_id, VIEW_TAG in (e.tags or {}))
                for e in experiments if e.name != "Default"}
    except Exception:  # noqa: BLE001 - the URLs are a convenience; the UI still starts
        return {}


# MLflow 3.17 has no server-side default for the runs table's columns (the UI keeps them in the
# browser's localStorage, showing none of the metrics at first). What it does read from the
# server is a *shared view*: an experiment tag ``mlflow.sharedViewState.<key>`` holding the
# view's JSON, opened with ``#/experiments/<id>/runs?viewStateShareKey=<key>``. log_front keeps
# one such view per experiment; ``autosparse ui`` prints its URL.
VIEW_KEY = "autosparse"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
_VIEW_EXTRA_METRICS = ("compression", "accuracy_drop", "hypervolume", "front_size", "n_trials")


def view_state(metric_names: Iterable[str]) -> dict[str, Any]:
    """The runs-table view: Duration and the given metrics as columns, newest first (log_front
    names the objectives' metrics, then compression, the accuracy drop and the parent's
    hypervolume, front size and trial count)."""
    names: list[str] = []
    for name in metric_names:
        if name not in names:
            names.append(name)
    columns = ["attributes.`Duration`", *(f"metrics.`{name}`" for name in names)]
    return {"selectedColumns": columns, "orderByKey": "attributes.start_time",
            "orderByAsc": False}


def ui_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for :func:`ui_command`: MLflow's GenAI job runner off (an extra process that
    a local browsing UI does not need and that slows its start)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by ``***`` (storage URLs end up in tags and logs)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def sanitize_key(key: str) -> str:
    """A valid MLflow param/metric/tag key: alphanumerics, ``_ - . space /``; no path tricks."""
    text = _BAD_KEY_CHARS.sub("_", str(key)).strip()
    if text != posixpath.normpath(text) or text.startswith(("/", "..")) or text in ("", "."):
        text = text.replace("/", "_").strip(". ") or "_"
    return text[:_MAX_KEY]


def _truncate(text: str, limit: int) -> str:
    """Keep head and tail (a traceback's last line is the useful one)."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head - 5
    return f"{text[:head]} ... {text[-tail:]}"


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        try:
            text = json.dumps(value, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return _truncate(text, _MAX_PARAM_VALUE)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    """A string cell of the trials frame; NaN/None (pandas' missing) become ""."""
    return value if isinstance(value, str) else ""


def _flag(value: Any) -> bool:
    """A boolean cell of the trials frame; NaN/None (missing) is False."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return bool(value)


def _own_metrics(row: dict[str, Any], metric_cols: list[str]) -> dict[str, Any]:
    """A trial row's metrics as the trial scored them: its own accuracy, not the seeds' mean."""
    metrics = {c: row.get(c) for c in metric_cols}
    if _finite(row.get("accuracy_single")) is not None:
        metrics["accuracy"] = row["accuracy_single"]
    return metrics


def _spread_metrics(row: dict[str, Any]) -> dict[str, float]:
    """accuracy_mean/std and test_accuracy of a re-evaluated trial row; {} for the others."""
    seeds = _finite(row.get("accuracy_seeds"))
    if seeds is None or seeds < 2:
        return {}
    return _finite_metrics({"accuracy_mean": row.get("accuracy"), "accuracy_std": row.get(
        "accuracy_std"), "accuracy_seeds": seeds, "test_accuracy": row.get("test_accuracy")})


def _finite_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        number = _finite(value)
        if number is not None:
            out[sanitize_key(key)] = number
    return out


def layer_params(candidate_json: str) -> dict[str, str]:
    """``{"<layer>.pattern": ..., "<layer>.sparsity": ..., "<layer>.bits": ..., ...}``."""
    if not candidate_json:
        return {}
    candidate = Candidate.from_json(candidate_json)
    params: dict[str, str] = {}
    for name, choice in candidate.items():
        base = sanitize_key(name)[: _MAX_KEY - len(".criterion")]
        params[f"{base}.pattern"] = choice.pattern
        params[f"{base}.sparsity"] = f"{choice.sparsity:g}"
        params[f"{base}.bits"] = str(choice.bits)
        params[f"{base}.criterion"] = choice.criterion
    return params


FRONT_MARK = "★"
# The figures a child run's name carries, in order: metric, format (MLflow's runs table shows
# the name in every view, while metric columns must be picked by hand).
_NAME_FIGURES = (("compression", "{:.3g}x"), ("latency_ms", "{:.3g}ms"),
                 ("energy_uj", "{:.3g}uJ"))


def run_name(trial: int, state: str, metrics: dict[str, Any] | None,
             *, on_front: bool = False, metric_name: str = "accuracy") -> str:
    """A child run's name: ``t12 97.2% 24.7x 0.81ms`` (the figures it has; ``t12 mse 0.031
    24.7x`` for a task metric of another name), ``t3 failed``; ``★ `` in front of a front
    member, so the runs table marks the front at a glance."""
    parts = [f"t{int(trial)}"]
    state = str(state).upper()
    metrics = metrics or {}
    if state in ("FAIL", "INTERRUPTED"):
        parts.append("failed" if state == "FAIL" else "interrupted")
    else:
        if state == "PRUNED":
            parts.append("screened")
        task = _finite(metrics.get(metric_name))
        if task is not None:
            parts.append(f"{task:.1f}%" if metric_name == "accuracy"
                         else f"{metric_name} {task:.4g}")
        for key, form in _NAME_FIGURES:
            value = _finite(metrics.get(key))
            if value is not None:
                parts.append(form.format(value))
    name = " ".join(parts)
    return f"{FRONT_MARK} {name}" if on_front else name


def _epoch_ms(value: Any) -> int | None:
    number = _finite(value)
    return None if number is None or number <= 0 else int(number)


def _iso_ms(value: Any) -> int | None:
    """Epoch ms of an ISO timestamp (the trials frame's ``datetime_start``); None if absent.
    Optuna stores naive local times: read them as local, as Optuna wrote them."""
    if not isinstance(value, str) or not value.strip():
        return None
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(value.strip()).timestamp() * 1000)
    except ValueError:
        return None


def layer_table_csv(table: LayerTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "kind", "weight_shape", "params", "macs"])
    for layer in table.layers:
        writer.writerow(
            [
                layer.name,
                layer.kind,
                "x".join(str(d) for d in layer.weight_shape),
                layer.weight_count + layer.bias_count,
                layer.macs,
            ]
        )
    return buffer.getvalue()


def _quote(value: str) -> str:
    """A filter-string literal (MLflow has no escapes: pick the quote the value lacks)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"value {value!r} holds both quote characters")


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


def _safe(*, breaker: bool = False) -> Callable:
    """Public-method wrapper: log-and-continue on any error, return None.

    With ``breaker``, a store that was just found unreachable is not retried until a cooldown
    (30 s, doubling up to 15 min) has passed, so a dead server costs one timeout per cooldown
    instead of one per trial. ``log_front``/``start_search`` always try: they are the recovery
    path.
    """

    def decorate(method: Callable[..., T]) -> Callable[..., T | None]:
        @functools.wraps(method)
        def wrapper(self: "Tracker", *args, **kwargs):
            if breaker and time.monotonic() < self._down_until:
                return None
            try:
                result = method(self, *args, **kwargs)
            except _CallerError:
                raise
            except Exception as exc:  # noqa: BLE001 - tracking must never kill a search
                self._note_failure(method.__name__, exc)
                return None
            self._note_success()
            return result

        return wrapper

    return decorate


# --------------------------------------------------------------------------------------------
# the tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """Logs a search into MLflow: ``start_search`` → ``log_trial``×N → ``log_front`` → ``end_search``.

    Lifecycle (each step idempotent, each safe to call after MLflow was down)::

        parent = tracker.start_search(...)          # find-or-create the study's parent run
        tracker.log_trial(parent_run_id=parent, ...) # per finished trial, from any worker
        tracker.log_front(parent_run_id=parent, trials=frame, ...)  # fills gaps, front, plots
        tracker.end_search(parent)

    Nothing touches MLflow before the first call, so constructing a Tracker never fails.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, runs_dir: Path):
        if not isinstance(tracking_uri, str) or not tracking_uri:
            raise ValueError(f"tracking_uri must be a non-empty string, got {tracking_uri!r}")
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.runs_dir = Path(runs_dir)
        self._client_obj: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_experiment: dict[str, str] = {}
        self._down_until = 0.0
        self._cooldown = _COOLDOWN_START_S

    def __repr__(self) -> str:
        return f"Tracker({redact_uri(self.tracking_uri)!r}, experiment={self.experiment!r})"

    # ---- failure bookkeeping -----------------------------------------------------------------

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

    # ---- plumbing ----------------------------------------------------------------------------

    @property
    def _client(self) -> "MlflowClient":
        if self._client_obj is None:
            db = _sqlite_path(self.tracking_uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client_obj

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

    def _experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        client = self._client
        experiment = self._retry(lambda: client.get_experiment_by_name(self.experiment))
        if experiment is None:
            root = local_artifact_root(self.tracking_uri, self.runs_dir)
            location = None
            if root is not None:
                folder = root / sanitize_key(self.experiment).replace("/", "_").replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                location = folder.as_uri()
            try:
                experiment_id = self._retry(
                    lambda: client.create_experiment(self.experiment, artifact_location=location)
                )
            except Exception as exc:
                # Another worker created it between our lookup and our create.
                experiment = self._retry(lambda: client.get_experiment_by_name(self.experiment))
                if experiment is None:
                    raise exc
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                _log.info("restoring deleted MLflow experiment %r", self.experiment)
                self._retry(lambda: client.restore_experiment(experiment_id))
        self._experiment_id = experiment_id
        return experiment_id

    def _search(self, experiment_id: str, filter_string: str) -> list["Run"]:
        """Every active run matching the filter (all pages)."""
        client = self._client
        runs: list[Run] = []
        token = None
        while True:
            page = self._retry(
                lambda: client.search_runs(
                    [experiment_id], filter_string=filter_string, max_results=1000,
                    page_token=token,
                )
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _find_or_create(
        self, experiment_id: str, filter_string: str, run_name: str, tags: dict[str, str],
        start_time: int | None = None,
    ) -> tuple["Run", bool]:
        """The oldest active run matching the filter, or a new one. Returns (run, created).

        Two processes racing both create a run; both then see both, keep the oldest and the
        loser deletes its own, so the store converges on one run.
        """
        client = self._client
        found = self._search(experiment_id, filter_string)
        if found:
            return self._oldest(found), False
        run = self._retry(
            lambda: client.create_run(experiment_id, run_name=run_name, tags=tags,
                                      start_time=start_time)
        )
        found = self._search(experiment_id, filter_string)
        winner = self._oldest(found) if found else run
        if winner.info.run_id != run.info.run_id:
            self._retry(lambda: client.delete_run(run.info.run_id))
            return winner, False
        return run, True

    @staticmethod
    def _oldest(runs: list["Run"]) -> "Run":
        return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _log_batch(self, run_id: str, *, metrics=(), params=(), tags=()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._client
        metrics = [m if isinstance(m, Metric) else Metric(*m) for m in metrics]
        params = [Param(k, v) for k, v in params]
        tags = [RunTag(k, v) for k, v in tags]
        for chunk in _chunks(metrics, _MAX_METRICS_PER_BATCH):
            self._retry(lambda: client.log_batch(run_id, metrics=chunk, synchronous=True))
        for chunk in _chunks(params, _MAX_PARAMS_TAGS_PER_BATCH):
            self._retry(lambda: client.log_batch(run_id, params=chunk, synchronous=True))
        for chunk in _chunks(tags, _MAX_PARAMS_TAGS_PER_BATCH):
            self._retry(lambda: client.log_batch(run_id, tags=chunk, synchronous=True))

    def _log_texts(self, run_id: str, files: dict[str, str | bytes]) -> None:
        """Write files into a temp dir and upload them in one go (re-logging overwrites)."""
        client = self._client
        with tempfile.TemporaryDirectory(prefix="autosparse-mlflow-") as tmp:
            for name, content in files.items():
                target = Path(tmp) / name
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content, encoding="utf-8")
            self._retry(lambda: client.log_artifacts(run_id, tmp))

    def _parent_experiment_id(self, parent_run_id: str) -> str:
        if parent_run_id not in self._parent_experiment:
            client = self._client
            run = self._retry(lambda: client.get_run(parent_run_id))
            self._parent_experiment[parent_run_id] = run.info.experiment_id
        return self._parent_experiment[parent_run_id]

    # ---- public API --------------------------------------------------------------------------

    @_safe()
    def start_search(
        self,
        *,
        study_name: str,
        storage_url: str,
        strategy: str,
        config_text: str,
        layer_table: LayerTable,
        dense_metrics: dict,
        params: dict,
        study_uid: str = "",
        artifacts: dict[str, str] | None = None,
    ) -> str:
        """Find (on resume) or create the study's parent run, log its context, mark it RUNNING.

        ``study_uid`` tells apart two studies of one name (a study deleted and started afresh):
        when given, only a parent run with the same uid is resumed.

        Logs ``config.yaml`` and ``layer_table.csv`` artifacts, ``dense_<key>`` metrics, the
        caller's ``params`` (params are immutable in MLflow: on resume only new keys are logged;
        changed values are listed in the tag ``autosparse.changed_on_resume``) and the tags
        ``autosparse.search.study/role/strategy/storage`` (storage password redacted). ``artifacts``
        are extra text files for the run (e.g. the hardware profile and the dense model's cost).
        """
        experiment_id = self._experiment()
        client = self._client
        tags = {
            TAG_STUDY: study_name,
            TAG_ROLE: ROLE_SEARCH,
            TAG_STRATEGY: strategy,
            TAG_STORAGE: _truncate(redact_uri(storage_url), _MAX_TAG_VALUE),
        }
        filter_string = (
            f"tags.`{TAG_STUDY}` = {_quote(study_name)} and tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'"
        )
        if study_uid:
            tags[TAG_STUDY_UID] = study_uid
            filter_string += f" and tags.`{TAG_STUDY_UID}` = {_quote(study_uid)}"
        run, created = self._find_or_create(experiment_id, filter_string, study_name, tags)
        run_id = run.info.run_id
        self._parent_experiment[run_id] = experiment_id

        existing_params = run.data.params
        new_params, changed = [], []
        for key, value in params.items():
            key, text = sanitize_key(key), _param_value(value)
            if key not in existing_params:
                new_params.append((key, text))
            elif existing_params[key] != text:
                changed.append(key)
        existing_metrics = run.data.metrics
        now = int(time.time() * 1000)
        metrics = [
            (key, value, now, 0)
            for key, value in _finite_metrics(
                {f"dense_{k}": v for k, v in (dense_metrics or {}).items()}
            ).items()
            if existing_metrics.get(key) != value
        ]
        run_tags = [(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
        if changed:
            run_tags.append(("autosparse.changed_on_resume", ", ".join(sorted(changed))))
            _log.info("params changed since the search started (kept first values): %s", changed)
        self._log_batch(run_id, metrics=metrics, params=new_params, tags=run_tags)
        self._log_texts(
            run_id, {"config.yaml": config_text or "", "layer_table.csv": layer_table_csv(layer_table),
                     **(artifacts or {})}
        )
        if not created and run.info.status != "RUNNING":
            self._retry(lambda: client.update_run(run_id, status="RUNNING"))
        return run_id

    @_safe(breaker=True)
    def log_trial(
        self,
        *,
        parent_run_id: str,
        trial: int,
        state: str,
        candidate_json: str,
        metrics: dict[str, float],
        fail_reason: str = "",
        cached: bool = False,
        strategy: str = "",
        fidelity: str = "",
        start_ms: int | None = None,
        end_ms: int | None = None,
        metric_name: str = "accuracy",
    ) -> str | None:
        """One nested child run per trial; a second call returns the same run.

        Its name carries the figures (:func:`run_name`, e.g. ``t12 97.2% 24.7x 0.81ms``;
        :meth:`log_front` prefixes front members with ``★``). ``start_ms``/``end_ms`` (epoch ms,
        from the Optuna trial) become the run's start and end, so MLflow's "Duration" is the
        trial's time, not the logging's. Params ``<layer>.pattern/.sparsity/.bits/.criterion``
        and ``fidelity`` (``full``, or ``low`` for a trial screened out after its short
        fine-tune); finite metrics; artifact ``candidate.json``; status FINISHED (COMPLETE),
        FAILED (FAIL, reason in tag ``autosparse.fail_reason``) or KILLED (PRUNED).
        """
        if not parent_run_id:
            return None
        return self._log_trial(
            parent_run_id=parent_run_id, trial=trial, state=state,
            candidate_json=candidate_json, metrics=metrics, fail_reason=fail_reason,
            cached=cached, strategy=strategy, fidelity=fidelity, start_ms=start_ms,
            end_ms=end_ms, metric_name=metric_name,
        )

    def _log_trial(
        self,
        *,
        parent_run_id: str,
        trial: int,
        state: str,
        candidate_json: str,
        metrics: dict[str, float],
        fail_reason: str = "",
        cached: bool = False,
        strategy: str = "",
        existing: "Run | None" = None,
        fidelity: str = "",
        start_ms: int | None = None,
        end_ms: int | None = None,
        metric_name: str = "accuracy",
    ) -> str:
        trial = int(trial)
        state = str(state).upper()
        experiment_id = self._parent_experiment_id(parent_run_id)
        client = self._client
        candidate_json = candidate_json if isinstance(candidate_json, str) else ""
        key, layers, params_of_layers = "", "", {}
        if candidate_json:
            try:
                candidate = Candidate.from_json(candidate_json)
            except (ValueError, KeyError, TypeError) as exc:
                _log.warning("trial %s: unreadable candidate JSON (%s); logged as is", trial, exc)
            else:
                key = candidate.key
                layers = ", ".join(f"{n}={c.describe()}" for n, c in candidate.items())
                params_of_layers = layer_params(candidate_json)
        if fidelity:
            params_of_layers = {**params_of_layers, "fidelity": str(fidelity)}
        tags = {
            TAG_PARENT: parent_run_id,
            TAG_ROLE: ROLE_TRIAL,
            TAG_TRIAL: str(trial),
            TAG_STATE: state,
            TAG_STRATEGY: strategy,
            TAG_ON_FRONT: "false",
            TAG_CACHED: str(bool(cached)).lower(),
        }
        if key:
            tags[TAG_CANDIDATE_KEY] = key
            tags[TAG_LAYERS] = _truncate(layers, _MAX_TAG_VALUE)
        if fail_reason:
            tags[TAG_FAIL_REASON] = _truncate(str(fail_reason), _FAIL_REASON_CHARS)

        if existing is None:
            filter_string = (
                f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial}'"
            )
            existing, created = self._find_or_create(
                experiment_id, filter_string,
                run_name(trial, state, metrics, metric_name=metric_name), tags,
                start_time=_epoch_ms(start_ms),
            )
        else:
            created = False
        run_id = existing.info.run_id
        if not created and existing.info.status in _TERMINAL:
            return run_id  # already logged completely

        # New run, or one a crashed process left RUNNING: log whatever is missing.
        have_params = {} if created else existing.data.params
        have_metrics = {} if created else existing.data.metrics
        have_tags = {} if created else existing.data.tags
        params = [(k, v) for k, v in params_of_layers.items() if k not in have_params]
        now = int(time.time() * 1000)
        metric_rows = [
            (k, v, now, 0) for k, v in _finite_metrics(metrics).items() if have_metrics.get(k) != v
        ]
        tag_rows = [
            (k, v) for k, v in tags.items()
            if not created and have_tags.get(k) != v and not (k == TAG_ON_FRONT and k in have_tags)
        ]
        self._log_batch(run_id, metrics=metric_rows, params=params, tags=tag_rows)
        if candidate_json:
            self._log_texts(run_id, {"candidate.json": candidate_json})
        status = _STATE_TO_STATUS.get(state, "FAILED")
        end = _epoch_ms(end_ms)
        start = existing.info.start_time
        if end is not None and start is not None and end < start:
            end = None  # a run created before its trial's times were known: keep MLflow's
        self._retry(lambda: client.set_terminated(run_id, status=status, end_time=end))
        return run_id

    @_safe()
    def log_front(
        self,
        *,
        parent_run_id: str,
        trials: "pd.DataFrame",
        objectives: list[str],
        hypervolumes: dict[str, list[float]],
        dense_metrics: dict | None = None,
        metric_name: str = "accuracy",
        metric_direction: str = "maximize",
    ) -> None:
        """Bring MLflow in line with the study: missing child runs, front tags, plots, metrics.

        ``metric_name`` is the task metric's name (``autosparse.workload.task``): the ``accuracy``
        columns of ``trials`` hold it, and the runs and files show it under its own name
        (``mse``, ``metric_drop``, ``test_mse``, ...); ``metric_direction`` its direction (the
        plots' y axis, the front table's order).

        Creates a child run for each trial row that has none (re-logging from storage after
        MLflow was down), sets ``autosparse.on_front`` on every child run (and, on those of
        trials re-evaluated with extra seeds, ``accuracy_mean``, ``accuracy_std``,
        ``accuracy_seeds`` and ``test_accuracy``; ``accuracy`` stays the trial's own), uploads
        ``pareto.csv``, ``pareto.html``, ``pareto.png`` and ``trials.csv`` to the parent
        (overwriting), logs
        ``front_size``, ``n_trials``, ``n_failed`` (step = number of trials) and each hypervolume
        history (step = trial index; steps already logged are skipped, so the metric's latest
        value is the final one).
        """
        from autosparse.tracking import plots

        if not parent_run_id:
            return None
        experiment_id = self._parent_experiment_id(parent_run_id)
        client = self._client
        parent = self._retry(lambda: client.get_run(parent_run_id))
        strategy = parent.data.tags.get(TAG_STRATEGY, "")

        # 1. children: index existing ones, create the missing, fix on_front tags.
        children: dict[int, Run] = {}
        duplicates: list[Run] = []
        for run in self._search(experiment_id, f"tags.`{TAG_PARENT}` = '{parent_run_id}'"):
            number = run.data.tags.get(TAG_TRIAL)
            if number is None or not number.lstrip("-").isdigit():
                continue
            number = int(number)
            if number in children:
                keep = self._oldest([children[number], run])
                duplicates.append(run if keep is children[number] else children[number])
                children[number] = keep
            else:
                children[number] = run
        for run in duplicates:
            self._retry(lambda: client.delete_run(run.info.run_id))

        metric_cols = plots.metric_columns(trials)
        for row in trials.to_dict("records"):
            number = int(row["trial"])
            existing = children.get(number)
            state = _text(row.get("state")) or "COMPLETE"
            own = shown_metrics(_own_metrics(row, metric_cols), metric_name)
            if existing is None or existing.info.status not in _TERMINAL:
                try:
                    run_id = self._log_trial(
                        parent_run_id=parent_run_id,
                        trial=number,
                        state=state,
                        candidate_json=_text(row.get("candidate")),
                        metrics=own,
                        fail_reason=_text(row.get("fail_reason")),
                        cached=_flag(row.get("cached")),
                        strategy=strategy,
                        existing=existing,
                        start_ms=_iso_ms(row.get("datetime_start")),
                        end_ms=_iso_ms(row.get("datetime_complete")),
                        metric_name=metric_name,
                    )
                except Exception as exc:
                    if _is_unreachable(exc):
                        raise  # the store is gone: stop here, one warning for the call
                    warnings.warn(f"could not log trial {number}: {_first_line(exc)}",
                                  TrackingWarning, stacklevel=3)
                    continue
                have = "false" if existing is None else existing.data.tags.get(TAG_ON_FRONT, "false")
                named = (run_name(number, state, own, metric_name=metric_name)
                         if existing is None else existing.info.run_name)
            else:
                run_id = existing.info.run_id
                have = existing.data.tags.get(TAG_ON_FRONT, "")
                named = existing.info.run_name
            want = "true" if _flag(row.get("on_front")) else "false"
            if have != want:
                self._retry(lambda: client.set_tag(run_id, TAG_ON_FRONT, want))
            name = run_name(number, state, own, on_front=want == "true",
                            metric_name=metric_name)
            if named != name:  # the front marker, or a run named before names had figures
                self._retry(lambda: client.update_run(run_id, name=name))
            logged = {} if existing is None else existing.data.metrics
            spread = [(k, v, int(time.time() * 1000), 0)
                      for k, v in shown_metrics(_spread_metrics(row), metric_name).items()
                      if logged.get(k) != v]
            if spread:  # a front point re-evaluated with extra seeds (reeval.py)
                self._log_batch(run_id, metrics=spread)

        # the runs table's view with the metric columns (an experiment tag; see VIEW_TAG)
        view = json.dumps(view_state(shown_metric(key, metric_name) for key in (
            *(OBJECTIVES[o].metric for o in objectives if o in OBJECTIVES), *_VIEW_EXTRA_METRICS)))
        experiment = self._retry(lambda: client.get_experiment(experiment_id))
        if (experiment.tags or {}).get(VIEW_TAG) != view:
            self._retry(lambda: client.set_experiment_tag(experiment_id, VIEW_TAG, view))

        # 2. artifacts on the parent; a plot that fails does not stop the rest.
        maximize = metric_direction == "maximize"
        files: dict[str, str | bytes] = {
            "pareto.csv": plots.front_table(trials, objectives, maximize).rename(
                columns=lambda c: shown_metric(str(c), metric_name)).to_csv(index=False),
            "trials.csv": trials.rename(
                columns=lambda c: shown_metric(str(c), metric_name)).to_csv(index=False),
        }
        with tempfile.TemporaryDirectory(prefix="autosparse-plots-") as tmp:
            for name, draw in (
                ("pareto.html", plots.pareto_figure_html),
                ("pareto.png", plots.pareto_figure_png),
            ):
                target = Path(tmp) / name
                try:
                    draw(trials, objectives, target, dense=dense_metrics, metric=metric_name,
                         maximize=maximize)
                    files[name] = target.read_bytes()
                except Exception as exc:  # noqa: BLE001 - a plot must not block the rest
                    warnings.warn(f"could not draw {name}: {_first_line(exc)}", TrackingWarning,
                                  stacklevel=3)
        self._log_texts(parent_run_id, files)

        # 3. metrics on the parent, extending histories without duplicate steps.
        state = trials["state"].astype(str) if "state" in trials.columns else None
        n_trials = int((state != "INTERRUPTED").sum()) if state is not None else int(len(trials))
        n_failed = int((state == "FAIL").sum()) if state is not None else 0
        if "on_front" in trials.columns:
            on_front = trials["on_front"].fillna(False).astype(bool)
            if state is not None:
                on_front &= state == "COMPLETE"
            front_size = int(on_front.sum())
        else:
            front_size = 0
        series: dict[str, dict[int, float]] = {
            "front_size": {n_trials: float(front_size)},
            "n_trials": {n_trials: float(n_trials)},
            "n_failed": {n_trials: float(n_failed)},
        }
        for name, history in (hypervolumes or {}).items():
            values = {step: _finite(v) for step, v in enumerate([] if history is None else history)}
            series[sanitize_key(name)] = {s: v for s, v in values.items() if v is not None}
        now = int(time.time() * 1000)
        rows = []
        for key, points in series.items():
            if not points:
                continue
            logged = {m.step for m in self._retry(lambda: client.get_metric_history(parent_run_id, key))}
            rows.extend((key, value, now, step) for step, value in sorted(points.items())
                        if step not in logged)
        self._log_batch(parent_run_id, metrics=rows)
        return None

    @_safe()
    def log_sensitivity(self, parent_run_id: str, *, csv_text: str, heatmap_png: bytes,
                        seconds: float, method: str) -> None:
        """Per-layer sensitivity on the search's parent run: ``sensitivity.csv``, the heatmap
        ``sensitivity.png`` (skipped when empty), metric ``sensitivity_seconds`` and param
        ``sensitivity_method`` (params are immutable: a later method goes to the tag
        ``autosparse.sensitivity_method``, which always holds the latest)."""
        if not parent_run_id:
            return None
        files: dict[str, str | bytes] = {"sensitivity.csv": csv_text}
        if heatmap_png:
            files["sensitivity.png"] = heatmap_png
        self._log_texts(parent_run_id, files)
        client = self._client
        run = self._retry(lambda: client.get_run(parent_run_id))
        params = [] if "sensitivity_method" in run.data.params else [("sensitivity_method", method)]
        value = _finite(seconds)
        metrics = [] if value is None else [("sensitivity_seconds", value, int(time.time() * 1000), 0)]
        self._log_batch(parent_run_id, metrics=metrics, params=params,
                        tags=[("autosparse.sensitivity_method", method)])
        return None

    @_safe()
    def end_search(self, parent_run_id: str, status: str = "FINISHED") -> None:
        """Mark the parent run terminated (FINISHED, FAILED or KILLED)."""
        status = str(status).upper()
        if status not in _RUN_STATUSES:
            raise _CallerError(
                f"status {status!r} is not one of {', '.join(sorted(_RUN_STATUSES))}"
            )
        if not parent_run_id:
            return None
        client = self._client
        self._retry(lambda: client.set_terminated(parent_run_id, status=status))
        return None

    @_safe()
    def log_standalone_run(
        self,
        *,
        run_name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        artifacts: dict[str, str | bytes],
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """One finished run outside any search (e.g. a calibration): params, metrics, files."""
        experiment_id = self._experiment()
        client = self._client
        run = self._retry(lambda: client.create_run(experiment_id, run_name=run_name,
                                                    tags=dict(tags or {})))
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        self._log_batch(
            run_id,
            metrics=[(k, v, now, 0) for k, v in _finite_metrics(metrics).items()],
            params=[(sanitize_key(k), _param_value(v)) for k, v in params.items()],
        )
        self._log_texts(run_id, artifacts)
        self._retry(lambda: client.set_terminated(run_id, status="FINISHED"))
        return run_id

    @_safe()
    def log_exported_model(
        self,
        *,
        model: Any,
        input_example: Any,
        registered_name: str,
        parent_run_id: str | None,
        trial_run_id: str | None,
        artifacts: dict[str, Path],
        metrics: dict[str, float],
        params: dict[str, str],
    ) -> tuple[str, str] | None:
        """One run ``export-<registered_name>`` holding a deployable model; returns
        ``(run_id, model version)``.

        ``model`` is the torch ``nn.Module`` (typed ``Any``: this module never imports torch);
        ``input_example`` a numpy batch of its input. The run is tagged with the search's parent
        run and the chosen trial's run (``autosparse.parent_run_id``/``autosparse.trial_run_id``)
        and nested under the parent (``mlflow.parentRunId``) when one is given. It gets the
        params and finite metrics, then the model via ``mlflow.pytorch.log_model``, registered
        as a new version of ``registered_name`` (tagged with the same run ids), then each
        ``artifacts`` file under its key (the ONNX files, a report, the packed checkpoint).

        The model is saved in MLflow's ``pickle`` format, not 3.x's default ``pt2``: ``pt2``
        re-traces the model with ``torch.export``, which fails for models that are not
        exportable and specialises the batch dimension to 1 when the example has one sample (the
        loaded model then rejects every other batch size). Pickle loads any module back whole,
        for any batch, provided its class is importable where it is loaded (``autosparse`` for
        the built-in models). Requirements are pinned from the installed torch and cloudpickle
        instead of being inferred (inference reloads the model in a subprocess: ~5 s).

        Each call is a new run and a new model version (the registry's own versioning).
        Unlike the other methods this one uses MLflow's global tracking URI, temporarily set to
        the tracker's: ``log_model`` has no client-level form, and registering a logged model
        resolves its ``models:/<id>`` source through the global store.
        """
        import shutil
        from importlib import metadata

        import mlflow
        import mlflow.pytorch
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        if not isinstance(registered_name, str) or not registered_name.strip():
            raise _CallerError(f"registered_name must be a non-empty string, got {registered_name!r}")
        files = {str(name): Path(path) for name, path in (artifacts or {}).items()}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise _CallerError(f"artifact files not found: {', '.join(missing)}")

        experiment_id = self._experiment()
        client = self._client
        tags = {TAG_ROLE: "export", "autosparse.registered_model": registered_name}
        links = {"autosparse.parent_run_id": parent_run_id or "",
                 "autosparse.trial_run_id": trial_run_id or ""}
        tags.update({k: v for k, v in links.items() if v})
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = self._retry(lambda: client.create_run(
            experiment_id, run_name=f"export-{registered_name}", tags=tags))
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            param_rows = [(sanitize_key(k), _param_value(v)) for k, v in (params or {}).items()]
            self._log_batch(
                run_id,
                metrics=[(k, v, now, 0) for k, v in _finite_metrics(metrics).items()],
                params=param_rows,
            )
            # Created here, in the run's experiment: left to log_model, the LoggedModel would
            # go to the fluent API's current experiment (usually "Default", whose artifacts
            # live in ./mlruns of whichever directory first created the database).
            logged = self._retry(lambda: client.create_logged_model(
                experiment_id, name="model", source_run_id=run_id, params=dict(param_rows)))
            requirements = []
            for package in ("torch", "cloudpickle"):
                try:
                    version = metadata.version(package).split("+", 1)[0]  # no "+cpu" label
                except metadata.PackageNotFoundError:
                    continue
                requirements.append(f"{package}=={version}")
            # create_model_version resolves a ``models:/<id>`` source through the global store
            # too, so registration happens under the same temporary URI.
            # mlflow.pytorch warns at every pickle save that pickles run code when loaded: the
            # choice is deliberate (the pt2 flavour fixes the batch size, see README "Export")
            # and the export folder's own files are not pickles; quiet that logger, this call only
            with _use_tracking_uri(self.tracking_uri), _quiet_logger("mlflow.pytorch"):
                info = self._retry(lambda: mlflow.pytorch.log_model(
                    model, model_id=logged.model_id, run_id=run_id, input_example=input_example,
                    serialization_format="pickle", pip_requirements=requirements or None,
                ))
                try:
                    self._retry(lambda: client.create_registered_model(registered_name))
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                version = self._retry(lambda: client.create_model_version(
                    registered_name, source=info.model_uri, run_id=run_id,
                    model_id=info.model_id,
                    tags={**{k: v for k, v in links.items() if v},
                          "autosparse.export_run_id": run_id},
                ))
            if files:
                with tempfile.TemporaryDirectory(prefix="autosparse-export-") as tmp:
                    for name, path in files.items():
                        target = Path(tmp) / sanitize_key(name)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, target)
                    self._retry(lambda: client.log_artifacts(run_id, tmp))
        except Exception:
            try:
                client.set_terminated(run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        self._retry(lambda: client.set_terminated(run_id, status="FINISHED"))
        return run_id, str(version.version)

    @_safe()
    def find_search_runs(self, study_name: str, trial: int) -> tuple[str | None, str | None]:
        """The search's parent run and the trial's child run ids, where they were logged."""
        experiment_id = self._experiment()
        parents = self._search(experiment_id, f"tags.`{TAG_STUDY}` = {_quote(study_name)} and "
                                              f"tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'")
        if not parents:
            return None, None
        parent = self._oldest(parents).info.run_id
        children = self._search(experiment_id, f"tags.`{TAG_PARENT}` = '{parent}' and "
                                               f"tags.`{TAG_TRIAL}` = '{int(trial)}'")
        return parent, (self._oldest(children).info.run_id if children else None)
