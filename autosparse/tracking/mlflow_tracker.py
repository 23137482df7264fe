"""MLflow as the window on a search: parent run = the search, one child run per trial.

The Optuna study is the source of truth; everything here is a best-effort copy of it. So:

- every public :class:`Tracker` method catches whatever MLflow, SQLAlchemy or the network throws,
  emits one :class:`~autosparse.tracking.errors.TrackingWarning` line and returns ``None``:
  tracking never kills a search, and ``autosparse front`` re-logs everything from storage later
  (:meth:`Tracker.log_front` creates the child runs that are missing);
- everything is idempotent: the parent run is found again by its tags on resume, a trial's child
  run is created once, metric histories are only extended;
- only ``MlflowClient`` with an explicit tracking URI is used, never the fluent API's global
  active-run state, so several worker processes can log into one store; SQLite's "database is
  locked" is retried with a short backoff.

This module holds the run lifecycle (:class:`Tracker`: ``start_search``, ``end_search``, and
the standalone and lookup calls); the rest of the class comes from its parts:
``naming`` (keys, values, run names), ``ui`` (URIs and the UI server), ``errors`` (the
log-and-continue wrapper and lock retry), ``store`` (client plumbing), ``trial_run``
(``log_trial``), ``front_run`` (``log_front``) and ``export_run`` (``log_exported_model``).

Only ``tracking`` imports mlflow. The import costs seconds, so it happens on first use, not at
import time: the CLI can build a UI command or resolve a URI for free.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosparse.space.layers import LayerTable
from autosparse.tracking.errors import _COOLDOWN_START_S, _CallerError, _safe
from autosparse.tracking.export_run import _ExportLogging
from autosparse.tracking.front_run import _FrontLogging
from autosparse.tracking.naming import (
    _MAX_TAG_VALUE,
    _RUN_STATUSES,
    ROLE_SEARCH,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STORAGE,
    TAG_STRATEGY,
    TAG_STUDY,
    TAG_STUDY_UID,
    TAG_TRIAL,
    _finite,
    _finite_metrics,
    _param_value,
    _quote,
    _truncate,
    layer_table_csv,
    sanitize_key,
)
from autosparse.tracking.ui import redact_uri

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

_log = logging.getLogger(__name__)


class Tracker(_FrontLogging, _ExportLogging):
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
    def other_searches(self, study_name: str) -> list[str]:
        """Names of the other studies whose search runs are in this experiment (several
        searches may share one ``tracking.experiment``; each keeps its own parent run)."""
        runs = self._search(self._experiment(), f"tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'")
        return sorted({r.data.tags.get(TAG_STUDY, "") for r in runs} - {study_name, ""})

    @_safe()
    def find_search_runs(self, study_name: str, trial: int,
                         study_uid: str = "") -> tuple[str | None, str | None]:
        """The search's parent run and the trial's child run ids, where they were logged;
        ``study_uid`` picks this study's parent among earlier studies of the same name."""
        experiment_id = self._experiment()
        query = f"tags.`{TAG_STUDY}` = {_quote(study_name)} and tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'"
        if study_uid:
            query += f" and tags.`{TAG_STUDY_UID}` = {_quote(study_uid)}"
        parents = self._search(experiment_id, query)
        if not parents:
            return None, None
        parent = self._oldest(parents).info.run_id
        children = self._search(experiment_id, f"tags.`{TAG_PARENT}` = '{parent}' and "
                                               f"tags.`{TAG_TRIAL}` = '{int(trial)}'")
        return parent, (self._oldest(children).info.run_id if children else None)
