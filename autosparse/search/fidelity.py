"""Multi-fidelity screening under a fine-tune budget: a short fine-tune first, the full one only
for candidates whose short result could still reach the front.

    low = fine-tune(candidate, low_steps); score on validation
    pool = the short results of every other trial of the study (any worker, any earlier run)
    if cost constraints hold and rank(low + tolerance, pool) <= promote_rank:
        continue the same fine-tune to full_steps (the short steps are not wasted) -> front
    else: the trial ends PRUNED with its short result (never on the front)

Ranks are non-dominated ranks over every objective (accuracy and each cost), not one scalar.
Everything is read from the study, so it works with several workers and on resume; a trial
records its fidelity and the fine-tune steps it used, which the ``finetune_steps`` budget sums.

One-shot searches screen the same way by tokens (successive halving, as EvoPress's stages): the
short score is the task metric on the first ``fidelity.low_windows`` validation windows and the
KL on the same share of calibration windows; a trial records the tokens it scored, which
``budget.tokens`` sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import optuna
from optuna.trial import TrialState

from autosparse.config.objectives import OBJECTIVES, metric_of
from autosparse.config.schema import SearchConfig
from autosparse.config.task_metric import Constraint
from autosparse.search.pareto import nondominated_rank

LOW_ATTR = "low_fidelity"          # metrics of the short fine-tune
FIDELITY_ATTR = "fidelity"         # "low" (pruned after the short fine-tune) or "full"
STEPS_ATTR = "finetune_steps_used"  # fine-tune steps this trial cost (0 for a cached repeat)
PROMOTION_ATTR = "promotion"       # why the short result was (not) promoted
ACCURACY_METRICS = ("accuracy", "accuracy_drop")


@dataclass(frozen=True)
class FidelityPlan:
    low_steps: int
    full_steps: int
    promote_rank: int
    tolerance: float
    objectives: tuple[str, ...]
    constraints: tuple[Constraint, ...] = ()

    @classmethod
    def from_config(cls, config: SearchConfig, full_steps: int,
                    low_steps: int | None = None) -> "FidelityPlan | None":
        """The plan when ``budget.finetune_steps`` with ``fidelity.low_steps`` (or oneshot's
        ``budget.tokens``) is set and a short fine-tune (score) is shorter than the full one;
        None (every candidate gets the full one) otherwise. Steps are the budget's work units:
        fine-tune steps, or with oneshot scored tokens (``low_steps`` then comes from
        ``fidelity.low_windows``)."""
        if config.budget.work() is None:
            return None
        # fine-tuning screens only when fidelity.low_steps asks: at equal steps it did not beat
        # full-fidelity search (benchmarks/results/search_quality.md, ga-mf vs ga)
        low = (config.fidelity.low_steps or 0) if low_steps is None else low_steps
        if low == 0 or low >= full_steps:
            return None
        return cls(low, full_steps, config.fidelity.promote_rank, config.fidelity.tolerance,
                   tuple(config.objectives), tuple(config.constraints))

    def promote(self, study: optuna.Study, number: int,
                low: Mapping[str, float]) -> tuple[bool, str]:
        """Whether trial ``number`` with short-fine-tune metrics ``low`` gets the full one, and why."""
        for constraint in self.constraints:
            # Only cost constraints decide here: they are exact after any number of steps, while
            # a short fine-tune's accuracy is far below the full one's (93 vs 97.8 % measured on
            # digits-resnet after 25 of 100 steps), so an accuracy bound would prune good ones.
            if constraint.metric in ACCURACY_METRICS:
                continue
            if constraint.violation(low[constraint.metric]) > 0:
                return False, f"{constraint} fails ({low[constraint.metric]:.4g})"
        metrics = [metric_of(name) for name in self.objectives]
        directions = [OBJECTIVES[name].direction for name in self.objectives]
        if len(study.directions) == len(directions):  # the task metric may be minimised (mse)
            directions = [d.name.lower() for d in study.directions]
        pool = [[float(t.user_attrs[LOW_ATTR][m]) for m in metrics] for t in _with_low(study, number)]
        better = {"maximize": 1.0, "minimize": -1.0}
        point = [float(low[m]) + (better[d] * self.tolerance if m == "accuracy" else 0.0)
                 for m, d in zip(metrics, directions)]
        rank = nondominated_rank(point, pool, directions)
        if rank <= self.promote_rank:
            return True, f"rank {rank} among {len(pool) + 1} short results"
        return False, (f"rank {rank} among {len(pool) + 1} short results after {self.low_steps} "
                       f"steps (promoted up to {self.promote_rank})")


def _with_low(study: optuna.Study, number: int,
              states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING),
              ) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if t.number != number and LOW_ATTR in t.user_attrs]


def stored_low(study: optuna.Study, key: str, key_attr: str) -> dict[str, float] | None:
    """The short result of an earlier trial of the same candidate: a repeat, or the re-run of a
    trial killed after its short fine-tune (failed as interrupted), costs no short steps."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    for trial in _with_low(study, -1, states):
        if trial.user_attrs.get(key_attr) == key:
            return dict(trial.user_attrs[LOW_ATTR])
    return None


def steps_used(trials: Sequence[optuna.trial.FrozenTrial], in_flight_steps: int) -> int:
    """Fine-tune steps the ``finetune_steps`` budget has spent: what finished trials recorded,
    plus ``in_flight_steps`` for each running trial that has recorded nothing yet."""
    total = 0
    for trial in trials:
        if trial.state == TrialState.RUNNING and STEPS_ATTR not in trial.user_attrs:
            total += in_flight_steps
        else:
            total += int(trial.user_attrs.get(STEPS_ATTR, 0))
    return total
