"""Running a search: prepare once, run trials in one or more worker processes, report the front.

    prepare: config -> data -> dense model (trained and cached on first use) -> layer table -> space
    open the study (resume), fail trials of dead workers, enqueue warm starts on a new study
    each worker: while the budget allows: ask -> compress -> fine-tune -> score -> tell -> log
    report: trials from storage -> front, hypervolume -> MLflow artifacts and a terminal table
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
import torch

from autosparse.config.hardware import load_profile
from autosparse.config.objectives import shown_metric, shown_metrics
from autosparse.config.schema import MEASURE, ConfigError, SearchConfig, load_config
from autosparse.cost.calibration.machine import this_machine, warn_if_other_machine
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.latency_table import find_latency_table
from autosparse.cost.measured_latency import CandidateTimer
from autosparse.cost.report import cost_table
from autosparse.search.context import Printer, SearchContext
from autosparse.search.early_stop import (
    InfeasibleStart,
    InfeasibleStartGuard,
    first_generation,
)
from autosparse.search.fidelity import (
    FIDELITY_ATTR,
    STEPS_ATTR,
    steps_used,
)
from autosparse.search.front import HypervolumeSpec, final, trial_metrics, trials_frame
from autosparse.search.objective import (
    CACHED_ATTR,
    CANDIDATE_ATTR,
    FAIL_ATTR,
    cost_metrics,
)
from autosparse.search.reeval import reevaluate_front
from autosparse.search.samplers.knapsack import seed_candidates
from autosparse.search.sensitivity_study import ensure_sensitivity, log_sensitivity
from autosparse.search.sqlite_tuning import use_fast_sqlite
from autosparse.search.study import (
    await_other_hosts,
    counted_trials,
    cut_short,
    fail_interrupted_trials,
    fail_stale_trials,
    is_interrupted,
    make_storage,
    requeue_interrupted,
    study_uid,
    trials_ahead,
)
from autosparse.space.candidate import Candidate
from autosparse.space.discovery import (
    discover,
    find_layers,
    global_magnitude_allocation,
    with_searchable,
)
from autosparse.space.graph import ChannelGraph
from autosparse.space.layers import LayerTable
from autosparse.space.search_space import GridSpace, SearchSpace
from autosparse.tracking.mlflow_tracker import Tracker
from autosparse.tracking.plots import front_table
from autosparse.tracking.progress import LiveLine, dense_training
from autosparse.workload.data import load_data
from autosparse.workload.dense import cache_path, prepare_dense
from autosparse.workload.devices import amp_mode, place_workers, present_devices
from autosparse.workload.models import build_model
from autosparse.workload.splits import DataSplits
from autosparse.workload.task import build_task


def prepare(config_path: str | os.PathLike, runs_dir: Path,
            device: str | None = None) -> SearchContext:
    """Everything a worker needs; ``device`` is this worker's (default: the config's, checked
    against the devices present before anything heavy)."""
    use_fast_sqlite()
    config = load_config(config_path)
    if device is None:
        device = place_workers(1, config.device, config.devices, present_devices())[0]
    amp_mode(torch.device(device).type, config.finetune.amp)  # refused here, not mid-search
    if device.startswith("cuda"):  # this process's default GPU: nothing lands on GPU 0 by default
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    data = load_data(config.data)
    data.pin_memory = device.startswith("cuda") and not data.user_loaders
    profile = load_profile(config.cost_profile()) if config.hardware else None
    if profile is not None:  # a measured profile from another CPU: say so before minutes of work
        warn_if_other_machine(profile, config.cost_profile())
    _check_space_before_training(config, data, runs_dir / "dense")
    dense, dense_metrics = prepare_dense(config.model, data, runs_dir / "dense", config.seed,
                                         device, task=build_task(config.task),
                                         announce=dense_training)
    table, graph = discover(dense, data.input_shape)
    space = SearchSpace.build(config.space, table)
    if space.excluded:  # global magnitude allocations only over the searched layers
        table = with_searchable(table, dense, space.layer_names)
    latency_table, table_note = find_latency_table(runs_dir / config.name, table, profile,
                                                   this_machine()["cpu"])
    dense_metrics = {**dense_metrics, **cost_metrics(table, Candidate({}), profile,
                                                     latency_table=latency_table)}
    timer = _candidate_timer(config, dense, table, graph, data)
    if timer is not None:  # the latency axis is normalised by the dense model, measured alike
        dense_metrics["latency_ms"] = timer.dense_ms()
    grid = _global_grid(dense, space) if config.strategy.name == "grid-global" else None
    dense.to(device)  # discovery, grids and timing above ran on the CPU copy
    return SearchContext(config, Path(config_path).read_text(), runs_dir, data, dense,
                         dense_metrics, table, space, profile, grid, graph=graph,
                         latency_table=latency_table, latency_table_note=table_note,
                         timer=timer, device=device, placement=(device,))


MEASURE_CALIBRATION_BATCHES = 4  # train batches for the int8 ranges of measured candidates


def _candidate_timer(config: SearchConfig, dense: torch.nn.Module, table: LayerTable,
                     graph: ChannelGraph, data: DataSplits) -> CandidateTimer | None:
    """With ``hardware: measure``, the timer every trial's latency comes from (else None)."""
    if config.hardware != MEASURE or config.measure is None:
        return None
    batches = []
    for x, _ in data.loader("train", config.data.batch_size):
        batches.append(x.numpy())
        if len(batches) == MEASURE_CALIBRATION_BATCHES:
            break
    settings = config.measure
    return CandidateTimer(dense, table, graph, data.input_shape, rounds=settings.rounds,
                          calls=settings.calls, warmup=settings.warmup, calibration=batches,
                          seed=config.seed)


def _check_space_before_training(config: SearchConfig, data: DataSplits, cache_dir: Path) -> None:
    """Rules, include/exclude and patterns need only the layers, not trained weights: check them
    on an untrained copy before minutes of dense training, so a typo costs a second."""
    model_cfg = config.model
    if model_cfg.builtin is None or model_cfg.checkpoint or \
            cache_path(model_cfg, data, cache_dir, config.seed, build_task(config.task)).is_file():
        return  # the model is ready at once: the normal check comes right away
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as without it
        untrained = build_model(model_cfg, data.input_shape, data.num_classes).eval()
        table, _ = discover(untrained, data.input_shape)
    SearchSpace.build(config.space, table)


def _global_grid(dense: torch.nn.Module, space: SearchSpace) -> GridSpace:
    """grid-global's points: exact one-threshold allocations at each of the space's sparsities."""
    targets = sorted({s for d in space.decisions for s in d.sparsities if s > 0})
    layers = find_layers(dense)
    weights = {name: layers[name].weight for name in space.layer_names}
    allocations = global_magnitude_allocation(weights, targets, digits=None)
    return GridSpace(tuple(space.global_grid_candidates(allocations)))


def _in_flight_steps(context: SearchContext) -> int:
    objective = context.objective()
    plan = objective.fidelity
    return plan.low_steps if plan is not None else objective.evaluator.finetune_steps()


def _enqueue_warm_starts(context: SearchContext, study: optuna.Study, budget: int | None) -> int:
    strategy = context.config.strategy
    if study.trials or not strategy.warm_start or strategy.name not in ("ga", "bo"):
        return 0
    count = strategy.population_size // 2 if strategy.name == "ga" else strategy.startup_trials
    count = min(count, budget or count)
    if context.planner is not None:  # budgeted allocations from the sensitivity table
        seeds = seed_candidates(context.space, context.planner, count)
    else:
        seeds = context.space.warm_start_candidates(context.table, count, context.config.seed)
    for candidate in seeds:
        study.enqueue_trial(context.space.params_of(candidate), skip_if_exists=True)
    return count


# With only a fine-tune-step budget, a sampler that proposes nothing but known candidates would
# run free repeats forever; this many zero-cost trials in a row end the search instead.
MAX_FREE_REPEATS = 50


@dataclass
class Budget:
    trials: int | None
    deadline: float | None
    finetune_steps: int | None = None
    in_flight_steps: int = 0  # what a running trial that recorded nothing yet will spend

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
            parts.append(f"{self.finetune_steps} fine-tune steps")
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
    _work(context, context.open_study(), budget, parent)


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
            left += (f" | fine-tune steps {self.budget.spent_steps(study)}/"
                     f"{self.budget.finetune_steps} | screened out {pruned}")
        self.line.update(done, f"failed {failed} | front {front} | hypervolume {hv:.4f} | "
                               f"{_duration(elapsed)} elapsed{left}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def report(context: SearchContext, study: optuna.Study, tracker: Tracker, parent: str | None,
           new_trials: int = 0) -> SearchOutcome:
    """Front and hypervolume from storage; logged to MLflow and written under runs/<name>/."""
    objectives = context.config.objectives
    frame = trials_frame(study, objectives)
    histories = HypervolumeSpec(objectives, context.dense_metrics, context.task.direction,
                                context.task.percent).histories(frame)
    front = front_table(frame, objectives, context.task.maximize)  # mse: lowest first
    out_dir = context.runs_dir / context.config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if parent is not None:
        tracker.log_front(parent_run_id=parent, trials=frame, objectives=objectives,
                          hypervolumes=histories, dense_metrics=context.dense_metrics,
                          metric_name=context.task.name, metric_direction=context.task.direction)
    name = context.task.name  # files and the outcome show the task metric by its own name
    frame = frame.rename(columns=lambda c: shown_metric(str(c), name))
    front = front.rename(columns=lambda c: shown_metric(str(c), name))
    frame.to_csv(out_dir / "trials.csv", index=False)
    front.to_csv(out_dir / "pareto.csv", index=False)
    return SearchOutcome(frame, front, {k: final(v) for k, v in histories.items()},
                         context.storage_url, parent, new_trials)


def _start_tracking(context: SearchContext, tracker: Tracker, study: optuna.Study) -> str | None:
    config = context.config
    params = {
        "strategy": config.strategy.name,
        "objectives": ",".join(config.objectives),
        "constraints": "; ".join(config.shown(c) for c in config.constraints) or "none",
        "budget_trials": config.budget.trials,
        "budget_minutes": config.budget.minutes,
        "budget_finetune_steps": config.budget.finetune_steps,
        "seed": config.seed,
        "finetune_steps": context.objective().evaluator.finetune_steps(),  # epochs resolved
        "space_size": context.space.size(),
        "searched_layers": len(context.space.layer_names),
        "hardware": config.hardware or "none",
        "device": ",".join(context.placement or (context.device,)),
        "amp": config.finetune.amp,
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
    return tracker.start_search(study_name=config.name, storage_url=context.storage_url,
                                strategy=config.strategy.name, config_text=context.config_text,
                                layer_table=context.table,
                                dense_metrics=shown_metrics(context.dense_metrics,
                                                            context.task.name),
                                params=params, study_uid=study_uid(study), artifacts=artifacts)


def run_search(config_path: str | os.PathLike, *, runs_dir: Path = Path("runs"), workers: int = 1,
               extend: int = 0, printer: Printer = print,
               threads: int | None = None) -> SearchOutcome:
    """Run (or resume) the search described by the config until its budget is used.

    ``threads`` in all (default: OMP_NUM_THREADS, else this process's CPU affinity) are split
    across the ``workers``."""
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be ≥ 1, got {threads}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: our own one-line reasons
    threads = thread_count(workers, threads)
    torch.set_num_threads(threads)
    settings = load_config(config_path)  # where each worker runs, checked before heavy work
    placement = place_workers(workers, settings.device, settings.devices, present_devices())
    context = prepare(config_path, runs_dir, placement[0])
    context.placement = tuple(placement)
    config = context.config
    task = context.task  # "validation accuracy 97.22%", "validation mse 0.4337"
    quality = f"{context.dense_metrics['accuracy']:.{2 if task.percent else 4}f}"
    printer(f"dense model: validation {task.name} {quality}{'%' if task.percent else ''}, "
            f"{context.dense_metrics['size_kb']:.1f} kB; {len(context.space.layer_names)} layers searched, "
            f"space of {context.space.size():.3g} candidates; strategy {config.strategy.name}")
    if context.latency_table_note:
        printer(context.latency_table_note)
    if placement != ["cpu"] * workers:
        printer(f"device{'s' if workers > 1 else ''}: {', '.join(placement)}"
                + (" (mixed precision)" if config.finetune.amp else ""))
    study = context.open_study(printer)
    if interrupted := fail_interrupted_trials(study):
        printer(f"resuming: {interrupted} trial(s) cut short by an earlier stop will be re-run")
    requeue_interrupted(study)
    total = context.budget_trials(extend)
    _enqueue_warm_starts(context, study, total)
    deadline = time.time() + config.budget.minutes * 60 if config.budget.minutes else None
    steps_budget = config.budget.finetune_steps
    if steps_budget is not None and extend:  # --extend N: N more full fine-tunes' worth
        steps_budget += extend * context.objective().evaluator.finetune_steps()
    budget = Budget(total, deadline, steps_budget, _in_flight_steps(context))
    before = counted_trials(study)
    if budget.exhausted(study):
        printer(f"budget of {budget.describe()} already used ({before} trials in "
                f"{context.storage_url}); reporting the existing front (use --extend N for more)")
    tracker = context.tracker()
    parent = _start_tracking(context, tracker, study)
    if context.sensitivity is not None and parent is not None:
        log_sensitivity(tracker, parent, context.sensitivity)
    progress = Progress(context, budget, printer, len(trials_frame(study, config.objectives)))
    guard = InfeasibleStartGuard(config.constraints, first_generation(config.strategy),
                                 completed_trials(study), total)

    def after_each(study: optuna.Study) -> None:
        progress(study)
        guard(study)  # raises InfeasibleStart: a first generation that misses one constraint

    processes = [
        multiprocessing.get_context("spawn").Process(
            target=_worker_main,
            args=(str(config_path), str(runs_dir), budget, parent, threads, os.getpid(),
                  placement[index]),
            daemon=True,
        )
        for index in range(1, workers)
    ]
    for process in processes:
        process.start()
    loop_start = time.perf_counter()
    try:
        _work(context, study, budget, parent, after_each)
        for process in processes:  # a worker's last trial belongs in the last progress line
            process.join()
        if processes:
            progress(study, only_if_changed=True)
    except (KeyboardInterrupt, InfeasibleStart) as stop:  # a trial in flight is re-run on
        for process in processes:                        # resume; close the parent run
            process.terminate()
        if parent is not None:
            tracker.end_search(parent, "KILLED" if isinstance(stop, KeyboardInterrupt)
                               else "FAILED")
        raise
    finally:
        progress.close()  # the in-place line stays on screen; what follows starts below it
        for process in processes:
            process.join()
    loop_seconds = time.perf_counter() - loop_start
    if config.finetune.reeval_seeds > 0:  # also when a resumed search's budget was used up
        reevaluate_front(context, study, printer)
    outcome = report(context, study, tracker, parent, counted_trials(study) - before)
    outcome.search_seconds = loop_seconds
    if parent is not None:
        tracker.end_search(parent)
    return outcome


def report_front(config_path: str | os.PathLike, *, runs_dir: Path = Path("runs")) -> SearchOutcome:
    """Recompute the front from storage and (re-)log it to MLflow, e.g. after MLflow was down.

    Stored re-evaluations of the front are read, never computed: nothing is fine-tuned here."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: our own one-line reasons
    context = prepare(config_path, runs_dir)
    study = context.open_study()
    tracker = context.tracker()
    parent = _start_tracking(context, tracker, study)
    outcome = report(context, study, tracker, parent)
    if parent is not None:
        tracker.end_search(parent)
    return outcome


def candidate_from_reference(context: SearchContext, reference: str) -> Candidate:
    """``dense``, ``trial-N`` (a finished trial of this config's study) or a candidate JSON file."""
    if reference == "dense":
        return Candidate({})
    if reference.startswith("trial-"):
        number = reference.removeprefix("trial-")
        if not number.isdigit():
            raise ConfigError(f"--candidate {reference!r}: expected trial-N with N a number")
        storage = make_storage(context.storage_url)
        try:
            study = optuna.load_study(study_name=context.config.name, storage=storage)
        except KeyError:
            raise ConfigError(f"no study {context.config.name!r} in {context.storage_url}: "
                              "run `autosparse search` first") from None
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        trial = trials.get(int(number))
        if trial is None:
            raise ConfigError(f"the study has no trial {number} (it has {len(trials)} trials: "
                              f"0 to {len(trials) - 1})")
        if CANDIDATE_ATTR not in trial.user_attrs:
            raise ConfigError(f"trial {number} has no candidate (state {trial.state.name})")
        return Candidate.from_json(trial.user_attrs[CANDIDATE_ATTR])
    path = Path(reference)
    if not path.is_file():
        raise ConfigError(f"--candidate {reference!r}: not 'dense', 'trial-N' or a JSON file")
    try:
        return Candidate.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"candidate file {path} is not a valid candidate: {err}") from None


def run_sensitivity(config_path: str | os.PathLike, runs_dir: Path = Path("runs"),
                    printer: Printer = print):
    """Measure (or reuse from the study) per-layer sensitivity; write runs/<name>/sensitivity.csv
    and .png, log them to the search's MLflow parent run, print a compact table."""
    from autosparse.search.sensitivity_study import (
        format_sensitivity,
        metric_of,
        sensitivity_csv,
    )
    from autosparse.tracking.plots import sensitivity_heatmap_png

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: our own one-line reasons
    context = prepare(config_path, runs_dir)
    study = context.open_study()
    tracker = context.tracker()
    parent = _start_tracking(context, tracker, study)
    table = ensure_sensitivity(context, study, printer, tracker, parent)
    out_dir = context.runs_dir / context.config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    metric, maximize = metric_of(context.task)  # headers under the task metric's name
    (out_dir / "sensitivity.csv").write_text(sensitivity_csv(table, metric, maximize))
    (out_dir / "sensitivity.png").write_bytes(sensitivity_heatmap_png(table, metric, maximize))
    if parent is not None:
        tracker.end_search(parent)
    task = context.task
    if task.is_default:
        printer(f"dense: loss {table.dense_loss:.4f} nats, accuracy {table.dense_accuracy:.2f} % "
                f"on {table.samples} validation samples (Δloss in nats, Δacc in points)")
    else:  # the table holds the metric signed so that negative is worse (minus an mse)
        value = table.dense_accuracy if task.maximize else -table.dense_accuracy
        printer(f"dense: loss {table.dense_loss:.4f}, {task.name} {value:.4g} on {table.samples} "
                f"validation samples (Δloss in the task's loss; Δ{task.name} = change of the "
                f"{task.name}, {'negative' if task.maximize else 'positive'} = worse)")
    printer(format_sensitivity(table, metric, maximize))
    printer(f"written: {out_dir / 'sensitivity.csv'}, {out_dir / 'sensitivity.png'}")
    return table
