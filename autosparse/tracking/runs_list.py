"""``autosparse runs``: the searches a runs folder holds, and two searches' fronts side by side.

Read from the files every search writes under ``runs/<name>/`` (``trials.csv``, ``pareto.csv``)
and its lock (a search running now): nothing is opened for writing, no study or MLflow store is
touched, so it is instant and safe beside a running search.

    runs            one row per search: status, trials (failed), front points, the most
                    accurate front point and the smallest within 1 point of it
    runs A B        both fronts, and for each point whether the other search has a point at
                    least as good on every shared objective and better on one (dominated)
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pandas as pd

from autosparse.config.validation import ConfigError

LOCK_FILE = ".search.lock"  # held (flock) by the search running in its folder: search.lock
NEAR = 1.0  # points of the task metric: "the smallest within 1 point of the best"
MAXIMIZED = ("accuracy",)  # pareto.csv columns where more is better (the rest: less)
COSTS = ("size_kb", "latency_ms", "energy_uj", "macs", "bops", "bits_per_weight")


def lock_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def running_search(folder: Path) -> str | None:
    """Who holds the search lock of ``folder`` ("pid N on host, since ..."), or None."""
    path = folder / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return lock_holder(path)
    finally:
        os.close(fd)  # also drops the shared lock taken just now
    return None


def _read(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.is_file() else None
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None


def _quality(front: pd.DataFrame) -> str | None:
    """The task metric's column of a front (accuracy, or mse/perplexity by name)."""
    for column in ("accuracy", "mse", "mae", "perplexity", "metric"):
        if column in front:
            return column
    return None


def search_rows(runs_dir: Path) -> pd.DataFrame:
    """One row per search folder under ``runs_dir`` (those with a trials.csv)."""
    rows = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []:
        trials = _read(folder / "trials.csv")
        if trials is None:
            continue
        front = _read(folder / "pareto.csv")
        states = trials["state"].value_counts() if "state" in trials else pd.Series(dtype=int)
        row = {"search": folder.name,
               "status": "running" if running_search(folder) else "stopped",
               "trials": int(states.get("COMPLETE", 0)),
               "failed": int(states.get("FAIL", 0)),
               "front": 0 if front is None else len(front)}
        metric = _quality(front) if front is not None else None
        if front is not None and metric and len(front) and "size_kb" in front:
            better = front[metric].max() if metric == "accuracy" else front[metric].min()
            best = front.loc[front[metric] == better].iloc[0]
            near = front[(front[metric] - better).abs() <= NEAR]
            small = near.sort_values("size_kb").iloc[0]
            row["best"] = f"{metric} {best[metric]:.4g} at {best['size_kb']:.4g} kB"
            row[f"smallest within {NEAR:g}"] = f"{small['size_kb']:.4g} kB ({small[metric]:.4g})"
        rows.append(row)
    return pd.DataFrame(rows)


def _dominated_by(a: pd.Series, other: pd.DataFrame, objectives: list[str]) -> bool:
    for _, b in other.iterrows():
        better_or_equal = all((b[o] >= a[o]) if o in MAXIMIZED else (b[o] <= a[o])
                              for o in objectives)
        strictly = any((b[o] > a[o]) if o in MAXIMIZED else (b[o] < a[o]) for o in objectives)
        if better_or_equal and strictly:
            return True
    return False


def compare_fronts(runs_dir: Path, first: str, second: str) -> pd.DataFrame:
    """Both fronts in one table: search, trial, the shared objectives, and ``dominated`` (the
    other search has a point at least as good everywhere and better somewhere)."""
    fronts = {}
    for name in (first, second):
        front = _read(runs_dir / name / "pareto.csv")
        if front is None:
            raise ConfigError(f"no search {name!r} with a front in {runs_dir} (no "
                              f"{runs_dir / name / 'pareto.csv'}); `autosparse runs` lists them")
        fronts[name] = front
    shared = [c for c in (*MAXIMIZED, *COSTS) if all(c in f for f in fronts.values())]
    if len(shared) < 2:
        raise ConfigError(f"{first!r} and {second!r} share fewer than two objectives "
                          f"({', '.join(shared) or 'none'}): their fronts cannot be compared")
    rows = []
    for name, other in ((first, second), (second, first)):
        for _, point in fronts[name].iterrows():
            rows.append({"search": name, "trial": int(point.get("trial", -1)),
                         **{o: point[o] for o in shared},
                         "dominated": _dominated_by(point, fronts[other], shared)})
    return pd.DataFrame(rows)


__all__ = ["LOCK_FILE", "compare_fronts", "lock_holder", "running_search", "search_rows"]
