"""One trial as one MLflow child run: created once under the search's parent run, named with
its figures, given its layer params, metrics, tags and ``candidate.json``, and terminated with
the trial's state and times.

Used per finished trial by the search (:meth:`_TrialLogging.log_trial`) and for the gaps that
``log_front`` fills from the study (:meth:`_TrialLogging._log_trial`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from autosparse.space.candidate import Candidate
from autosparse.tracking.errors import _safe
from autosparse.tracking.naming import (
    _FAIL_REASON_CHARS,
    _MAX_TAG_VALUE,
    _STATE_TO_STATUS,
    _TERMINAL,
    ROLE_TRIAL,
    TAG_CACHED,
    TAG_CANDIDATE_KEY,
    TAG_FAIL_REASON,
    TAG_LAYERS,
    TAG_ON_FRONT,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STATE,
    TAG_STRATEGY,
    TAG_TRIAL,
    _epoch_ms,
    _finite_metrics,
    _truncate,
    layer_params,
    run_name,
)
from autosparse.tracking.store import _StoreAccess

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run

_log = logging.getLogger(__name__)


class _TrialLogging(_StoreAccess):
    """The per-trial child runs."""
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
