"""What a search shows while and after it runs: the progress line after each trial, the front
and hypervolume written to runs/<name>/ and MLflow at the end, and the MLflow parent run it
starts with.

Split out of ``runner``: ``report_front`` and ``run_sensitivity`` report without running trials.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from autosparse.config.objectives import first_cost, shown_metric, shown_metrics
from autosparse.config.validation import ConfigError
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.report import cost_table
from autosparse.search.context import Printer, SearchContext
from autosparse.search.front import HypervolumeSpec, final, trials_frame
from autosparse.search.selection import knee
from autosparse.search.study import study_uid
from autosparse.search.workers import Budget
from autosparse.space.candidate import Candidate
from autosparse.tracking.mlflow_tracker import Tracker
from autosparse.tracking.plots import front_table
from autosparse.tracking.progress import LiveLine
from autosparse.workload.task import Task


@dataclass
class SearchOutcome:
    trials: pd.DataFrame
    front: pd.DataFrame
    hypervolume: dict[str, float]
    storage_url: str
    parent_run_id: str | None
    new_trials: int
    search_seconds: float = 0.0  # wall time of the trial loop (sampling, training, storage, logging)


class Progress:
    """After each finished trial: done/budget, failures, front size, hypervolume, time left;
    one line updated in place in a terminal, a line per trial otherwise (progress.LiveLine)."""

    def __init__(self, context: SearchContext, budget: Budget, printer: Printer, start_count: int):
        self.context, self.budget, self.printer = context, budget, printer
        self.start, self.start_count = time.time(), start_count
        self.line = LiveLine(budget.trials, start_count, printer)
        self.shown: int | None = None  # the count on the last line
        self.spec = HypervolumeSpec(context.config.objectives, context.dense_metrics,
                                    context.task.direction, context.task.percent)

    def close(self) -> None:
        self.line.close()

    def __call__(self, study: optuna.Study, only_if_changed: bool = False) -> None:
        frame = trials_frame(study, self.context.config.objectives)
        frame = frame[frame["state"] != "INTERRUPTED"]  # re-run on resume: not in the budget
        done = len(frame)
        if only_if_changed and done == self.shown:
            return
        self.shown = done
        failed = int((frame["state"] == "FAIL").sum()) if done else 0
        hv = final(self.spec.histories(frame)["hypervolume"]) if done else 0.0
        elapsed = time.time() - self.start
        new = max(1, done - self.start_count)
        total = self.budget.trials
        left = ""
        if total is not None:
            left = f" | ~{_duration(elapsed / new * max(0, total - done))} left"
        if self.budget.deadline is not None:
            left += f" | {_duration(max(0.0, self.budget.deadline - time.time()))} of time budget left"
        front = int(frame["on_front"].sum()) if done else 0
        if self.budget.finetune_steps is not None:
            pruned = int((frame["state"] == "PRUNED").sum()) if done else 0
            left += (f" | {self.budget.unit} {self.budget.spent_steps(study)}/"
                     f"{self.budget.finetune_steps} | screened out {pruned}")
        self.line.update(done, f"failed {failed} | front {front} | hypervolume {hv:.4f} | "
                               f"{_duration(elapsed)} elapsed{left}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _knee_or_none(frame: pd.DataFrame, objectives: list[str], task: Task) -> int | None:
    """The front's knee (what ``export --knee`` picks), for the parent run's row; None when
    the front is empty or every objective is a quality one."""
    cost = first_cost(objectives)
    if cost is None or frame.empty or "on_front" not in frame.columns:
        return None
    try:
        return knee(frame, cost, maximize=task.maximize, quality=task.name).trial
    except ConfigError:  # an empty front
        return None


def report(context: SearchContext, study: optuna.Study, tracker: Tracker | None,
           parent: str | None, new_trials: int = 0, write_files: bool = True) -> SearchOutcome:
    """Front and hypervolume from storage; logged to MLflow (with a ``parent`` run) and written
    under runs/<name>/ (``write_files``), each file replaced whole (written beside, renamed)."""
    objectives = context.config.objectives
    frame = trials_frame(study, objectives)
    histories = HypervolumeSpec(objectives, context.dense_metrics, context.task.direction,
                                context.task.percent).histories(frame)
    front = front_table(frame, objectives, context.task.maximize)  # mse: lowest first
    out_dir = context.runs_dir / context.config.name
    if parent is not None and tracker is not None:
        tracker.log_front(parent_run_id=parent, trials=frame, objectives=objectives,
                          hypervolumes=histories, dense_metrics=context.dense_metrics,
                          metric_name=context.task.name, metric_direction=context.task.direction,
                          summary_trial=_knee_or_none(frame, objectives, context.task))
    name = context.task.name  # files and the outcome show the task metric by its own name
    frame = frame.rename(columns=lambda c: shown_metric(str(c), name))
    front = front.rename(columns=lambda c: shown_metric(str(c), name))
    if write_files:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_whole(frame, out_dir / "trials.csv")
        _write_whole(front, out_dir / "pareto.csv")
    return SearchOutcome(frame, front, {k: final(v) for k, v in histories.items()},
                         context.storage_url, parent, new_trials)


def _write_whole(frame: pd.DataFrame, path: Path) -> None:
    """Write beside, then rename over: a reader (or a killed writer) never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    frame.to_csv(partial, index=False)
    os.replace(partial, path)


def _start_tracking(context: SearchContext, tracker: Tracker, study: optuna.Study) -> str | None:
    config = context.config
    params = {
        "strategy": config.strategy.name,
        "objectives": ",".join(config.objectives),
        "constraints": "; ".join(config.shown(c) for c in config.constraints) or "none",
        "budget_trials": config.budget.trials,
        "budget_minutes": config.budget.minutes,
        "budget_finetune_steps": config.budget.finetune_steps,
        "budget_tokens": config.budget.tokens,
        "seed": config.seed,
        "finetune_steps": (context.objective().evaluator.finetune_steps()  # epochs resolved
                           if context.oneshot is None else 0),
        "space_size": context.space.size(),
        "searched_layers": len(context.space.layer_names),
        "hardware": config.hardware or "none",
        "deploy": config.deploy or "packed",
        "device": ",".join(context.placement or (context.device,)),
        "amp": config.finetune.amp,
        "finetune_lr": (f"{context.finetune.lr:g}" if context.finetune.lr != "auto"
                        else "auto"),
        **((context.lr_probe or {}).get("params") or {}),
        "task": config.task.kind,
        "metric": context.task.name,
        "metric_direction": context.task.direction,
    }
    artifacts = {}
    if context.profile is not None:
        artifacts = {
            "hardware_profile.yaml": context.profile.to_yaml(),
            "dense_cost.csv": cost_table(
                context.table, Candidate({}),
                estimate_cost(context.table, Candidate({}), context.profile)).to_csv(index=False),
        }
    if context.lr_probe:  # finetune.lr: auto: what the probe measured and chose
        artifacts["lr_probe.json"] = json.dumps(context.lr_probe, indent=2, sort_keys=True)
    return tracker.start_search(study_name=config.name, storage_url=context.storage_url,
                                strategy=config.strategy.name, config_text=context.config_text,
                                layer_table=context.table,
                                dense_metrics=shown_metrics(context.dense_metrics,
                                                            context.task.name),
                                params=params, study_uid=study_uid(study), artifacts=artifacts)
