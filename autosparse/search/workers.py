"""The trial loop and its worker processes: the shared budget (trials, wall time, fine-tune
steps), one worker's ask -> compress -> fine-tune -> score -> tell -> log loop, the child
runs it logs to MLflow, and the extra worker processes that die with their parent.

Split out of ``runner``: the loop is what every worker runs, the runner only starts them.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import torch

from autosparse.config.objectives import shown_metrics
from autosparse.search.context import SearchContext
from autosparse.search.fidelity import FIDELITY_ATTR, STEPS_ATTR, steps_used
from autosparse.search.front import trial_metrics
from autosparse.search.objective import CACHED_ATTR, CANDIDATE_ATTR, FAIL_ATTR
from autosparse.search.preparation import prepare
from autosparse.search.study import (
    await_other_hosts,
    counted_trials,
    cut_short,
    fail_stale_trials,
    is_interrupted,
    trials_ahead,
)
from autosparse.tracking.mlflow_tracker import Tracker


def _in_flight_steps(context: SearchContext) -> int:
    objective = context.objective()
    plan = objective.fidelity
    return plan.low_steps if plan is not None else objective.evaluator.finetune_steps()


# With only a fine-tune-step budget, a sampler that proposes nothing but known candidates would
# run free repeats forever; this many zero-cost trials in a row end the search instead.
MAX_FREE_REPEATS = 50


@dataclass
class Budget:
    trials: int | None
    deadline: float | None
    finetune_steps: int | None = None  # the work budget: fine-tune steps or oneshot's tokens
    in_flight_steps: int = 0  # what a running trial that recorded nothing yet will spend
    unit: str = "fine-tune steps"  # what finetune_steps counts

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def exhausted(self, study: optuna.Study) -> bool:
        if self.out_of_time():
            return True
        if self.trials is not None and counted_trials(study) >= self.trials:
            return True
        if self.finetune_steps is None:
            return False
        if self.spent_steps(study) >= self.finetune_steps:
            return True
        recent = [t for t in _counted(study) if t.state.is_finished()][-MAX_FREE_REPEATS:]
        return len(recent) == MAX_FREE_REPEATS and all(
            int(t.user_attrs.get(STEPS_ATTR, 1)) == 0 for t in recent)

    def spent_steps(self, study: optuna.Study) -> int:
        return steps_used(_counted(study), self.in_flight_steps)

    def describe(self) -> str:
        parts = [f"{self.trials} trials"] if self.trials is not None else []
        if self.finetune_steps is not None:
            parts.append(f"{self.finetune_steps} {self.unit}")
        return " / ".join(parts) or "time"


def completed_trials(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count against a budget: all but those cut short (they are re-run)."""
    return [t for t in study.get_trials(deepcopy=False) if not is_interrupted(t)]


def _log_trial(tracker: Tracker, parent: str | None, strategy: str, trial: optuna.trial.FrozenTrial,
               metric_name: str = "accuracy") -> None:
    if parent is None:
        return
    metrics = shown_metrics(trial_metrics(trial), metric_name)  # mse, not accuracy
    state = "INTERRUPTED" if is_interrupted(trial) else trial.state.name  # KILLED, not FAILED
    tracker.log_trial(parent_run_id=parent, trial=trial.number, state=state,
                      candidate_json=trial.user_attrs.get(CANDIDATE_ATTR, ""), metrics=metrics,
                      fail_reason=trial.user_attrs.get(FAIL_ATTR, ""),
                      cached=bool(trial.user_attrs.get(CACHED_ATTR, False)), strategy=strategy,
                      fidelity=str(trial.user_attrs.get(FIDELITY_ATTR, "")),
                      start_ms=_ms(trial.datetime_start), end_ms=_ms(trial.datetime_complete),
                      metric_name=metric_name)


def _ms(moment) -> int | None:
    """Epoch ms of an Optuna trial time (naive local, as Optuna stores it)."""
    return None if moment is None else int(moment.timestamp() * 1000)


def _work(context: SearchContext, study: optuna.Study, budget: Budget, parent: str | None,
          progress: Callable[[optuna.Study], None] | None = None) -> None:
    """One worker's loop: trials until the study's budget is used up (shared across workers)."""
    objective = context.objective()
    tracker = context.tracker()

    def run(trial: optuna.Trial) -> tuple[float, ...]:
        if budget.trials is not None and trials_ahead(study, trial.number) >= budget.trials:
            raise cut_short(trial, "the budget was used up by other workers first")
        return objective(trial)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        _log_trial(tracker, parent, context.config.strategy.name, trial, context.task.name)
        if progress is not None:
            progress(study)

    heartbeat = context.config.storage_heartbeat
    while True:
        fail_stale_trials(study)  # a dead machine's trials: re-queued before the budget is read
        if not budget.exhausted(study):
            study.optimize(run, n_trials=1, catch=(Exception,), callbacks=[after_trial],
                           gc_after_trial=False)
        elif budget.out_of_time() or not await_other_hosts(study, budget.exhausted, heartbeat):
            break


def _die_with(parent_pid: int, poll_s: float = 1.0) -> None:
    """Exit this worker as soon as its parent is gone (killed, even by SIGKILL): an orphan would
    keep running trials beside the next search. Its trial in flight is re-run on resume."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(3)

    threading.Thread(target=watch, name="autosparse-parent-watch", daemon=True).start()


def thread_count(workers: int, threads: int | None = None) -> int:
    """Threads per worker: ``threads`` (the --threads flag), else OMP_NUM_THREADS, else the CPUs
    this process may run on (its affinity), split across the workers; never below 1."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        elif hasattr(os, "sched_getaffinity"):
            threads = len(os.sched_getaffinity(0))
        else:
            threads = os.cpu_count() or 1
    return max(1, threads // workers)


def _worker_main(config_path: str, runs_dir: str, budget: Budget, parent: str | None,
                 threads: int, parent_pid: int, device: str | None = None) -> None:
    _die_with(parent_pid)
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: our own one-line reasons
    context = prepare(config_path, Path(runs_dir), device)
    _work(context, context.open_study(probe_lr=True), budget, parent)
