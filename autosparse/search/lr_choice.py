"""``finetune.lr: auto``: the fine-tune learning rate probed once per study and used by every
fine-tune of the search, its re-evaluations and its exports.

    open the study (its signature holds lr 'auto', so a fixed lr is another configuration)
    stored = study.user_attrs["autosparse.lr_probe"]
    if stored is None:                      # the first process of the study
        candidates = the space's nearest to uniform unstructured 60 % 4-bit, 85 % 8-bit,
                     93 % 4-bit (mild to hard; ``compress.lr_probe`` measured on these)
        probe = probe_learning_rate(dense, data, candidates, finetune, task, graph=graph)
        stored = {chosen, steps, seconds, params, metrics}   # kept in the study
    context.finetune_lr = stored["chosen"]         # context.finetune: the recipe that runs

Workers, resumes and ``autosparse export`` read the stored choice and never probe again, so a
trial is rebuilt with the lr it was scored with. The probe's fine-tune steps are charged to the
budget once (:func:`probe_charge`): ``budget.finetune_steps`` loses them, ``budget.trials`` loses
as many trials as that many steps make full fine-tunes (rounded up). A one-shot search fine-tunes
nothing: its lr stays nominal and nothing is probed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import optuna

from autosparse.compress.lr_probe import probe_learning_rate
from autosparse.config.schema import ConfigError
from autosparse.config.sections import AUTO_LR, NOMINAL_LR
from autosparse.space.candidate import UNSTRUCTURED, Candidate, LayerChoice

if TYPE_CHECKING:
    from autosparse.search.context import SearchContext

LR_ATTR = "autosparse.lr_probe"
PROBE_WISHES = ((0.6, 4), (0.85, 8), (0.93, 4))  # (sparsity, bits), uniform unstructured

Printer = Callable[[str], None]


def probe_candidates(context: "SearchContext") -> list[Candidate]:
    """The space's candidates nearest to the probe's wishes, without repeats."""
    out: dict[str, Candidate] = {}
    for sparsity, bits in PROBE_WISHES:
        wish = LayerChoice.make(UNSTRUCTURED, sparsity, bits)
        candidate = context.space.snap({name: wish for name in context.space.layer_names})
        out.setdefault(candidate.key, candidate)
    return list(out.values())


def resolve_finetune_lr(context: "SearchContext", study: optuna.Study,
                        printer: Printer = lambda line: None,
                        probe: bool = False) -> dict[str, Any] | None:
    """Set ``context.finetune_lr`` to the study's fine-tune lr when the config says ``auto``
    (probing first where the study has none and ``probe`` is set: the search does, the other
    commands only read it), so that
    ``context.finetune`` is the recipe every fine-tune runs; the config stays as written (its
    study signature says 'auto'). Returns the stored probe record, or None when the lr is
    fixed."""
    if context.config.finetune.lr != AUTO_LR:
        return None
    if context.oneshot is not None:  # no candidate is fine-tuned
        context.finetune_lr = NOMINAL_LR
        return None
    stored = study.user_attrs.get(LR_ATTR)
    if stored is None:
        if not probe:  # front, sensitivity: nothing is fine-tuned; export refuses (require_lr)
            return None
        candidates = probe_candidates(context)
        printer(f"finetune.lr auto: probing {len(candidates)} candidates ...")
        result = probe_learning_rate(context.dense, context.data, candidates,
                                     context.config.finetune, context.task,
                                     graph=context.graph)
        stored = {"chosen": result.chosen, "steps": result.steps, "seconds": result.seconds,
                  "params": result.to_params(), "metrics": result.to_metrics()}
        study.set_user_attr(LR_ATTR, stored)
        means = ", ".join(f"{lr:g}: {result.mean(lr):.4g}" for lr in result.lrs)
        printer(f"finetune.lr auto: {result.chosen:g} (mean validation {context.task.name} after "
                f"{result.steps_per_run} steps: {means}; {result.steps} steps, "
                f"{result.seconds:.1f} s)")
    context.finetune_lr = float(stored["chosen"])
    return stored


def require_lr(context: "SearchContext") -> None:
    """Refuse to fine-tune with an lr the study has not probed yet (export before search)."""
    if context.finetune.lr == AUTO_LR:
        raise ConfigError(f"the study {context.config.name!r} has no probed fine-tune lr "
                          "(finetune.lr: auto): run `autosparse search` first")


def probe_charge(stored: dict[str, Any] | None, full_steps: int) -> tuple[int, int]:
    """(trials, fine-tune steps) the probe costs the budget: its steps, and as many trials as
    full fine-tunes of ``full_steps`` they make (rounded up)."""
    if not stored:
        return 0, 0
    steps = int(stored["steps"])
    return math.ceil(steps / max(1, full_steps)), steps


__all__ = ["LR_ATTR", "PROBE_WISHES", "probe_candidates", "probe_charge", "require_lr",
           "resolve_finetune_lr"]
