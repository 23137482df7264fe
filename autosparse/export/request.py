"""What ``autosparse export`` is asked for and which trial it exports: the request, its outcome,
the study, the trial picked (by number, by rule or the front's knee), a re-evaluated trial's
figures, and the digest that tells whether a folder already holds this export.

Split out of ``exporter``: choosing the trial reads only the study, none of the export steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version as _installed_version
from pathlib import Path

import numpy as np
import optuna

from autosparse.config.objectives import first_cost
from autosparse.config.validation import ConfigError
from autosparse.export.folder import export_digest
from autosparse.search.context import SearchContext
from autosparse.search.front import trials_frame
from autosparse.search.lr_choice import resolve_finetune_lr
from autosparse.search.selection import Selection, by_number, by_rule, knee
from autosparse.search.study import make_storage
from autosparse.space.candidate import Candidate

# What a front point re-evaluated with extra seeds adds (front.trials_frame): "accuracy" is then
# the mean over its seeds, "accuracy_single" the trial's own score.
REEVALUATION = ("accuracy_seeds", "accuracy_std", "test_accuracy")


@dataclass(frozen=True)
class ExportRequest:
    trial: int | None = None
    max_drop: float | None = None
    minimize: str | None = None
    knee: bool = False
    finetune_steps: int | None = None
    out: Path | None = None
    registered_name: str | None = None
    mlflow: bool = True
    hardware: str | None = None
    timing_rounds: int = 21
    timing_calls: int = 21
    force: bool = False  # export again even when the folder already holds this export


@dataclass
class ExportOutcome:
    out_dir: Path
    report: dict
    warnings: list[str] = field(default_factory=list)
    reused: bool = False  # the folder already held this very export: nothing was redone


def _select(context: SearchContext, study: optuna.Study, request: ExportRequest) -> Selection:
    trials = trials_frame(study, context.config.objectives)
    if trials.empty:
        raise ConfigError(f"the study {context.config.name!r} has no finished trial yet")
    if request.trial is not None:
        return by_number(trials, request.trial)
    maximize = context.task.maximize  # a minimised metric (mse): better is lower
    cost = request.minimize or first_cost(context.config.objectives)
    if cost is None:
        raise ConfigError(f"the objectives {context.config.objectives} hold no cost to trade "
                          "against: pick with --trial N, or --max-drop D --minimize METRIC")
    if request.max_drop is not None:
        return by_rule(trials, request.max_drop, cost, maximize=maximize,
                       quality=context.task.name)
    return knee(trials, cost, maximize=maximize, quality=context.task.name)


def _reevaluation(context: SearchContext, study: optuna.Study, number: int) -> dict[str, float]:
    """The mean accuracy, spread and test accuracy of a re-evaluated trial; {} for the others."""
    trials = trials_frame(study, context.config.objectives)
    if "accuracy_single" not in trials.columns:
        return {}
    row = trials.set_index("trial").loc[number]
    if not np.isfinite(row.get("accuracy_std", np.nan)):
        return {}
    return {key: float(row[key])
            for key in ("accuracy", "accuracy_single", *REEVALUATION) if np.isfinite(row[key])}


def _load_study(context: SearchContext) -> optuna.Study:
    """The search's study; with ``finetune.lr: auto`` the context takes its probed lr, so the
    rebuild fine-tunes as the trial did."""
    try:
        study = optuna.load_study(study_name=context.config.name,
                                  storage=make_storage(context.storage_url))
    except KeyError:
        raise ConfigError(f"no study {context.config.name!r} in {context.storage_url}: run "
                          "`autosparse search` first") from None
    resolve_finetune_lr(context, study)
    return study


def _digest(context: SearchContext, study: optuna.Study, request: ExportRequest, number: int,
            candidate: Candidate) -> str:
    """What decides an export folder's content: the same digest means the same files."""
    from autosparse.search.study import study_uid

    config = context.config
    return export_digest({
        "version": _installed_version("autosparse"), "search": config.name, "study": study_uid(study),
        "trial": number, "candidate": candidate.to_json(),
        "finetune_steps": request.finetune_steps if request.finetune_steps is not None
        else config.export.finetune_steps,
        "model": config.model.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
        "finetune": config.finetune.model_dump(mode="json"),
        "hardware": request.hardware or config.hardware,
        "registered_name": request.registered_name or config.export.registered_name,
        # another task's metric and loss change what is checked (a classifier's digest as before)
        **({} if config.task.is_default else {"task": config.task.model_dump(mode="json")}),
    })
