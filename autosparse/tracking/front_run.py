"""The study's state copied onto MLflow in one call (``log_front``): missing child runs created,
front tags and names fixed, the runs table's shared view, the front's tables and plots on the
parent run, and its front-size, trial-count and hypervolume histories.

The recovery path after MLflow was down, and the last step of every search; its own module
because it is the one long, many-step method of the tracker.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from autosparse.config.objectives import OBJECTIVES, shown_metric, shown_metrics
from autosparse.tracking.errors import (
    TrackingWarning,
    _first_line,
    _is_unreachable,
    _safe,
)
from autosparse.tracking.naming import (
    _TERMINAL,
    TAG_ON_FRONT,
    TAG_PARENT,
    TAG_STRATEGY,
    TAG_SUMMARY,
    TAG_TRIAL,
    _finite,
    _finite_metrics,
    _flag,
    _iso_ms,
    _own_metrics,
    _spread_metrics,
    _text,
    name_figures,
    run_name,
    sanitize_key,
)
from autosparse.tracking.trial_run import _TrialLogging
from autosparse.tracking.ui import _VIEW_EXTRA_METRICS, VIEW_TAG, view_state

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow.entities import Run


class _FrontLogging(_TrialLogging):
    """``log_front``: bring MLflow in line with the study."""
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
        summary_trial: int | None = None,
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
            figures, seeds = name_figures(row, own, metric_name)
            name = run_name(number, state, figures, on_front=want == "true",
                            metric_name=metric_name, seeds=seeds)
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
        self._log_summary(parent_run_id, trials, summary_trial, metric_name, metric_cols)
        return None

    def _log_summary(self, parent_run_id: str, trials: "pd.DataFrame",
                     summary_trial: int | None, metric_name: str,
                     metric_cols: list[str]) -> None:
        """The parent run carries the front's knee under the children's own metric keys, so
        its row in the runs table shows figures (not "-") and reads like its best child."""
        if summary_trial is None or "trial" not in trials.columns:
            return
        rows = trials[trials["trial"].astype(int) == int(summary_trial)].to_dict("records")
        if not rows:
            return
        row = rows[0]
        own = shown_metrics(_own_metrics(row, metric_cols), metric_name)
        figures, _ = name_figures(row, own, metric_name)
        metrics = {**figures, **shown_metrics(_spread_metrics(row), metric_name)}
        now = int(time.time() * 1000)
        existing = self._retry(lambda: self._client.get_run(parent_run_id)).data
        batch = [(k, v, now, 0) for k, v in _finite_metrics(metrics).items()
                 if existing.metrics.get(k) != v]
        tags = [] if existing.tags.get(TAG_SUMMARY) == str(int(summary_trial)) else [
            (TAG_SUMMARY, str(int(summary_trial)))]
        self._log_batch(parent_run_id, metrics=batch, tags=tags)
