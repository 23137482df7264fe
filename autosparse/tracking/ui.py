"""Where the MLflow store is and how to look at it: tracking URIs, the local artifact root, the
``autosparse ui`` server command and environment, the runs table's URLs and shared view, and
URIs with their passwords redacted.

Apart from :func:`runs_table_urls` (which reads the store, importing mlflow on use) these are
pure, so the CLI can build a UI command or resolve a URI without the seconds mlflow costs.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit


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


def ui_command(tracking_uri: str, runs_dir: Path, port: int = 5000, *, workers: int = 1,
               host: str = "127.0.0.1") -> list[str]:
    """argv that serves the MLflow UI on ``host`` (this machine only by default) against the same
    store as the search.

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
    command += ["--host", host, "--port", str(int(port)), "--workers", str(int(workers))]
    return command


def runs_table_urls(tracking_uri: str, base: str) -> dict[str, str]:
    """Experiment name -> URL of its runs table (MLflow 3 opens an experiment on its GenAI page,
    where no runs show), with autosparse's view (metric columns shown, see :data:`VIEW_TAG`)
    where a search logged one. {} if the store is unreadable."""
    urls = {}
    for name, (experiment_id, has_view) in _experiments(tracking_uri).items():
        url = f"{base}/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW}"
        urls[name] = f"{url}&viewStateShareKey={VIEW_KEY}" if has_view else url
    return urls


# MLflow 3.17's UI has two modes, GenAI (its default: traces, evaluation runs, an assistant) and
# model training; the URL parameter picks it (and the UI remembers it in the browser)
WORKFLOW = "machine_learning"


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
