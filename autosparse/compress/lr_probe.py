"""The fine-tune learning rate, chosen once per search by a short probe on a few candidates.

A constant fine-tune lr that suits one model and compression level is far off for another
(``benchmarks/results/finetune_recipes.md``: 1e-2 adds 8.9 points of mean accuracy over 1e-3 on
the quickstart, yet loses 2 on its mildest candidate). The probe tries a short grid of rates on
a few compressed candidates the caller picks (spread over compression levels) and returns the
rate to fine-tune every candidate of the search with::

    full = resolve_steps(cfg)                      # one candidate's fine-tune length
    k = steps or ceil(PROBE_SHARE * full)          # the probe horizon (30 of 150)
    for lr in lrs:                                 # ascending
        for candidate in probe_candidates:
            student = compress_model(dense, candidate)
            session = FinetuneSession(student, dense, train loader, cfg | lr)  # full schedule
            session.run_until(k)                   # the first k steps of the real fine-tune
            metric = evaluate(student, validation, task)
            diverged (CandidateDiverged, non-finite metric): lr is excluded, its other
                candidates are skipped
    score(lr) = mean metric over the candidates (sign-flipped when the task minimizes)
    best = max score over the lrs not excluded
    chosen = the smallest lr whose score >= best - tolerance x |best|        (pick_lr)
    (every lr excluded: the config's own lr, flagged)

The tolerance is the correction toward stability: a larger lr learns faster, so it looks better
after k steps than it ends after the full fine-tune; within ``TOLERANCE`` (relative) of the
best, the smaller rate is taken. Measured (``benchmarks/results/lr_probe.md``, 3 probe and 6
other candidates, 3 seeds): on digits-mlp 3e-2 beats 1e-2 by 1-1.5 % after 30 steps and loses
by 1.3 points after 150; with 2 % the probe takes 1e-2 on every seed of both models (the best
fixed lr in hindsight), with 0 or 1 % it takes 3e-2 on 2-3 of the 3 mlp seeds (-1 to -1.3
points). The 2 % was chosen on that grid; an lr more than 2 % ahead after 30 steps stayed ahead
(digits-cnn: 1e-2 leads 3e-3 by 12 %, and wins after 150 by 1.7 points).

Deterministic for a seed: every session seeds the torch RNG from ``cfg.seed`` inside a forked
RNG, the loaders have private generators, masks and evaluation draw nothing, so the caller's
RNG is left as it was and two calls give the same table. The steps the sessions ran are
returned (``LRProbe.steps``) for the caller to charge to the search budget.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import Tensor, nn

from autosparse.compress.apply import compress_model, structural_keep, taylor_scores
from autosparse.compress.finetune import CandidateDiverged, FinetuneSession, resolve_steps
from autosparse.config.sections import FinetuneConfig
from autosparse.space.candidate import Candidate
from autosparse.space.graph import ChannelGraph
from autosparse.workload.evaluate import evaluate
from autosparse.workload.splits import DataSplits
from autosparse.workload.task import Task

__all__ = ["DEFAULT_LRS", "LRProbe", "PROBE_SHARE", "ProbeRun", "TOLERANCE", "pick_lr",
           "probe_learning_rate", "probe_steps"]

DEFAULT_LRS: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
PROBE_SHARE = 0.2  # the probe horizon as a share of one fine-tune (30 of 150 steps)
TOLERANCE = 0.02  # relative: within 2 % of the best mean, the smaller lr is chosen

OK, DIVERGED, SKIPPED = "ok", "diverged", "skipped"


@dataclass(frozen=True)
class ProbeRun:
    """One (lr, candidate) probe fine-tune: the validation metric and the last-10 mean loss
    after ``steps`` steps; NaN for both when it diverged or was skipped."""

    lr: float
    candidate: int  # index into probe_candidates
    metric: float
    loss: float
    steps: int  # steps the session ran (up to the divergence; 0 when skipped)
    status: str  # ok, diverged, skipped
    seconds: float


@dataclass(frozen=True)
class LRProbe:
    """What the probe ran and chose: ``chosen`` is the fine-tune lr for the search."""

    chosen: float
    best: float  # the lr with the best mean score, before the tolerance
    lrs: tuple[float, ...]
    runs: tuple[ProbeRun, ...]  # lr-major, candidates in the caller's order
    candidates: int
    steps_per_run: int  # the probe horizon
    steps: int  # fine-tune steps run in all: charge them to the search budget
    seconds: float  # wall time of the whole probe (compression, fine-tunes, evaluation)
    maximize: bool
    tolerance: float
    fallback: bool = False  # every lr excluded: chosen is the config's lr

    def mean(self, lr: float) -> float:
        """Mean validation metric of ``lr`` over the candidates; NaN when excluded."""
        return _mean([r.metric for r in self.runs if r.lr == lr])

    @property
    def excluded(self) -> tuple[float, ...]:
        """The lrs that diverged on some candidate, ascending."""
        return tuple(lr for lr in self.lrs if any(r.lr == lr and r.status != OK
                                                  for r in self.runs))

    def to_params(self) -> dict[str, str]:
        """Flat MLflow params: the grid, the horizon, the rule's tolerance, what was excluded."""
        return {
            "lr_probe.lrs": ",".join(f"{lr:g}" for lr in self.lrs),
            "lr_probe.candidates": str(self.candidates),
            "lr_probe.steps_per_run": str(self.steps_per_run),
            "lr_probe.tolerance": f"{self.tolerance:g}",
            "lr_probe.excluded": ",".join(f"{lr:g}" for lr in self.excluded) or "none",
            "lr_probe.chosen": f"{self.chosen:g}",
            "lr_probe.fallback": str(self.fallback).lower(),
        }

    def to_metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: the chosen lr, the cost, and each included lr's mean metric
        (``lr_probe.mean.0.001``; excluded lrs are left out, MLflow plots no NaN)."""
        metrics = {"lr_probe.chosen": self.chosen, "lr_probe.best": self.best,
                   "lr_probe.steps": float(self.steps), "lr_probe.seconds": self.seconds}
        for lr in self.lrs:
            mean = self.mean(lr)
            if math.isfinite(mean):
                metrics[f"lr_probe.mean.{lr:g}"] = mean
        return metrics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def probe_steps(full_steps: int, share: float = PROBE_SHARE) -> int:
    """The default probe horizon: ``ceil(share x full_steps)``, at least 1, at most the full
    fine-tune (a probe longer than the fine-tune it predicts would be a waste)."""
    return max(1, min(full_steps, math.ceil(share * full_steps)))


def pick_lr(scores: Mapping[float, float], tolerance: float = TOLERANCE) -> tuple[float, float]:
    """(chosen, best) from each lr's mean score (higher is better; NaN: excluded).

    ``best`` is the lr of the highest score (ties: the smaller lr); ``chosen`` the smallest lr
    whose score is within ``tolerance x |best score|`` of it: a short probe favours large rates
    (they learn faster early), so near-ties go to the steadier, smaller one.
    """
    valid = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    if not valid:
        raise ValueError("every learning rate was excluded")
    top = max(valid.values())
    best = min(lr for lr, s in valid.items() if s == top)
    floor = top - tolerance * abs(top)
    return min(lr for lr, s in valid.items() if s >= floor), best


def probe_learning_rate(
    dense: nn.Module,
    data: DataSplits,
    probe_candidates: Sequence[Candidate],
    finetune_cfg: FinetuneConfig,
    task: Task | None = None,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    steps: int | None = None,
    tolerance: float = TOLERANCE,
    graph: ChannelGraph | None = None,
    scores: Mapping[str, Tensor] | None = None,
) -> LRProbe:
    """Fine-tune each probe candidate for ``steps`` (default :func:`probe_steps`) at each of
    ``lrs``, validate, and choose the lr (see the module docstring for the rule).

    ``finetune_cfg`` is the search's recipe (distillation, batch size, schedule, seed); only
    its lr varies, and the schedule is laid over the full fine-tune length so the probe is the
    first ``steps`` of the real one. ``graph`` (channel groups) and ``scores`` (Taylor; computed
    here as the search does when a candidate needs them and none are given) build the students
    exactly as the search's evaluator does. ``dense`` is not modified.
    """
    if not probe_candidates:
        raise ValueError("the lr probe needs at least one candidate")
    grid = tuple(sorted({float(lr) for lr in lrs}))
    if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid):
        raise ValueError(f"learning rates must be positive and finite, got {tuple(lrs)}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    maximize = task is None or task.maximize
    full = resolve_steps(finetune_cfg, _length(data, finetune_cfg))
    horizon = probe_steps(full) if steps is None else steps
    if not 1 <= horizon <= full:
        raise ValueError(f"probe steps must be in 1..{full} (one fine-tune), got {horizon}")
    start = time.perf_counter()
    scores = _taylor_if_needed(dense, data, probe_candidates, finetune_cfg, task, scores)
    keeps = [structural_keep(dense, c, graph, scores)[:2] for c in probe_candidates]
    validation = data.loader("validation", data.batch_size)
    runs: list[ProbeRun] = []
    for lr in grid:
        cfg = finetune_cfg.model_copy(update={"lr": lr})
        failed = False
        for index, (candidate, keep) in enumerate(zip(probe_candidates, keeps)):
            if failed:  # excluded already: its other candidates would be steps spent for nothing
                runs.append(ProbeRun(lr, index, math.nan, math.nan, 0, SKIPPED, 0.0))
                continue
            run = _one_run(dense, data, candidate, keep, cfg, task, graph, scores, validation,
                           horizon, index)
            failed = run.status != OK
            runs.append(run)
    means = {lr: _mean([r.metric for r in runs if r.lr == lr]) for lr in grid}
    signed = {lr: (m if maximize else -m) for lr, m in means.items()}
    fallback = not any(math.isfinite(m) for m in signed.values())
    if fallback:
        chosen = best = finetune_cfg.lr
    else:
        chosen, best = pick_lr(signed, tolerance)
    return LRProbe(chosen=chosen, best=best, lrs=grid, runs=tuple(runs),
                   candidates=len(probe_candidates), steps_per_run=horizon,
                   steps=sum(r.steps for r in runs), seconds=time.perf_counter() - start,
                   maximize=maximize, tolerance=tolerance, fallback=fallback)


def _length(data: DataSplits, cfg: FinetuneConfig) -> int | None:
    """Batches per epoch of the train loader (only needed with ``finetune.epochs``)."""
    if cfg.epochs is None:
        return None
    try:
        return len(data.loader("train", cfg.batch_size))  # type: ignore[arg-type]
    except TypeError:
        return None


def _taylor_if_needed(dense: nn.Module, data: DataSplits, candidates: Sequence[Candidate],
                      cfg: FinetuneConfig, task: Task | None,
                      scores: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
    """The search evaluator's Taylor scores (same loader, batches and loss), when a candidate
    asks for them and the caller gave none."""
    if scores is not None or not any(choice.criterion == "taylor"
                                     for c in candidates for choice in c.values()):
        return scores
    names = list(dict.fromkeys(name for c in candidates for name in c))
    loader = data.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    own = None if task is None or task.is_default else task
    return taylor_scores(dense, loader, names, cfg.taylor_batches,
                         None if own is None else own.loss)


def _one_run(dense: nn.Module, data: DataSplits, candidate: Candidate,
             keep: tuple[Mapping[str, Tensor], Mapping[str, Tensor]], cfg: FinetuneConfig,
             task: Task | None, graph: ChannelGraph | None,
             scores: Mapping[str, Tensor] | None, validation, horizon: int,
             index: int) -> ProbeRun:
    """One probe fine-tune, built as the search's StagedRun builds a student."""
    start = time.perf_counter()
    student = compress_model(dense, candidate, scores, graph, keep=keep)
    loader = data.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    with FinetuneSession(student, dense, loader, cfg, task) as session:
        try:
            result = session.run_until(horizon)
        except CandidateDiverged:
            return ProbeRun(cfg.lr, index, math.nan, math.nan, session.step, DIVERGED,
                            time.perf_counter() - start)
    metric = evaluate(student, validation, task)
    status = OK if math.isfinite(metric) else DIVERGED
    return ProbeRun(cfg.lr, index, metric if status == OK else math.nan,
                    result.final_loss if status == OK else math.nan, result.steps, status,
                    time.perf_counter() - start)
