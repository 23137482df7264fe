"""Which trial to export: by number, by a rule over the finished trials, or the front's knee.

Pure functions of the trials table (``front.trials_frame``), so every rule is table-tested and
gives the same answer in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from autosparse.config.objectives import OBJECTIVES
from autosparse.config.validation import ConfigError


@dataclass(frozen=True)
class Selection:
    trial: int
    reason: str
    warnings: tuple[str, ...] = ()


def _metric(name: str) -> str:
    if name in OBJECTIVES:
        return OBJECTIVES[name].metric
    return name


def by_number(trials: pd.DataFrame, number: int) -> Selection:
    """The trial with this number; it must have finished well. Off the front: a warning only."""
    rows = trials[trials["trial"] == number]
    if rows.empty:
        known = sorted(trials["trial"].astype(int))
        shown = f"{known[0]} to {known[-1]}" if known else "none"
        raise ConfigError(f"the study has no finished trial {number} (finished trials: {shown})")
    row = rows.iloc[0]
    if row["state"] != "COMPLETE":
        reason = row.get("fail_reason") or "unknown reason"
        raise ConfigError(f"trial {number} failed ({reason}): nothing to export")
    warnings = []
    if not bool(row.get("feasible", True)):
        warnings.append(f"trial {number} violates the search's constraints")
    if not bool(row.get("on_front", False)):
        warnings.append(f"trial {number} is not on the Pareto front (another trial is better "
                        "in every objective)")
    return Selection(number, "chosen by number", tuple(warnings))


def _known_metric(trials: pd.DataFrame, name: str) -> str:
    """The trials-table column of objective or metric ``name``; a clear error when absent."""
    metric = _metric(name)
    if metric == "accuracy":
        raise ConfigError("--minimize accuracy would pick the least accurate trial: name a cost "
                          "(size, macs, bops, latency, energy)")
    if metric not in trials.columns:
        allowed = sorted(c for c in trials.columns if c in {o.metric for o in OBJECTIVES.values()}
                         or c in ("latency_ms", "energy_uj", "size_kb", "macs", "bops"))
        raise ConfigError(f"--minimize {name!r}: the trials have no such metric; "
                          f"available: {', '.join(allowed)}")
    return metric


def by_rule(trials: pd.DataFrame, max_drop: float, minimize: str,
            maximize: bool = True, quality: str = "accuracy") -> Selection:
    """Among feasible finished trials within ``max_drop`` points of the dense accuracy, the one
    with the smallest ``minimize`` metric (ties: the more accurate). ``maximize``: the task
    metric's direction (False for mse, perplexity: the better tie is the lower one); the drop
    is already "positive = worse" for either. ``quality``: the metric's name, for the texts."""
    metric = _known_metric(trials, minimize)
    if not (trials["state"] == "COMPLETE").any():
        raise ConfigError("no trial of the study completed: nothing to export")
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)
                & (trials["accuracy_drop"] <= max_drop) & np.isfinite(trials[metric])]
    if ok.empty:
        best = trials.loc[trials["state"] == "COMPLETE", "accuracy_drop"].min()
        raise ConfigError(f"no feasible finished trial within {_within(max_drop, quality)} "
                          f"(the smallest drop is {best:.3g}); raise --max-drop")
    row = ok.sort_values([metric, "accuracy"], ascending=[True, not maximize]).iloc[0]
    return Selection(int(row["trial"]),
                     f"smallest {metric} ({row[metric]:.4g}) within "
                     + (f"{max_drop:g} points drop" if quality == "accuracy"
                        else _within(max_drop, quality)))


def _within(max_drop: float, quality: str) -> str:
    """``1 points of the dense accuracy``, ``0.05 of the dense mse``."""
    return f"{max_drop:g} {'points ' if quality == 'accuracy' else ''}of the dense {quality}"


def knee(trials: pd.DataFrame, cost: str, maximize: bool = True,
         quality: str = "accuracy") -> Selection:
    """The front point farthest from the line joining the front's two ends (accuracy vs
    ``cost``, both normalised to [0, 1]): where giving up more accuracy stops buying much.
    ``maximize`` False (mse, perplexity): the most accurate end is the lowest metric."""
    metric = _known_metric(trials, cost)
    front = trials[trials["on_front"].astype(bool) & np.isfinite(trials[metric])]
    if front.empty:
        raise ConfigError("the front is empty: no feasible finished trial to export")
    if len(front) < 3:
        row = front.sort_values("accuracy", ascending=not maximize).iloc[0]
        return Selection(int(row["trial"]), "front has fewer than 3 points: the most accurate"
                         if quality == "accuracy" else
                         f"front has fewer than 3 points: the best {quality}")
    x = front[metric].to_numpy(float)
    y = front["accuracy"].to_numpy(float) * (1.0 if maximize else -1.0)  # higher is better
    xn = (x - x.min()) / max(np.ptp(x), 1e-12)
    yn = (y - y.min()) / max(np.ptp(y), 1e-12)
    # line from (cheapest, its accuracy) to (most accurate, its cost); distance of every point
    a = np.array([xn[np.argmin(x)], yn[np.argmin(x)]])
    b = np.array([xn[np.argmax(y)], yn[np.argmax(y)]])
    direction = (b - a) / max(np.linalg.norm(b - a), 1e-12)
    points = np.stack([xn, yn], axis=1) - a
    distance = np.abs(points[:, 0] * direction[1] - points[:, 1] * direction[0])
    row = front.iloc[int(np.argmax(distance))]
    return Selection(int(row["trial"]), f"knee of the front ({quality} vs {metric})")
