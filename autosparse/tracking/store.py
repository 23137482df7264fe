"""The tracker's plumbing on one ``MlflowClient``: the lazily made client, the experiment
(found, created or restored), paged run searches, find-or-create of a run by its tags (racing
workers converge on the oldest), batched params/metrics/tags and artifact uploads.

Every call goes through the lock retry of :mod:`autosparse.tracking.errors`; the public
methods built on it live in the trial, front, export and lifecycle modules.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from autosparse.tracking.errors import _FailureHandling
from autosparse.tracking.naming import (
    _MAX_METRICS_PER_BATCH,
    _MAX_PARAMS_TAGS_PER_BATCH,
    _chunks,
    sanitize_key,
)
from autosparse.tracking.ui import _sqlite_path, local_artifact_root

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.entities import Run

_log = logging.getLogger(__name__)

# MLflow 3 opens an experiment in its GenAI view (traces, evaluations) unless the experiment says
# what it is: this tag (what the UI's own "experiment type" selector writes) makes its first view
# the model-training one, with the runs table
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


class _StoreAccess(_FailureHandling):
    """MLflow access shared by the tracker's public methods (state set by ``Tracker.__init__``)."""

    experiment: str
    runs_dir: Path
    _client_obj: MlflowClient | None
    _experiment_id: str | None
    _parent_experiment: dict[str, str]
    @property
    def _client(self) -> "MlflowClient":
        if self._client_obj is None:
            db = _sqlite_path(self.tracking_uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client_obj

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
                    lambda: client.create_experiment(self.experiment, artifact_location=location,
                                                     tags={KIND_TAG: MODEL_TRAINING})
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
            if KIND_TAG not in (experiment.tags or {}):  # never overrides a kind someone chose
                self._retry(lambda: client.set_experiment_tag(experiment_id, KIND_TAG,
                                                              MODEL_TRAINING))
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
