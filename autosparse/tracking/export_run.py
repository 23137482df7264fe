"""An exported model as its own MLflow run and a new version in the model registry
(``log_exported_model``, used by ``autosparse export``).

Its own module because it is the one place that uses MLflow's global tracking URI and the
``mlflow.pytorch`` flavour (``log_model`` has no client-level form); everything else goes
through the client.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from autosparse.tracking.errors import _CallerError, _safe
from autosparse.tracking.naming import (
    TAG_PARENT,
    TAG_ROLE,
    _finite_metrics,
    _param_value,
    sanitize_key,
)
from autosparse.tracking.store import _StoreAccess


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


class _ExportLogging(_StoreAccess):
    """The export run and its registered model version."""
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
