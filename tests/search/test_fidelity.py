"""Multi-fidelity screening: the promotion rule, the step budget, fidelity records, resume."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState, create_trial

from autosparse.config.schema import parse_config
from autosparse.config.task_metric import Constraint
from autosparse.search.fidelity import LOW_ATTR, STEPS_ATTR, FidelityPlan, steps_used
from autosparse.search.pareto import nondominated_rank

MAX_MIN = ["maximize", "minimize"]


def test_rank_against_hand_made_fronts():
    pool = [[95, 10], [90, 5], [85, 2], [80, 8]]  # front: first three; (80, 8) on rank 1
    assert nondominated_rank([96, 12], pool, MAX_MIN) == 0  # most accurate: on the front
    assert nondominated_rank([91, 6], pool, MAX_MIN) == 0   # between two front points
    assert nondominated_rank([89, 6], pool, MAX_MIN) == 1   # behind (90, 5) only
    assert nondominated_rank([79, 9], pool, MAX_MIN) == 2   # behind (80, 8), which is rank 1
    assert nondominated_rank([90, 5], pool, MAX_MIN) == 0   # a tie is not dominated
    assert nondominated_rank([50, 1], [], MAX_MIN) == 0
    assert nondominated_rank([1, 1, 1], [[2, 0, 0]], ["maximize", "minimize", "minimize"]) == 1


def _study_with_short_results(results):
    study = optuna.create_study(directions=MAX_MIN)
    for accuracy, size in results:
        study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={
            LOW_ATTR: {"accuracy": accuracy, "size_kb": size, "accuracy_drop": 98 - accuracy}}))
    return study


def _plan(**changes):
    values = dict(low_steps=10, full_steps=40, promote_rank=0, tolerance=0.5,
                  objectives=("accuracy", "size"), constraints=())
    values.update(changes)
    return FidelityPlan(**values)


def test_promotion_uses_rank_with_the_tolerance_and_constraints():
    study = _study_with_short_results([(95, 10), (90, 5)])
    low = {"accuracy": 94.7, "size_kb": 10.5, "accuracy_drop": 3.3}
    assert _plan().promote(study, 99, low)[0]  # 95.2 with the tolerance: not dominated
    assert not _plan(tolerance=0.0).promote(study, 99, low)[0]  # dominated by (95, 10)
    assert _plan(tolerance=0.0, promote_rank=1).promote(study, 99, low)[0]
    tight = (Constraint(metric="size_kb", op="<=", bound=8.0),)
    promoted, why = _plan(constraints=tight).promote(study, 99, {**low, "accuracy": 99.0})
    assert not promoted and "size_kb <= 8" in why
    drop = (Constraint(metric="accuracy_drop", op="<=", bound=1.0),)
    assert _plan(constraints=drop).promote(study, 99, low)[0]  # short accuracy: not a verdict


def test_plan_from_config_needs_a_step_budget_and_a_shorter_short_fine_tune():
    base = {"name": "x", "model": {"builtin": "digits-cnn"}}
    assert FidelityPlan.from_config(parse_config(base), 100) is None  # trials budget: off
    config = parse_config({**base, "budget": {"finetune_steps": 1000}})
    assert config.budget.trials is None
    assert FidelityPlan.from_config(config, 100) is None  # screening is asked for, not default
    asked = parse_config({**base, "budget": {"finetune_steps": 1000},
                          "fidelity": {"low_steps": 25}})
    plan = FidelityPlan.from_config(asked, 100)
    assert (plan.low_steps, plan.full_steps) == (25, 100)
    off = parse_config({**base, "budget": {"finetune_steps": 1000}, "fidelity": {"low_steps": 0}})
    assert FidelityPlan.from_config(off, 100) is None
    assert FidelityPlan.from_config(
        parse_config({**base, "budget": {"finetune_steps": 9}, "fidelity": {"low_steps": 200}}),
        100) is None


def test_steps_used_counts_records_and_running_trials_without_one():
    study = optuna.create_study(directions=MAX_MIN)
    for steps in (40, 10, 0):
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[1.0, 1.0],
                                     user_attrs={STEPS_ATTR: steps}))
    study.ask()  # running, nothing recorded yet
    running = study.ask()
    running.set_user_attr(STEPS_ATTR, 10)
    assert steps_used(study.get_trials(), in_flight_steps=7) == 40 + 10 + 0 + 7 + 10
