"""Read the study back as a table of trials, with the Pareto front and hypervolume marked.

Everything here is derived from storage, so the front can be recomputed and re-logged at any
time, by any process, after a crash or with MLflow down during the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd

from .objective import CACHED_ATTR, CANDIDATE_ATTR, FAIL_ATTR, METRICS_ATTR
from .objectives import OBJECTIVES
from .pareto import hypervolume_history, pareto_mask

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
# Hypervolume references (DESIGN.md): near dense accuracy, where the useful trade-offs are, and
# the customary wide one whose volume is dominated by poor candidates.
NEAR_MARGIN_POINTS = 5.0
WIDE_ACCURACY = 50.0


def trials_frame(study: optuna.Study, objectives: list[str]) -> pd.DataFrame:
    """One row per finished trial: state, candidate, metrics, feasibility and front membership."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        metrics = trial.user_attrs.get(METRICS_ATTR, {}) if complete else {}
        rows.append({
            "trial": trial.number,
            "state": trial.state.name,
            "candidate": trial.user_attrs.get(CANDIDATE_ATTR, ""),
            "fail_reason": trial.user_attrs.get(FAIL_ATTR, "" if complete else "unknown"),
            "cached": bool(trial.user_attrs.get(CACHED_ATTR, False)),
            "feasible": complete and all(v <= 0 for v in trial.constraints.values()),
            **{k: float(v) for k, v in metrics.items()},
        })
    columns = ["trial", "state", "candidate", "fail_reason", "cached", "feasible"]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
    frame = frame.sort_values("trial").reset_index(drop=True)
    for name in objectives:
        if OBJECTIVES[name].metric not in frame:
            frame[OBJECTIVES[name].metric] = np.nan
    values, directions = _objective_matrix(frame, objectives)
    usable = frame["feasible"].to_numpy(bool) & np.isfinite(values).all(axis=1)
    frame["on_front"] = pareto_mask(values, directions, usable) if len(frame) else []
    return frame


def _objective_matrix(frame: pd.DataFrame, objectives: list[str]) -> tuple[np.ndarray, list[str]]:
    columns = [OBJECTIVES[name].metric for name in objectives]
    values = frame[columns].to_numpy(float) if len(frame) else np.zeros((0, len(columns)))
    return values, [OBJECTIVES[name].direction for name in objectives]


@dataclass(frozen=True)
class HypervolumeSpec:
    """Objectives normalised so that dense = 1 on every cost axis and accuracy is a fraction."""

    objectives: list[str]
    dense: dict[str, float]

    def normalise(self, values: np.ndarray) -> np.ndarray:
        scale = np.array([
            100.0 if name == "accuracy" else self.dense[OBJECTIVES[name].metric]
            for name in self.objectives
        ])
        return values / scale

    def references(self) -> dict[str, np.ndarray]:
        def reference(accuracy: float) -> np.ndarray:
            return np.array([accuracy / 100 if n == "accuracy" else 1.0 for n in self.objectives])

        near = self.dense["accuracy"] - NEAR_MARGIN_POINTS
        return {"hypervolume": reference(near), "hypervolume_wide": reference(WIDE_ACCURACY)}

    def histories(self, frame: pd.DataFrame) -> dict[str, list[float]]:
        """Hypervolume after each finished trial, in trial order, for each reference."""
        values, directions = _objective_matrix(frame, self.objectives)
        feasible = frame["feasible"].to_numpy(bool) & np.isfinite(values).all(axis=1)
        normalised = np.nan_to_num(self.normalise(values), nan=0.0)
        return {
            name: hypervolume_history(normalised, directions, ref, feasible)
            for name, ref in self.references().items()
        }


def final(history: list[float]) -> float:
    return history[-1] if history else math.nan
