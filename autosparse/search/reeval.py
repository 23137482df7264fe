"""Re-evaluate the final front with extra fine-tune seeds, and score those models on test.

One fine-tune seed moves a score by ~0.3 points and one validation image can be worth 0.3
points, so the best-looking point under a drop budget is often a lucky draw. After the trial
loop every front point is fine-tuned again with seeds ``finetune.seed + 1 ... + reeval_seeds``;
the front (``front.trials_frame``) then uses the mean over the trial's own score and those.

    repeat (bounded: each round finishes at least one new candidate)
        front <- trials_frame(study)                     means where re-evaluated
        for each front candidate missing a wanted seed:  duplicates (same candidate key) once
            for each missing seed: compress, fine-tune, validation and test accuracy
                                   -> stored at once in the study's user attrs
    until every front point has every wanted seed

Test accuracy is the mean over the re-fine-tuned models: reported next to the front, never used
to pick anything. A one-shot search has no seeds to re-run: its front points are scored once on
the test windows (``test_oneshot_front``). Every seed is stored as soon as it is scored, so a run killed here resumes
where it stopped (no fine-tune lost or redone). A seed whose fine-tune raises (e.g. diverges) is
stored with its reason under "failed", printed, left out of the mean and never retried.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import optuna

from autosparse.search.front import REEVAL_PREFIX, stored_reevaluations, trials_frame
from autosparse.search.objective import (
    CANDIDATE_ATTR,
    KEY_ATTR,
    METRICS_ATTR,
    CandidateEvaluator,
)
from autosparse.space.candidate import Candidate
from autosparse.workload.evaluate import evaluate

if TYPE_CHECKING:
    from autosparse.search.context import SearchContext

Printer = Callable[[str], None]


def wanted_seeds(base_seed: int, extra: int) -> list[int]:
    """The extra fine-tune seeds of a re-evaluation (the trial itself used ``base_seed``)."""
    if extra < 0:
        raise ValueError(f"reeval_seeds must be >= 0, got {extra}")
    return [base_seed + i for i in range(1, extra + 1)]


def reevaluate_front(context: "SearchContext", study: optuna.Study, printer: Printer = print,
                     evaluator: CandidateEvaluator | None = None) -> int:
    """Re-fine-tune every front point with the config's extra seeds; returns fine-tunes run.

    ``evaluator`` defaults to the search's own (the one its trials were scored with).
    """
    config = context.config
    seeds = wanted_seeds(config.finetune.seed, config.finetune.reeval_seeds)
    if not seeds:
        return 0
    evaluator = evaluator or context.objective().evaluator
    trials = {t.number: t for t in study.get_trials(deepcopy=False,
                                                    states=(optuna.trial.TrialState.COMPLETE,))}
    keys = {_key(t) for t in trials.values()}
    runs = 0
    for round_ in range(len(keys) + 1):  # each round completes >= 1 candidate: bounded
        pending = _pending(study, trials, config.objectives, seeds)
        if not pending:
            return runs
        if round_ == 0:
            printer(f"re-evaluating {len(pending)} front point(s) with {len(seeds)} extra "
                    f"fine-tune seed(s) (seeds {seeds[0]}..{seeds[-1]}) ...")
        else:  # a point's mean dropped it off the front and let these on
            printer(f"re-evaluating {len(pending)} more: they joined the front when the seeds' "
                    "means moved it ...")
        for number, record in pending:
            runs += _reevaluate(context, study, evaluator, trials[number], record, seeds)
            printer(_summary(trials[number], record))
    raise AssertionError("re-evaluation did not settle")  # unreachable: see the bound above


def test_oneshot_front(context: "SearchContext", study: optuna.Study,
                       printer: Printer = print) -> int:
    """One-shot: each front point's task metric on the test windows, stored as its record's
    ``test_accuracy`` (a one-shot score is deterministic: no extra seeds). Never used to pick;
    a point already scored (an earlier run, a cached repeat) is not scored again. Returns the
    candidates scored."""
    assert context.oneshot is not None
    trials = {t.number: t for t in study.get_trials(deepcopy=False,
                                                    states=(optuna.trial.TrialState.COMPLETE,))}
    frame = trials_frame(study, context.config.objectives)
    stored = stored_reevaluations(study)
    done = {r.get("candidate_key") for r in stored.values() if r.get("test_accuracy")}
    todo = []
    for number in frame.loc[frame["on_front"].astype(bool), "trial"].astype(int):
        trial = trials.get(number)
        if trial is not None and CANDIDATE_ATTR in trial.user_attrs and _key(trial) not in done:
            done.add(_key(trial))
            todo.append(trial)
    if todo:
        printer(f"scoring {len(todo)} front point(s) on the test windows (reported, never "
                "used to pick) ...")
    loader = context.data.loader("test", context.data.batch_size)
    for trial in todo:
        model = context.oneshot.model(context.dense, Candidate.from_json(
            trial.user_attrs[CANDIDATE_ATTR]))
        record = {"candidate_key": _key(trial), "seeds": [], "accuracy": [],
                  "test_accuracy": [evaluate(model, loader, context.task)]}
        study.set_user_attr(f"{REEVAL_PREFIX}{trial.number}", record)
    return len(todo)


def _key(trial: optuna.trial.FrozenTrial) -> str:
    return str(trial.user_attrs.get(KEY_ATTR) or trial.user_attrs.get(CANDIDATE_ATTR, ""))


def _pending(study: optuna.Study, trials: dict[int, optuna.trial.FrozenTrial],
             objectives: list[str], seeds: list[int]) -> list[tuple[int, dict]]:
    """(trial number, its record so far) of front candidates that miss a wanted seed."""
    frame = trials_frame(study, objectives)
    stored = stored_reevaluations(study)
    by_key = {r.get("candidate_key"): (n, r) for n, r in sorted(stored.items(), reverse=True)}
    pending, seen = [], set()
    for number in frame.loc[frame["on_front"].astype(bool), "trial"].astype(int):
        trial = trials.get(number)
        if trial is None or CANDIDATE_ATTR not in trial.user_attrs:
            continue
        key = _key(trial)
        if key in seen:  # a cached repeat of a candidate already handled this round
            continue
        seen.add(key)
        owner, record = (number, stored[number]) if number in stored else \
            by_key.get(key, (number, None))
        record = record or {"candidate_key": key, "seeds": [], "accuracy": [], "test_accuracy": []}
        if not set(seeds) <= set(record["seeds"]) | {int(s) for s in record.get("failed", {})}:
            pending.append((owner if owner in trials else number, record))
    return pending


def _reevaluate(context: "SearchContext", study: optuna.Study, evaluator: CandidateEvaluator,
                trial: optuna.trial.FrozenTrial, record: dict, seeds: list[int]) -> int:
    """Fine-tune the trial's candidate with each missing seed; store after every seed."""
    candidate = Candidate.from_json(trial.user_attrs[CANDIDATE_ATTR])
    runs = 0
    for seed in seeds:
        if seed in record["seeds"] or str(seed) in record.get("failed", {}):
            continue
        cfg = context.finetune.model_copy(update={"seed": seed})
        runs += 1
        try:
            model, _ = evaluator.compress_and_tune(candidate, cfg)
        except Exception as err:  # e.g. diverged under this seed: stored, never retried
            record.setdefault("failed", {})[str(seed)] = f"{type(err).__name__}: {err}"[:300]
            study.set_user_attr(f"{REEVAL_PREFIX}{trial.number}", record)
            continue
        record["seeds"].append(seed)
        # the task metric, in the accuracy slot, of the model as deployed (int8: the file's)
        validation, test = evaluator.file_metrics(candidate, model, ("validation", "test"))
        record["accuracy"].append(validation)
        record["test_accuracy"].append(test)
        study.set_user_attr(f"{REEVAL_PREFIX}{trial.number}", record)
    return runs


def _summary(trial: optuna.trial.FrozenTrial, record: dict) -> str:
    single = float(trial.user_attrs[METRICS_ATTR]["accuracy"])
    values = [single, *record["accuracy"]]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    test = float(np.mean(record["test_accuracy"])) if record["test_accuracy"] else math.nan
    failed = record.get("failed", {})
    note = "".join(f"; seed {seed} failed ({why})" for seed, why in failed.items())
    return (f"re-evaluated trial {trial.number}: {single:.2f} -> {np.mean(values):.2f} ± "
            f"{std:.2f} ({len(values)} seeds), test {test:.2f}{note}")
