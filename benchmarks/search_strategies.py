"""Benchmark the search strategies on one config at one trial budget over several seeds.

    for strategy in strategies, seed in seeds:
        fresh study `bench-<strategy>-s<seed>` (old study, trials and MLflow runs deleted first)
        outcome = run_search(...)                # MLflow logging on: it is part of the overhead
        row = hypervolume, best compression at <= 0.5 / <= 1 point drop, wall time per trial,
              share of the trial loop spent outside fine-tuning and evaluation
    optionally: one more, instrumented run per `--profile` strategy -> where the overhead goes
    write <out>.csv (one row per run), <out>_profile.csv, <out>.meta.json and <out>.md

The markdown is rebuilt from those files alone with ``--report-only``. This is a benchmark, not a
test: it takes minutes per run and its timings depend on the machine and on whatever else runs.

    python benchmarks/search_strategies.py --config search_spaces/quickstart.yaml \
        --strategies ga bo random grid-uniform --seeds 0 1 2 --trials 40 \
        --runs-dir runs/benchmarks --out benchmarks/results/search_strategies
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import shlex
import shutil
import sys
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

STRATEGIES = ("ga", "bo", "random", "grid-uniform")
DROPS = (0.5, 1.0)  # accuracy-drop thresholds (points) for "best compression"
OVERHEAD_TARGET = 0.10
_TOL = 1e-9

# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------


def study_name(strategy: str, seed: int, prefix: str = "bench") -> str:
    return f"{prefix}-{strategy}-s{seed}"


def write_config(base: dict, *, name: str, strategy: str, seed: int, trials: int,
                 runs_dir: Path) -> Path:
    """The base config with name, seed, strategy and budget overridden, as a YAML file."""
    data = json.loads(json.dumps(base))  # deep copy of plain YAML data
    data["name"] = name
    data["seed"] = seed
    data.setdefault("strategy", {})["name"] = strategy
    data.setdefault("budget", {})["trials"] = trials
    data["budget"].pop("minutes", None)
    folder = runs_dir / "_bench_configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def delete_previous(config_path: Path, runs_dir: Path) -> None:
    """Remove an earlier study of this name and soft-delete its MLflow runs, so the run is fresh.

    Without the MLflow part a re-run would find the old parent run (matched by study name) and
    the old terminal child runs ``trial-<n>``, skip logging them, and under-count MLflow time.
    """
    from autosparse.config.schema import load_config
    from autosparse.search.study import storage_url
    from autosparse.tracking.ui import resolve_tracking_uri

    config = load_config(config_path)
    url = storage_url(config, runs_dir)
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if folder.name == config.name and folder.is_dir():
            shutil.rmtree(folder)
    else:  # a shared storage named in the config: delete just this study
        import optuna

        try:
            optuna.delete_study(study_name=config.name, storage=url)
        except KeyError:
            pass
    uri = resolve_tracking_uri(config.tracking.uri, runs_dir)
    experiment_name = config.tracking.experiment or config.name
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return
    token = None
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token)
        for run in page:
            client.delete_run(run.info.run_id)
        token = page.token
        if not token:
            break


def best_compression(trials: pd.DataFrame, max_drop: float) -> tuple[float, int | None]:
    """Highest compression among feasible completed trials whose validation drop <= max_drop."""
    if trials.empty or "compression" not in trials or "accuracy_drop" not in trials:
        return math.nan, None
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)
                & (trials["accuracy_drop"] <= max_drop + _TOL)]
    if ok.empty:
        return math.nan, None
    best = ok.sort_values(["compression", "accuracy"], ascending=[False, False]).iloc[0]
    return float(best["compression"]), int(best["trial"])


def test_accuracy(context: Any, candidate_json: str) -> tuple[float, float]:
    """Re-run the trial's fine-tune (same seed) and score validation and test accuracy."""
    from autosparse.compress.apply import compress_model, taylor_scores
    from autosparse.compress.finetune import finetune
    from autosparse.space.candidate import Candidate
    from autosparse.workload.evaluate import evaluate

    candidate = Candidate.from_json(candidate_json)
    cfg = context.config.finetune
    scores = None
    if any(choice.criterion == "taylor" for choice in candidate.values()):
        loader = context.data.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
        scores = taylor_scores(context.dense, loader, context.table.names, cfg.taylor_batches)
    student = compress_model(context.dense, candidate, scores)
    loader = context.data.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    finetune(student, context.dense, loader, cfg)
    return (evaluate(student, context.data.loader("validation", 512)),
            evaluate(student, context.data.loader("test", 512)))


def run_one(base: dict, *, strategy: str, seed: int, trials: int, runs_dir: Path,
            name: str, with_test: bool = True) -> dict[str, Any]:
    from autosparse.search.runner import prepare, run_search

    config_path = write_config(base, name=name, strategy=strategy, seed=seed, trials=trials,
                               runs_dir=runs_dir)
    delete_previous(config_path, runs_dir)
    lines: list[str] = []
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run_search(config_path, runs_dir=runs_dir, workers=1, printer=lines.append)
    run_seconds = time.perf_counter() - start
    frame = outcome.trials
    n = len(frame)
    complete = frame[frame["state"] == "COMPLETE"] if n else frame
    # Cached trials carry the metrics (and timings) of the trial they repeat: count each
    # fine-tune once, only where it actually ran.
    fresh = complete[~complete["cached"].astype(bool)] if n else complete
    work = float((fresh.get("finetune_seconds", 0.0) + fresh.get("eval_seconds", 0.0)).sum()) \
        if len(fresh) else 0.0
    finetune_s = float(fresh["finetune_seconds"].sum()) if len(fresh) else 0.0
    eval_s = float(fresh["eval_seconds"].sum()) if len(fresh) else 0.0
    search = outcome.search_seconds
    row: dict[str, Any] = {
        "strategy": strategy,
        "seed": seed,
        "study": name,
        "trials": n,
        "new_trials": outcome.new_trials,
        "completed": len(complete),
        "failed": int((frame["state"] == "FAIL").sum()) if n else 0,
        "cached": int(complete["cached"].astype(bool).sum()) if n else 0,
        "distinct": int(frame["candidate"].replace("", pd.NA).dropna().nunique()) if n else 0,
        "front_size": int(frame["on_front"].sum()) if n else 0,
        "hypervolume": outcome.hypervolume.get("hypervolume", math.nan),
        "hypervolume_wide": outcome.hypervolume.get("hypervolume_wide", math.nan),
    }
    best_trial = None
    for drop in DROPS:
        value, trial = best_compression(frame, drop)
        row[f"best_cr_drop{drop:g}"] = value
        if drop == 1.0:
            best_trial = trial
    row["val_acc_at_cr_drop1"] = math.nan
    row["test_acc_at_cr_drop1"] = math.nan
    row["val_acc_rerun_drop1"] = math.nan
    context = prepare(config_path, runs_dir) if with_test else None
    if context is not None:
        row["dense_val_acc"] = context.dense_metrics["accuracy"]
        row["dense_test_acc"] = context.dense_metrics.get("test_accuracy", math.nan)
        if best_trial is not None:
            chosen = frame[frame["trial"] == best_trial].iloc[0]
            row["val_acc_at_cr_drop1"] = float(chosen["accuracy"])
            val, test = test_accuracy(context, chosen["candidate"])
            row["val_acc_rerun_drop1"], row["test_acc_at_cr_drop1"] = val, test
    row.update({
        "search_seconds": search,
        "seconds_per_trial": search / max(1, outcome.new_trials),
        "finetune_seconds": finetune_s,
        "eval_seconds": eval_s,
        "overhead_share": 1.0 - work / search if search > 0 else math.nan,
        "overhead_seconds_per_trial": (search - work) / max(1, outcome.new_trials),
        "run_seconds": run_seconds,
        "warnings": len(caught),
    })
    for w in caught[:3]:
        print(f"    warning: {w.category.__name__}: {str(w.message)[:200]}", flush=True)
    return row


# --------------------------------------------------------------------------------------------
# where the overhead goes: exclusive timers around the parts of the trial loop
# --------------------------------------------------------------------------------------------


class ExclusiveTimers:
    """Wall time per category, exclusive of nested timed calls (so categories add up).

    Only calls on the main thread inside the trial loop (``runner._work``) count. Storage calls
    are labelled by the category that issued them (``storage: sampler``, ...).
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        # storage: exclusive seconds and calls per method name (both storage layers summed)
        self.methods: dict[str, float] = defaultdict(float)
        self.method_calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [label, nested seconds, group]
        self._main = threading.main_thread().ident
        self.active = False
        self._undo: list[Callable[[], None]] = []

    def wrap(self, fn: Callable, category: str, *, storage: bool = False, root: bool = False,
             method: str = ""):
        timers = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.get_ident() != timers._main or not (timers.active or root):
                return fn(*args, **kwargs)
            if root:
                timers.active = True
            parent_group = timers._stack[-1][2] if timers._stack else "loop"
            if storage:
                label, group = f"storage: {parent_group}", parent_group
            else:
                label, group = category, category
            frame = [label, 0.0, group]
            timers._stack.append(frame)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                timers._stack.pop()
                timers.totals[label] += elapsed - frame[1]
                # a cached-storage call that reaches the RDB backend is one call, not two
                outer = not (storage and timers._stack and timers._stack[-1][0] == label)
                timers.calls[label] += int(outer)
                if storage:
                    timers.methods[method] += elapsed - frame[1]
                    timers.method_calls[method] += int(outer)
                if timers._stack:
                    timers._stack[-1][1] += elapsed
                if root:
                    timers.active = False

        return timed

    def patch(self, owner: Any, attr: str, category: str, **kwargs) -> None:
        """Wrap ``owner.attr`` (a class's function, a module's function or an instance's bound
        method, which the wrapper then shadows); ``restore`` puts back exactly what was there."""
        own = vars(owner)
        had, raw = attr in own, own.get(attr)
        setattr(owner, attr, self.wrap(getattr(owner, attr) if not had or not isinstance(owner, type)
                                       else raw, category, **kwargs))
        if had:
            self._undo.append(lambda: setattr(owner, attr, raw))
        else:
            self._undo.append(lambda: delattr(owner, attr))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


# Detail category -> the coarse row of the breakdown table.
COARSE = {
    "sampler": "sampler",
    "optuna (other)": "storage / Optuna bookkeeping",
    "objective (other)": "storage / Optuna bookkeeping",
    "cache lookup": "storage / Optuna bookkeeping",
    "loop": "storage / Optuna bookkeeping",
    "mlflow child run": "MLflow child-run logging",
    "progress / front": "progress / front computation",
    "compress": "fine-tune (incl. compress)",
    "fine-tune": "fine-tune (incl. compress)",
    "evaluation": "evaluation",
    "evaluator (other)": "fine-tune (incl. compress)",  # loaders + timer: inside finetune_seconds
    "footprint": "evaluation",  # inside eval_seconds' neighbour; pure and tiny
}
COARSE_ORDER = ["sampler", "storage / Optuna bookkeeping", "MLflow child-run logging",
                "progress / front computation", "fine-tune (incl. compress)", "evaluation"]


def coarse_of(label: str) -> str:
    if label.startswith("storage: "):
        group = label.removeprefix("storage: ")
        if group == "progress / front":
            return "progress / front computation"
        if group == "sampler":
            return "sampler"  # the sampler reading the trials it breeds from
        return "storage / Optuna bookkeeping"
    return COARSE.get(label, "storage / Optuna bookkeeping")


def instrument(timers: ExclusiveTimers) -> None:
    """Monkeypatch timers around the loop's parts (undone by ``timers.restore()``)."""
    import optuna

    from autosparse.search import context as context_mod
    from autosparse.search import objective as objective_mod
    from autosparse.search import runner
    from autosparse.tracking.mlflow_tracker import Tracker

    timers.patch(runner, "_work", "loop", root=True)
    timers.patch(runner.Progress, "__call__", "progress / front")
    timers.patch(Tracker, "log_trial", "mlflow child run")
    timers.patch(objective_mod, "compress_model", "compress")
    timers.patch(objective_mod, "finetune", "fine-tune")
    timers.patch(objective_mod, "evaluate", "evaluation")
    timers.patch(objective_mod, "footprint_metrics", "footprint")
    timers.patch(objective_mod, "_stored_metrics", "cache lookup")
    timers.patch(objective_mod.SearchObjective, "__call__", "objective (other)")
    timers.patch(objective_mod.CandidateEvaluator, "evaluate", "evaluator (other)")
    for name in ("suggest_categorical", "set_user_attr", "set_constraint"):
        if name in optuna.trial.Trial.__dict__:
            timers.patch(optuna.trial.Trial, name, "optuna (other)")

    original_open = context_mod.open_study  # SearchContext.open_study calls it

    def open_study(*args, **kwargs):
        study = original_open(*args, **kwargs)
        timers.patch(study, "optimize", "optuna (other)")
        sampler = study.sampler
        for name in ("infer_relative_search_space", "sample_relative", "sample_independent",
                     "before_trial", "after_trial"):
            timers.patch(sampler, name, "sampler")
        storages = [study._storage, getattr(study._storage, "_backend", None)]
        public = [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")]
        for storage in filter(None, storages):
            for name in public:
                if callable(getattr(storage, name, None)):
                    timers.patch(storage, name, "storage", storage=True, method=name)
        return study

    context_mod.open_study = open_study
    timers._undo.append(lambda: setattr(context_mod, "open_study", original_open))


def profile_one(base: dict, *, strategy: str, seed: int, trials: int, runs_dir: Path
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One instrumented run (its own study): the usual row plus seconds per category."""
    timers = ExclusiveTimers()
    instrument(timers)
    try:
        row = run_one(base, strategy=strategy, seed=seed, trials=trials, runs_dir=runs_dir,
                      name=study_name(strategy, seed, "bench-profile"), with_test=False)
    finally:
        timers.restore()
    n = max(1, row["new_trials"])
    timed = sum(timers.totals.values())
    detail = []
    for label, seconds in sorted(timers.totals.items(), key=lambda kv: -kv[1]):
        detail.append({
            "kind": "timer",
            "strategy": strategy, "seed": seed, "category": coarse_of(label), "detail": label,
            "seconds": seconds, "seconds_per_trial": seconds / n,
            "calls_per_trial": timers.calls[label] / n,
            "share_of_loop": seconds / row["search_seconds"],
        })
    untimed = row["search_seconds"] - timed
    detail.append({
        "kind": "timer",
        "strategy": strategy, "seed": seed, "category": "untimed", "detail": "untimed",
        "seconds": untimed, "seconds_per_trial": untimed / n, "calls_per_trial": 0.0,
        "share_of_loop": untimed / row["search_seconds"],
    })
    for method, seconds in sorted(timers.methods.items(), key=lambda kv: -kv[1]):
        detail.append({
            "kind": "storage_method",
            "strategy": strategy, "seed": seed, "category": "storage method", "detail": method,
            "seconds": seconds, "seconds_per_trial": seconds / n,
            "calls_per_trial": timers.method_calls[method] / n,
            "share_of_loop": seconds / row["search_seconds"],
        })
    return row, detail


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3f", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _pct(value: float) -> str:
    return _fmt(100 * value, ".1f") + "%" if value is not None and math.isfinite(value) else "–"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":--", "r": "--:"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _summary(values: pd.Series, spec: str, pct: bool = False) -> str:
    """median (min–max) over the finite values; '(k/n)' when some runs have none."""
    finite = values[pd.to_numeric(values, errors="coerce").notna()].astype(float)
    if finite.empty:
        return "–"
    scale = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    med, lo, hi = (format(scale * v, spec) for v in (finite.median(), finite.min(), finite.max()))
    text = f"{med}{unit} ({lo}–{hi})" if len(finite) > 1 else f"{med}{unit}"
    if len(finite) < len(values):
        text += f" [{len(finite)}/{len(values)} runs]"
    return text


PER_RUN_COLUMNS = [
    ("strategy", "strategy", None), ("seed", "seed", "d"),
    ("hypervolume", "HV (dense−5 pt)", ".4f"), ("hypervolume_wide", "HV (50%)", ".4f"),
    ("best_cr_drop0.5", "best CR ≤0.5 pt", ".1f"), ("best_cr_drop1", "best CR ≤1 pt", ".1f"),
    ("test_acc_at_cr_drop1", "test acc @ CR≤1 pt", ".2f"),
    ("distinct", "distinct", "d"), ("cached", "cached", "d"), ("failed", "failed", "d"),
    ("front_size", "front", "d"),
    ("seconds_per_trial", "s / trial", ".2f"),
    ("overhead_seconds_per_trial", "overhead s / trial", ".3f"),
    ("overhead_share", "overhead", "pct"),
]

SUMMARY_COLUMNS = [
    ("hypervolume", "HV (dense−5 pt)", ".4f"), ("hypervolume_wide", "HV (50%)", ".4f"),
    ("best_cr_drop0.5", "best CR ≤0.5 pt", ".1f"), ("best_cr_drop1", "best CR ≤1 pt", ".1f"),
    ("test_acc_at_cr_drop1", "test acc @ CR≤1 pt", ".2f"),
    ("distinct", "distinct candidates", ".0f"),
    ("seconds_per_trial", "s / trial", ".2f"),
    ("overhead_seconds_per_trial", "overhead s / trial", ".3f"),
    ("overhead_share", "overhead share", "pct"),
]


def _cell(row: pd.Series, key: str, spec: str | None) -> str:
    value = row.get(key)
    if spec is None:
        return str(value)
    if spec == "pct":
        return _pct(float(value))
    if spec == "d":
        return _fmt(int(value), "d") if pd.notna(value) else "–"
    return _fmt(float(value) if pd.notna(value) else math.nan, spec)


LOADED_FACTOR = 1.5  # a run whose fine-tune is this much slower than the fastest ran under load


def with_load_flags(runs: pd.DataFrame) -> pd.DataFrame:
    """Add fine-tune+eval seconds per trial and ``loaded`` (slowed by other jobs on the machine).

    Every run fine-tunes the same model for the same steps, so a run whose fine-tune took more
    than LOADED_FACTOR x the fastest run's shared the CPU; its overhead *share* is diluted by
    the inflated denominator and says little about the code.
    """
    runs = runs.copy()
    work = runs["finetune_seconds"] + runs["eval_seconds"]
    runs["work_seconds_per_trial"] = work / runs["new_trials"].clip(lower=1)
    runs["loaded"] = runs["work_seconds_per_trial"] > LOADED_FACTOR * runs[
        "work_seconds_per_trial"].min()
    return runs


def _reading(runs: pd.DataFrame, meta: dict) -> list[str]:
    out = []
    med = runs.groupby("strategy", sort=False)["hypervolume"].median()
    if med.notna().any():
        order = med.sort_values(ascending=False)
        ranking = " > ".join(f"{s} {v:.4f}" for s, v in order.items())
        out.append(f"- Hypervolume (reference dense − 5 points), median over seeds: {ranking}; "
                   f"**{order.index[0]}** leads.")
    wide = runs.groupby("strategy", sort=False)["hypervolume_wide"].median()
    if wide.notna().any():
        top = wide.sort_values(ascending=False)
        out.append(f"- With the wide reference (50% accuracy) the order is "
                   f"{' > '.join(top.index)} (medians {', '.join(f'{v:.4f}' for v in top)}).")
    if "grid-uniform" in set(runs["strategy"]):
        grid = runs[runs["strategy"] == "grid-uniform"].set_index("seed")["hypervolume"]
        for strategy in ("ga", "bo"):
            mine = runs[runs["strategy"] == strategy].set_index("seed")["hypervolume"]
            seeds = sorted(set(mine.index) & set(grid.index))
            if not seeds:
                continue
            wins = sum(mine[s] > grid[s] for s in seeds)
            ahead = mine.median() > grid.median()
            gaps = ", ".join(f"{mine[s] - grid[s]:+.4f}" for s in seeds)
            out.append(
                f"- {strategy} vs grid-uniform (same seed): ahead on {wins}/{len(seeds)} seeds "
                f"(HV differences {gaps}); "
                f"median {mine.median():.4f} vs {grid.median():.4f} → target "
                f"\"ahead of grid-uniform\" {'met' if ahead and wins == len(seeds) else 'met on the median only' if ahead else 'NOT met'}."
            )
    quiet = runs[~runs["loaded"]]
    loaded = runs[runs["loaded"]]
    if not loaded.empty:
        names = ", ".join(f"{r.strategy} s{int(r.seed)}" for r in loaded.itertuples())
        out.append(
            f"- {len(loaded)} of {len(runs)} runs shared the CPU with other jobs (fine-tune + "
            f"evaluation > {LOADED_FACTOR:g}× the fastest run's "
            f"{runs['work_seconds_per_trial'].min():.2f} s/trial; marked † below): {names}. "
            "Their s/trial and overhead share are not comparable; hypervolume and compression "
            "do not depend on timing.")
    share = quiet["overhead_share"] if not quiet.empty else runs["overhead_share"]
    basis = "undisturbed runs" if not loaded.empty and not quiet.empty else "runs"
    verdict = "met" if share.max() <= OVERHEAD_TARGET else (
        "met on the median, not on every run" if share.median() <= OVERHEAD_TARGET else "NOT met")
    over = runs["overhead_seconds_per_trial"]
    work = quiet["work_seconds_per_trial"] if not quiet.empty else runs["work_seconds_per_trial"]
    expected = over.median() / (over.median() + work.median())
    out.append(
        f"- Overhead share (time outside fine-tune + evaluation) over {len(share)} {basis}: "
        f"median {_pct(share.median())} ({_pct(share.min())}–{_pct(share.max())}); target ≤ "
        f"{OVERHEAD_TARGET:.0%} **{verdict}**. In seconds the overhead is "
        f"{over.median():.3f} s/trial (median of all runs, {over.min():.3f}–{over.max():.3f}) "
        f"against {work.median():.2f} s of fine-tune + evaluation, i.e. {_pct(expected)} "
        "on a quiet machine.")
    by = quiet.groupby("strategy", sort=False)["overhead_share"].median() if not quiet.empty \
        else runs.groupby("strategy", sort=False)["overhead_share"].median()
    by_s = runs.groupby("strategy", sort=False)["overhead_seconds_per_trial"].median()
    out.append(f"- Overhead by strategy (median share over {basis}; median s/trial over all): "
               + ", ".join(f"{s} {_pct(by.get(s, math.nan))} / {by_s[s]:.3f} s"
                           for s in by_s.index) + ".")
    n_val = meta.get("validation_images")
    if n_val:
        out.append(
            f"- Scale of the accuracy figures: the validation split has {n_val} images, so one "
            f"image is {100 / n_val:.2f} points: \"≤ 0.5 point\" allows "
            f"{int(0.5 / (100 / n_val) + 1e-9)} lost image(s) and \"≤ 1 point\" "
            f"{int(1.0 / (100 / n_val) + 1e-9)}; the pick is chosen on validation and is "
            "therefore optimistic: compare the test column.")
    if {"val_acc_at_cr_drop1", "val_acc_rerun_drop1"} <= set(runs):
        both = runs[["val_acc_at_cr_drop1", "val_acc_rerun_drop1"]].dropna()
        if not both.empty:
            gap = (both["val_acc_at_cr_drop1"] - both["val_acc_rerun_drop1"]).abs().max()
            out.append(f"- Re-fine-tuning the ≤ 1 point picks with the same seed reproduced their "
                       f"validation accuracy to within {gap:.2f} points (so the test column "
                       "scores the very model the search scored).")
    n_seeds = runs["seed"].nunique()
    if n_seeds > 1:
        spread = runs.groupby("strategy")["hypervolume"].agg(lambda v: v.max() - v.min())
        out.append(f"- Hypervolume spread over seeds within one strategy is {spread.min():.4f}–"
                   f"{spread.max():.4f}, as large as the gaps between strategies: the ranking "
                   f"rests on paired (same-seed) comparisons over {n_seeds} seeds, not on "
                   "significant gaps.")
    return out


def _breakdown(profile: pd.DataFrame, runs_for_profile: pd.DataFrame,
               runs: pd.DataFrame | None = None) -> list[str]:
    parts: list[str] = []
    if "kind" not in profile:
        profile = profile.assign(kind="timer")
    for (strategy, seed), everything in profile.groupby(["strategy", "seed"], sort=False):
        group = everything[everything["kind"] == "timer"]
        methods = everything[everything["kind"] == "storage_method"]
        info = runs_for_profile[(runs_for_profile["strategy"] == strategy)
                                & (runs_for_profile["seed"] == seed)]
        head = f"### Where the time goes: {strategy}, seed {seed} (instrumented run)"
        parts.append(head)
        if not info.empty:
            r = info.iloc[0]
            parts.append(
                f"{int(r['new_trials'])} trials, {r['search_seconds']:.1f} s in the trial loop "
                f"({r['seconds_per_trial']:.2f} s/trial), overhead share from the trial metrics "
                f"{_pct(r['overhead_share'])}.")
            same = None if runs is None else runs[(runs["strategy"] == strategy)
                                                  & (runs["seed"] == seed)]
            if same is not None and not same.empty:
                u = same.iloc[0]
                parts[-1] += (
                    f" The uninstrumented run of the same seed: HV {u['hypervolume']:.5f} vs "
                    f"{r['hypervolume']:.5f} here (a seed repeats its search), overhead "
                    f"{u['overhead_seconds_per_trial'] * 1000:.0f} vs "
                    f"{r['overhead_seconds_per_trial'] * 1000:.0f} ms/trial " + (
                        "(that run shared the CPU with other jobs; this one ran on a quiet "
                        "machine and is the cleaner figure)." if bool(u.get("loaded", False))
                        else "(the timers' own cost is within the noise)."))
        parts.append("")
        coarse = group.groupby("category")[["seconds_per_trial", "share_of_loop"]].sum()
        rows = []
        for name in [*COARSE_ORDER, "untimed"]:
            if name in coarse.index:
                c = coarse.loc[name]
                rows.append([name, _fmt(c["seconds_per_trial"] * 1000, ".1f"),
                             _pct(c["share_of_loop"])])
        outside = coarse.drop([c for c in ("fine-tune (incl. compress)", "evaluation")
                               if c in coarse.index])
        rows.append(["**outside fine-tune + evaluation**",
                     f"**{_fmt(outside['seconds_per_trial'].sum() * 1000, '.1f')}**",
                     f"**{_pct(outside['share_of_loop'].sum())}**"])
        parts.append(_table(["part of the trial loop", "ms / trial", "share of loop"], rows))
        parts.append("")
        parts.append("<details><summary>detail (exclusive times; storage calls labelled by "
                     "their caller)</summary>\n")
        rows = [[d["detail"], d["category"], _fmt(d["seconds_per_trial"] * 1000, ".1f"),
                 _fmt(d["calls_per_trial"], ".1f"), _pct(d["share_of_loop"])]
                for _, d in group.sort_values("seconds_per_trial", ascending=False).iterrows()]
        parts.append(_table(["timer", "row", "ms / trial", "calls / trial", "share"], rows,
                            "llrrr"))
        if not methods.empty:
            parts.append("\nOptuna storage time by method (all callers, both storage layers):\n")
            rows = [[f"`{d['detail']}`", _fmt(d["seconds_per_trial"] * 1000, ".1f"),
                     _fmt(d["calls_per_trial"], ".1f"), _pct(d["share_of_loop"])]
                    for _, d in methods.sort_values("seconds_per_trial", ascending=False).iterrows()
                    if d["seconds_per_trial"] >= 0.0005]
            parts.append(_table(["storage method", "ms / trial", "calls / trial", "share"], rows))
        parts.append("\n</details>\n")
    return parts


def _what_to_optimise(profile: pd.DataFrame, meta: dict) -> list[str]:
    if "kind" not in profile:
        profile = profile.assign(kind="timer")
    timers = profile[profile["kind"] == "timer"]
    outside = timers[~timers["category"].isin(["fine-tune (incl. compress)", "evaluation",
                                                "untimed"])]
    per = outside.groupby("detail")["seconds_per_trial"].mean().sort_values(ascending=False)
    total = outside.groupby(["strategy", "seed"])["seconds_per_trial"].sum().mean()
    work = timers[timers["category"].isin(["fine-tune (incl. compress)", "evaluation"])]
    work_total = work.groupby(["strategy", "seed"])["seconds_per_trial"].sum().mean()
    lines = ["### What to optimise", ""]
    top = ", ".join(f"{name} {1000 * v:.0f} ms" for name, v in per.head(4).items())
    need = total - OVERHEAD_TARGET / (1 - OVERHEAD_TARGET) * work_total
    lines.append(
        f"- Outside training the profiled runs spend {1000 * total:.0f} ms/trial (mean over the "
        f"profiled runs); the largest items: {top}. With {work_total:.2f} s of fine-tune + "
        f"evaluation per trial, the 10% target allows "
        f"{1000 * OVERHEAD_TARGET / (1 - OVERHEAD_TARGET) * work_total:.0f} ms, so about "
        f"{1000 * max(0.0, need):.0f} ms/trial has to go.")
    methods = profile[profile["kind"] == "storage_method"]
    if not methods.empty:
        m = methods.groupby("detail")[["seconds_per_trial", "calls_per_trial"]].mean()
        m = m.sort_values("seconds_per_trial", ascending=False)
        lines.append(
            "- Optuna storage is the biggest item: many small calls, each write its own SQLite "
            "commit: " + ", ".join(
                f"`{k}` {r.calls_per_trial:.1f} calls = {1000 * r.seconds_per_trial:.0f} ms"
                for k, r in m.head(3).iterrows())
            + " per trial. Every `suggest_categorical` writes one param row (one commit), and the "
            "objective writes five user attrs (worker, candidate, key, cached, metrics).")
    bench = meta.get("storage_microbench")
    if bench:
        lines.append(
            f"- Measured SQLite write cost through `autosparse.search.study.make_storage` on this machine "
            f"(`--microbench-only`): `set_trial_param` {bench['default_set_trial_param_ms']:.2f} ms"
            f" as configured vs {bench['wal_set_trial_param_ms']:.2f} ms with `PRAGMA "
            f"journal_mode=WAL; synchronous=NORMAL`; `set_trial_user_attr` "
            f"{bench['default_set_trial_user_attr_ms']:.2f} vs "
            f"{bench['wal_set_trial_user_attr_ms']:.2f} ms." + _wal_estimate(methods, bench))
    lines.append(
        "- Candidates, cheapest first: (1) WAL + `synchronous=NORMAL` on the default SQLite "
        "storage (a connect-event pragma in `study.make_storage`; WAL also suits several "
        "workers); (2) one user attr per trial holding candidate, key, cached and metrics "
        "instead of five; (3) `_stored_metrics` and the progress line each read all trials "
        "every trial (O(n) per trial): keep an in-process index keyed by candidate and "
        "recompute the front only every k trials or when a trial lands on it; (4) MLflow child "
        "runs: one `log_batch` carrying params, metrics and tags and the candidate as a tag or "
        "param instead of an artifact upload (temp dir + copy) per trial, or log children "
        "from a background thread.")
    return lines


WRITE_METHODS = ("set_trial_param", "set_trial_user_attr", "set_trial_system_attr",
                 "set_trial_state_values", "create_new_trial")


def _wal_estimate(methods: pd.DataFrame, bench: dict) -> str:
    if methods.empty:
        return ""
    writes = methods[methods["detail"].isin(WRITE_METHODS)]
    per_trial = writes.groupby(["strategy", "seed"])["seconds_per_trial"].sum().mean()
    factor = bench["wal_set_trial_param_ms"] / bench["default_set_trial_param_ms"]
    return (f" Storage writes took {1000 * per_trial:.0f} ms/trial in the profiled runs; at that "
            f"ratio WAL would save about {1000 * per_trial * (1 - factor):.0f} ms/trial "
            "(an estimate, not a measured search).")


def render_markdown(runs: pd.DataFrame, profile: pd.DataFrame | None, meta: dict) -> str:
    runs = with_load_flags(runs)
    strategies = list(dict.fromkeys(runs["strategy"]))
    lines = [
        "# Search strategies on the quickstart: GA vs BO vs random vs grid-uniform",
        "",
        "Generated by `benchmarks/search_strategies.py` (regenerate this file from the CSV with "
        "`--report-only`). Command:",
        "",
        "```",
        meta.get("command", "?"),
        "```",
        "",
        f"- Date: {meta.get('date', '?')}; total benchmark wall time "
        f"{meta.get('total_minutes', math.nan):.1f} min.",
        f"- Machine: {meta.get('machine', '?')}.",
        f"- Config: `{meta.get('config', '?')}`, {meta.get('trials', '?')} trials per run, "
        f"seeds {meta.get('seeds', '?')}, one worker; MLflow logging on "
        f"(`{meta.get('runs_dir', '?')}/mlflow.db`), Optuna storage SQLite per study.",
        f"- Dense model: validation accuracy {_fmt(runs['dense_val_acc'].iloc[0] if 'dense_val_acc' in runs else math.nan, '.2f')}%, "
        f"test {_fmt(runs['dense_test_acc'].iloc[0] if 'dense_test_acc' in runs else math.nan, '.2f')}%"
        f"{meta.get('dense_note', '')}.",
        "",
        "Definitions: **HV** = hypervolume of the feasible front in (accuracy, size) normalised so "
        "dense = 1, reference at dense accuracy − 5 points (and, in brackets, at 50% accuracy). "
        "**best CR ≤ x pt** = highest compression ratio (dense bits / candidate bits) among "
        "feasible completed trials whose *validation* accuracy is at most x points below dense "
        "(– if none). **test acc @ CR≤1 pt** = that candidate re-fine-tuned with the same seed and "
        "scored on the test split. **distinct** = distinct candidates among the trials; "
        "**cached** = trials that repeated an earlier candidate and were not re-trained. "
        "**s / trial** = wall time of the trial loop / trials. **overhead** = 1 − Σ(fine-tune + "
        "evaluation seconds of the trials that actually trained) / loop wall time: sampler, Optuna "
        "storage, MLflow child runs, progress line and front/hypervolume recomputation.",
        "",
        "## Per strategy (median, min–max over seeds)",
        "",
    ]
    rows = []
    for s in strategies:
        sub = runs[runs["strategy"] == s]
        rows.append([s, str(len(sub))] + [
            _summary(sub[key], ".1f", pct=True) if spec == "pct" else _summary(sub[key], spec)
            for key, _, spec in SUMMARY_COLUMNS
        ])
    lines.append(_table(["strategy", "runs"] + [h for _, h, _ in SUMMARY_COLUMNS], rows))
    if runs["loaded"].any():
        lines += ["", "Timing medians here include runs slowed by other jobs (marked † in the "
                  "per-run table); for those, s / trial is inflated and the overhead share "
                  "diluted. The reading below judges the overhead on the undisturbed runs and on "
                  "overhead seconds per trial, which load affects much less."]
    lines += ["", "## Reading", ""]
    lines += _reading(runs, meta)
    notes = meta.get("notes") or []
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Per run", ""]
    rows = []
    for _, r in runs.iterrows():
        cells = [_cell(r, k, spec) for k, _, spec in PER_RUN_COLUMNS]
        cells.insert(-3, _fmt(r["work_seconds_per_trial"], ".2f") + (" †" if r["loaded"] else ""))
        rows.append(cells)
    header = [h for _, h, _ in PER_RUN_COLUMNS]
    header.insert(-3, "fine-tune+eval s / trial")
    lines.append(_table(header, rows))
    lines.append("")
    lines.append(f"† slowed by other jobs on the shared machine (fine-tune + evaluation > "
                 f"{LOADED_FACTOR:g}× the fastest run).")
    lines.append("")
    if profile is not None and not profile.empty:
        lines += ["## Where the overhead goes", "",
                  "One extra run per profiled strategy, in a study of its own, with exclusive "
                  "wall-clock timers monkeypatched (inside the benchmark process) around the "
                  "sampler's methods, every Optuna storage call (labelled by which part issued "
                  "it), `Tracker.log_trial`, the progress callback (`trials_frame` + hypervolume "
                  "history), compression, fine-tuning and evaluation. Times are exclusive, so "
                  "rows add up to the loop's wall time; `sampler` includes the storage reads the "
                  "sampler makes.", ""]
        prof_runs = pd.DataFrame(meta.get("profile_runs", []))
        lines += _breakdown(profile, prof_runs, runs)
        lines += _what_to_optimise(profile, meta)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def machine_note() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU used, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"load average at start {load[0]:.2f} (shared machine: other jobs ran alongside, "
            f"so timings are noisy)")


def storage_microbench(reps: int = 5, calls: int = 50) -> dict[str, float]:
    """ms per SQLite write through autosparse's storage, as is and with WAL + synchronous=NORMAL.

    Each Optuna write (one param, one user attr) is its own transaction, so its cost is the
    commit: this measures how much of the storage overhead is the journal/fsync setting.
    """
    import statistics
    import tempfile

    import optuna
    from optuna.distributions import CategoricalDistribution
    from sqlalchemy import event

    from autosparse.search.study import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def one(pragmas: bool) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            storage = make_storage(f"sqlite:///{tmp}/study.db")
            if pragmas:
                @event.listens_for(storage.engine, "connect")
                def _pragmas(connection, _record):
                    cursor = connection.cursor()
                    cursor.execute("PRAGMA journal_mode=WAL")
                    cursor.execute("PRAGMA synchronous=NORMAL")
                    cursor.close()

                storage.engine.dispose()
            study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "m")
            dist = CategoricalDistribution([0, 1, 2])
            param, attr = [], []
            for _ in range(reps):
                trial_id = storage.create_new_trial(study_id)
                start = time.perf_counter()
                for i in range(calls):
                    storage.set_trial_param(trial_id, f"p{i}", 1.0, dist)
                param.append((time.perf_counter() - start) / calls * 1000)
                start = time.perf_counter()
                for i in range(calls):
                    storage.set_trial_user_attr(trial_id, f"a{i}", {"x": i})
                attr.append((time.perf_counter() - start) / calls * 1000)
            storage.remove_session()
            storage.engine.dispose()
            return {"set_trial_param_ms": statistics.median(param),
                    "set_trial_user_attr_ms": statistics.median(attr)}

    default, wal = one(False), one(True)
    return {**{f"default_{k}": v for k, v in default.items()},
            **{f"wal_{k}": v for k, v in wal.items()}}


def _json_clean(value: Any) -> Any:
    """NaN/inf -> null, numpy scalars -> Python numbers: strict JSON for the meta file."""
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_meta(path: Path, meta: dict) -> None:
    path.write_text(json.dumps(_json_clean(meta), indent=2, allow_nan=False) + "\n")


def validation_images(config_path: str | os.PathLike) -> int | None:
    try:
        from autosparse.config.schema import load_config
        from autosparse.workload.data import load_data

        return len(load_data(load_config(config_path).data).split("validation"))
    except Exception:  # noqa: BLE001 - only a note in the report
        return None


def write_report(out: Path) -> Path:
    runs = pd.read_csv(out.with_suffix(".csv"))
    profile_path = out.parent / f"{out.name}_profile.csv"
    profile = pd.read_csv(profile_path) if profile_path.exists() else None
    meta_path = out.parent / f"{out.name}.meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if "validation_images" not in meta and meta.get("config"):
        meta["validation_images"] = validation_images(meta["config"])
    md = out.with_suffix(".md")
    md.write_text(render_markdown(runs, profile, meta))
    return md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="search_spaces/quickstart.yaml")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_strategies"),
                        help="output stem: <out>.csv, <out>.md, <out>_profile.csv, <out>.meta.json")
    parser.add_argument("--profile", nargs="*", default=["ga"], choices=STRATEGIES,
                        help="strategies to run once more, instrumented (default: ga; none: "
                             "give the flag with no value)")
    parser.add_argument("--profile-seed", type=int, default=0)
    parser.add_argument("--no-test", action="store_true",
                        help="skip re-fine-tuning the best ≤1-point candidate for test accuracy")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild <out>.md from the CSV/JSON files and exit")
    parser.add_argument("--microbench-only", action="store_true",
                        help="(re)measure the SQLite write cost into <out>.meta.json, rebuild "
                             "<out>.md and exit (the full run measures it too)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if args.report_only:
        print(f"wrote {write_report(out)}")
        return 0
    meta_path = out.parent / f"{out.name}.meta.json"
    if args.microbench_only:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta["storage_microbench"] = storage_microbench()
        meta["storage_microbench_command"] = (
            "python benchmarks/search_strategies.py " + shlex.join(sys.argv[1:] if argv is None
                                                                   else argv))
        write_meta(meta_path, meta)
        print(json.dumps(meta["storage_microbench"], indent=2))
        print(f"wrote {write_report(out)}")
        return 0
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # keep every run in <runs-dir>/mlflow.db
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.parent.mkdir(parents=True, exist_ok=True)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.config).read_text())
    argv_text = sys.argv[1:] if argv is None else argv
    meta: dict[str, Any] = {
        "command": "python benchmarks/search_strategies.py " + shlex.join(argv_text),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_note(),
        "config": args.config, "trials": args.trials, "seeds": args.seeds,
        "runs_dir": str(args.runs_dir),
        "validation_images": validation_images(args.config),
        "notes": [],
    }
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    # Seeds outermost, so a slow spell on the shared machine hits all strategies alike.
    for seed in args.seeds:
        for strategy in args.strategies:
            name = study_name(strategy, seed)
            print(f"[{len(rows) + 1}/{len(args.seeds) * len(args.strategies)}] {name} ...",
                  flush=True)
            row = run_one(base, strategy=strategy, seed=seed, trials=args.trials,
                          runs_dir=args.runs_dir, name=name, with_test=not args.no_test)
            rows.append(row)
            print(f"    HV {row['hypervolume']:.4f} / wide {row['hypervolume_wide']:.4f} | "
                  f"CR<=0.5 {_fmt(row['best_cr_drop0.5'], '.1f')} "
                  f"CR<=1 {_fmt(row['best_cr_drop1'], '.1f')} | distinct {row['distinct']} | "
                  f"{row['seconds_per_trial']:.2f} s/trial | overhead "
                  f"{_pct(row['overhead_share'])} | run {row['run_seconds']:.0f} s", flush=True)
            pd.DataFrame(rows).to_csv(out.with_suffix(".csv"), index=False)
    details: list[dict[str, Any]] = []
    profile_runs: list[dict[str, Any]] = []
    for strategy in args.profile or []:
        print(f"[profile] {strategy} seed {args.profile_seed} ...", flush=True)
        row, detail = profile_one(base, strategy=strategy, seed=args.profile_seed,
                                  trials=args.trials, runs_dir=args.runs_dir)
        profile_runs.append(row)
        details.extend(detail)
        print(f"    {row['seconds_per_trial']:.2f} s/trial | overhead "
              f"{_pct(row['overhead_share'])}", flush=True)
    if details:
        pd.DataFrame(details).to_csv(out.parent / f"{out.name}_profile.csv", index=False)
    meta["profile_runs"] = profile_runs
    meta["storage_microbench"] = storage_microbench()
    meta["total_minutes"] = (time.perf_counter() - started) / 60
    meta["load_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_meta(meta_path, meta)
    print(f"wrote {out.with_suffix('.csv')} and {write_report(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
