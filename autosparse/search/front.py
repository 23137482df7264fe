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

from autosparse.config.objectives import OBJECTIVES
from autosparse.search.fidelity import FIDELITY_ATTR, LOW_ATTR, STEPS_ATTR
from autosparse.search.objective import (
    CACHED_ATTR,
    CANDIDATE_ATTR,
    FAIL_ATTR,
    INTERRUPTED,
    KEY_ATTR,
    METRICS_ATTR,
)
from autosparse.search.pareto import hypervolume_history, pareto_mask

# PRUNED = screened out after a short fine-tune (multi-fidelity): listed with its short
# result, never on the front.
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
            optuna.trial.TrialState.PRUNED)
# Hypervolume references (DESIGN.md): near dense accuracy, where the useful trade-offs are, and
# the customary wide one whose volume is dominated by poor candidates.
NEAR_MARGIN_POINTS = 5.0
WIDE_ACCURACY = 50.0
# A task metric that is not a percentage (mse, perplexity, ...) is normalised by its dense value,
# as the cost axes are; the references are then 5 % worse than dense and twice (or half) it.
NEAR_MARGIN_FRACTION = 0.05
WIDE_FACTOR = 2.0
# Re-evaluations of front points with extra fine-tune seeds (``reeval.py`` writes them): one
# study user attr per trial, ``autosparse.search.reeval.<trial number>`` = {"candidate_key", "seeds",
# "accuracy": [validation per seed], "test_accuracy": [test per seed], optionally "failed":
# {seed: reason}}. Study attrs, because a finished trial cannot be updated in Optuna.
REEVAL_PREFIX = "autosparse.search.reeval."
# Constraints whose value moves with the validation accuracy: sign of d(metric)/d(accuracy).
_ACCURACY_CONSTRAINTS = {"accuracy": 1.0, "accuracy_drop": -1.0}


def _state(trial: optuna.trial.FrozenTrial) -> str:
    """Optuna's state, except INTERRUPTED for a trial cut short (a kill, Ctrl-C): it is re-run on
    resume and is neither a failure nor part of the budget."""
    if trial.state == optuna.trial.TrialState.FAIL and str(
            trial.user_attrs.get(FAIL_ATTR, "")).startswith(INTERRUPTED):
        return "INTERRUPTED"
    return trial.state.name


def trials_frame(study: optuna.Study, objectives: list[str]) -> pd.DataFrame:
    """One row per finished trial: state, candidate, metrics, feasibility and front membership.

    Where the front was re-evaluated with extra seeds, ``accuracy`` is the mean over the trial's
    own score and those seeds (``accuracy_single`` keeps the trial's own), ``accuracy_drop`` and
    the feasibility of accuracy constraints follow the mean, and the front is drawn with it.
    ``accuracy_std``, ``accuracy_seeds`` and ``test_accuracy`` (mean over the re-fine-tuned
    models; reported, never used to pick) come with it. Without re-evaluations none of these
    extra columns exist.
    """
    reevaluations = stored_reevaluations(study)
    quality_direction = _quality_direction(study, objectives)
    maximize = quality_direction == "maximize"
    by_key = {r["candidate_key"]: r for r in reevaluations.values() if r.get("candidate_key")}
    rows = []
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        metrics = trial_metrics(trial)
        row = {
            "trial": trial.number,
            "state": _state(trial),
            "candidate": trial.user_attrs.get(CANDIDATE_ATTR, ""),
            "fail_reason": trial.user_attrs.get(FAIL_ATTR, "" if complete else "unknown"),
            "cached": bool(trial.user_attrs.get(CACHED_ATTR, False)),
            "feasible": complete and all(v <= 0 for v in trial.constraints.values()),
            "fidelity": trial.user_attrs.get(FIDELITY_ATTR, "full" if complete else ""),
            "finetune_steps_used": int(trial.user_attrs.get(STEPS_ATTR, 0)),
            # the trial's own times (ISO, local as Optuna stores them): MLflow runs' start/end
            "datetime_start": _iso(trial.datetime_start),
            "datetime_complete": _iso(trial.datetime_complete),
            **{k: float(v) for k, v in metrics.items()},
        }
        if reevaluations and complete and "accuracy" in metrics:
            record = reevaluations.get(trial.number) or by_key.get(trial.user_attrs.get(KEY_ATTR))
            row.update(_merge_reevaluation(row, record, trial.constraints, maximize))
        rows.append(row)
    columns = ["trial", "state", "candidate", "fail_reason", "cached", "feasible"]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
    frame = frame.sort_values("trial").reset_index(drop=True)
    for name in objectives:
        if OBJECTIVES[name].metric not in frame:
            frame[OBJECTIVES[name].metric] = np.nan
    values, directions = _objective_matrix(frame, objectives, quality_direction)
    usable = frame["feasible"].to_numpy(bool) & np.isfinite(values).all(axis=1)
    frame["on_front"] = pareto_mask(values, directions, usable) if len(frame) else []
    return frame


def _iso(moment) -> str:
    return moment.isoformat(timespec="milliseconds") if moment is not None else ""


def trial_metrics(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """A complete trial's metrics, a pruned trial's short-fine-tune metrics, else nothing."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return dict(trial.user_attrs.get(METRICS_ATTR, {}))
    if trial.state == optuna.trial.TrialState.PRUNED:
        return dict(trial.user_attrs.get(LOW_ATTR, {}))
    return {}


def stored_reevaluations(study: optuna.Study) -> dict[int, dict]:
    """The study's stored re-evaluations by trial number (partial ones included)."""
    out = {}
    for name, record in study.user_attrs.items():
        number = name.removeprefix(REEVAL_PREFIX)
        if name.startswith(REEVAL_PREFIX) and number.isdigit() and isinstance(record, dict):
            out[int(number)] = record
    return out


def _merge_reevaluation(row: dict, record: dict | None, constraints: dict[str, float],
                        maximize: bool = True) -> dict:
    """The re-evaluation columns of one completed trial's row (own score only without one)."""
    single = row["accuracy"]
    extra = [float(v) for v in (record or {}).get("accuracy", [])]
    tests = [float(v) for v in (record or {}).get("test_accuracy", [])]
    values = [single, *extra]
    mean = float(np.mean(values))
    merged = {
        "accuracy_single": single,
        "accuracy": mean,
        "accuracy_std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
        "accuracy_seeds": len(values),
        "test_accuracy": float(np.mean(tests)) if tests else math.nan,
    }
    if not extra:
        return merged
    delta = mean - single
    sign = 1.0 if maximize else -1.0  # a minimised metric (mse): the drop grows with it
    if "accuracy_drop" in row:  # dense = own accuracy + own drop
        merged["accuracy_drop"] = row["accuracy_drop"] - sign * delta
    merged["feasible"] = all(_shifted(key, value, delta, sign) <= 0
                             for key, value in constraints.items())
    return merged


def _shifted(key: str, violation: float, delta: float, sign: float = 1.0) -> float:
    """A constraint's violation with the accuracy moved by ``delta`` (key: "accuracy_drop <= 1")."""
    metric, op, *_ = key.split() + ["", ""]
    shift = _ACCURACY_CONSTRAINTS.get(metric, 0.0) * delta
    if metric == "accuracy_drop":
        shift *= sign
    return violation + shift if op == "<=" else violation - shift


def _quality_direction(study: optuna.Study, objectives: list[str]) -> str:
    """The task metric's direction as the study was created with (mse: minimize)."""
    if "accuracy" not in objectives or len(study.directions) != len(objectives):
        return "maximize"
    direction = study.directions[objectives.index("accuracy")]
    return "minimize" if direction == optuna.study.StudyDirection.MINIMIZE else "maximize"


def _objective_matrix(frame: pd.DataFrame, objectives: list[str],
                      quality_direction: str = "maximize") -> tuple[np.ndarray, list[str]]:
    columns = [OBJECTIVES[name].metric for name in objectives]
    values = frame[columns].to_numpy(float) if len(frame) else np.zeros((0, len(columns)))
    return values, [quality_direction if name == "accuracy" else OBJECTIVES[name].direction
                    for name in objectives]


@dataclass(frozen=True)
class HypervolumeSpec:
    """Objectives normalised so that dense = 1 on every cost axis and accuracy is a fraction.

    A one-shot ``kl`` objective is left out: it is 0 for the dense model (no scale to normalise
    by) and a second view of the quality the task metric already measures.
    """

    objectives: list[str]
    dense: dict[str, float]
    direction: str = "maximize"  # the task metric's (autosparse.workload.task)
    percent: bool = True  # the task metric is a percentage (accuracy, topK)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", [o for o in self.objectives if o != "kl"])

    def _quality_scale(self) -> float:
        return 100.0 if self.percent else abs(self.dense["accuracy"]) or 1.0

    def normalise(self, values: np.ndarray) -> np.ndarray:
        scale = np.array([
            self._quality_scale() if name == "accuracy" else self.dense[OBJECTIVES[name].metric]
            for name in self.objectives
        ])
        return values / scale

    def references(self) -> dict[str, np.ndarray]:
        def reference(quality: float) -> np.ndarray:
            return np.array([quality if n == "accuracy" else 1.0 for n in self.objectives])

        if self.percent:
            near = (self.dense["accuracy"] - NEAR_MARGIN_POINTS) / 100
            return {"hypervolume": reference(near),
                    "hypervolume_wide": reference(WIDE_ACCURACY / 100)}
        worse = 1.0 if self.direction == "minimize" else -1.0
        return {"hypervolume": reference(1.0 + worse * NEAR_MARGIN_FRACTION),
                "hypervolume_wide": reference(WIDE_FACTOR if worse > 0 else 1 / WIDE_FACTOR)}

    def histories(self, frame: pd.DataFrame) -> dict[str, list[float]]:
        """Hypervolume after each finished trial, in trial order, for each reference."""
        values, directions = _objective_matrix(frame, self.objectives, self.direction)
        feasible = frame["feasible"].to_numpy(bool) & np.isfinite(values).all(axis=1)
        normalised = np.nan_to_num(self.normalise(values), nan=0.0)
        return {
            name: hypervolume_history(normalised, directions, ref, feasible)
            for name, ref in self.references().items()
        }


def final(history: list[float]) -> float:
    return history[-1] if history else math.nan
