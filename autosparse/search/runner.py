"""Running a search: prepare once, run trials in one or more worker processes, report the front.

    prepare: config -> data -> dense model (trained and cached on first use) -> layer table -> space
    open the study (resume), fail trials of dead workers, enqueue warm starts on a new study
    each worker: while the budget allows: ask -> compress -> fine-tune -> score -> tell -> log
    report: trials from storage -> front, hypervolume -> MLflow artifacts and a terminal table

``preparation`` builds the context, ``workers`` runs the trial loop (here and in each extra
process), ``report`` shows progress and writes the front; this module drives them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from pathlib import Path

import optuna
import torch

from autosparse.config.schema import ConfigError, load_config
from autosparse.search.context import Printer, SearchContext
from autosparse.search.early_stop import (
    InfeasibleStartGuard,
    first_generation,
)
from autosparse.search.front import trials_frame
from autosparse.search.lock import SearchLock, refuse_if_running, running_search
from autosparse.search.lr_choice import probe_charge
from autosparse.search.objective import CANDIDATE_ATTR
from autosparse.search.preparation import prepare
from autosparse.search.reeval import reevaluate_front, test_oneshot_front
from autosparse.search.report import Progress, SearchOutcome, _start_tracking, report
from autosparse.search.samplers.knapsack import seed_candidates
from autosparse.search.sensitivity_study import ensure_sensitivity, log_sensitivity
from autosparse.search.study import (
    check_matching_study,
    counted_trials,
    fail_interrupted_trials,
    make_storage,
    requeue_interrupted,
    set_aside,
    storage_url,
)
from autosparse.search.workers import (
    Budget,
    _in_flight_steps,
    _work,
    _worker_main,
    completed_trials,
    thread_count,
)
from autosparse.space.candidate import Candidate
from autosparse.tracking.databases import check_separate_stores
from autosparse.tracking.ui import resolve_tracking_uri
from autosparse.tracking.writable import check_database, check_folder
from autosparse.workload.devices import place_workers, present_devices


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


def run_search(config_path: str | os.PathLike, *, runs_dir: Path = Path("runs"), workers: int = 1,
               extend: int = 0, printer: Printer = print,
               threads: int | None = None, fresh: bool = False) -> SearchOutcome:
    """Run (or resume) the search described by the config until its budget is used.

    ``threads`` in all (default: OMP_NUM_THREADS, else this process's CPU affinity) are split
    across the ``workers``. A stored study of this name made for another configuration is
    refused before anything is built; ``fresh`` sets it aside (``study.set_aside``) instead."""
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be ≥ 1, got {threads}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: our own one-line reasons
    threads = thread_count(workers, threads)
    torch.set_num_threads(threads)
    settings = load_config(config_path)  # where each worker runs, checked before heavy work
    placement = place_workers(workers, settings.device, settings.devices, present_devices())
    url = storage_url(settings, runs_dir)
    folder = runs_dir / settings.name
    tracking_uri = resolve_tracking_uri(settings.tracking.uri, runs_dir)
    check_separate_stores(url, tracking_uri)
    check_folder(runs_dir, "--runs-dir")  # where results go: writable before any work
    check_database(url, "storage")
    check_database(tracking_uri, "tracking.uri")
    refuse_if_running(folder, settings.name)  # before --fresh moves anything
    if fresh:
        kept = set_aside(settings, runs_dir, url, default_url=not settings.storage)
        if kept:
            printer(f"--fresh: the earlier study {settings.name!r} is kept as {kept!r} "
                    f"({runs_dir / kept}); this search starts afresh")
    else:
        check_matching_study(settings, url)
    with SearchLock(folder, settings.name):  # one search process per study and runs folder
        return _run_search(config_path, runs_dir, workers, extend, printer, placement, threads)


def _run_search(config_path: str | os.PathLike, runs_dir: Path, workers: int, extend: int,
                printer: Printer, placement: list[str], threads: int) -> SearchOutcome:
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
    study = context.open_study(printer, probe_lr=True)
    if interrupted := fail_interrupted_trials(study):
        printer(f"resuming: {interrupted} trial(s) cut short by an earlier stop will be re-run")
    requeue_interrupted(study)
    total = context.budget_trials(extend)
    full_steps = context.objective().evaluator.finetune_steps()  # one full score's work
    probe_trials, probe_steps = probe_charge(context.lr_probe, full_steps)  # finetune.lr: auto
    if total is not None and probe_trials:
        total = max(1, total - probe_trials)
    _enqueue_warm_starts(context, study, total)
    deadline = time.time() + config.budget.minutes * 60 if config.budget.minutes else None
    steps_budget = config.budget.work()  # fine-tune steps, or oneshot's scored tokens
    if steps_budget is not None and extend:  # --extend N: N more full fine-tunes' worth
        steps_budget += extend * full_steps
    if steps_budget is not None and probe_steps:
        steps_budget = max(0, steps_budget - probe_steps)
    if probe_steps:
        printer(f"finetune.lr {context.finetune.lr:g} (probed): its {probe_steps} fine-tune "
                f"steps count in the budget" + (f" as {probe_trials} trials" if
                                                config.budget.trials is not None else ""))
    budget = Budget(total, deadline, steps_budget, _in_flight_steps(context),
                    config.budget.work_unit())
    before = counted_trials(study)
    if budget.exhausted(study):
        printer(f"budget of {budget.describe()} already used ({before} trials in "
                f"{context.storage_url}); reporting the existing front (use --extend N for more)")
    tracker = context.tracker()
    if others := tracker.other_searches(config.name):  # a shared tracking.experiment
        printer(f"MLflow experiment {tracker.experiment!r} also holds search "
                f"{', '.join(repr(o) for o in others)}: each search keeps its own parent run "
                "and children (tag autosparse.search.study)")
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
    except BaseException as stop:  # a trial in flight is re-run on resume; close the parent
        for process in processes:  # run (a full disk or any crash leaves it FAILED, not RUNNING)
            process.terminate()
        if parent is not None:  # on a full disk this may fail too: the first error is told
            with contextlib.suppress(Exception):
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
    if context.oneshot is not None:  # held-out perplexity of the front: reported, never picked on
        test_oneshot_front(context, study, printer)
    outcome = report(context, study, tracker, parent, counted_trials(study) - before)
    outcome.search_seconds = loop_seconds
    if parent is not None:
        tracker.end_search(parent)
    return outcome


def report_front(config_path: str | os.PathLike, *, runs_dir: Path = Path("runs"),
                 printer: Printer = print) -> SearchOutcome:
    """Recompute the front from storage and (re-)log it to MLflow, e.g. after MLflow was down.

    Stored re-evaluations of the front are read, never computed: nothing is fine-tuned here."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: our own one-line reasons
    context = prepare(config_path, runs_dir)
    study = context.open_study()
    holder = running_search(runs_dir / context.config.name)
    if holder:  # the running search owns its MLflow run and report files
        printer(f"the search {context.config.name!r} is running ({holder}): the front below is "
                "read from storage; MLflow and runs/ are left to the search, which logs them "
                "when it ends")
        return report(context, study, None, None, write_files=False)
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
