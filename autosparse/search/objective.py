"""One trial: params -> candidate -> compressed, fine-tuned, scored -> objective values.

This is the one place where the search side (Optuna trials, the space) meets the model side
(compression, fine-tuning, footprint). Everything a trial produced is written to the trial
itself (user attrs and constraints), so the study stays the single source of truth.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import optuna
import torch

from autosparse.compress.apply import compress_model, structural_keep, taylor_scores
from autosparse.compress.finetune import (
    FinetuneSession,
    _batches_per_epoch,
    resolve_steps,
)
from autosparse.compress.footprint import StoredZeros, footprint_metrics
from autosparse.compress.oneshot.search_levels import OneShotScoring, f32_bytes
from autosparse.compress.storage import model_zeros
from autosparse.config.hardware import HardwareProfile
from autosparse.config.objectives import metric_of
from autosparse.config.sections import FinetuneConfig
from autosparse.config.task_metric import Constraint
from autosparse.cost.deploy_file import BuiltFile, DeployFileBuilder
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.gguf_latency import GGUFTimer
from autosparse.cost.latency_table import LatencyTable, table_latency
from autosparse.cost.measured_latency import CandidateTimer
from autosparse.search.fidelity import (
    FIDELITY_ATTR,
    LOW_ATTR,
    PROMOTION_ATTR,
    STEPS_ATTR,
    FidelityPlan,
    stored_low,
)
from autosparse.search.trial_attrs import CANDIDATE_ATTR, KEY_ATTR, METRICS_ATTR  # noqa: F401 (re-exported)
from autosparse.space.candidate import Candidate
from autosparse.space.graph import ChannelGraph
from autosparse.space.layers import LayerTable
from autosparse.workload.evaluate import evaluate
from autosparse.workload.splits import DataSplits
from autosparse.workload.task import Task

# Keys of what a trial stores about itself (read back by ``front``).
FAIL_ATTR = "fail_reason"
CACHED_ATTR = "cached"
WORKER_ATTR = "worker"
DEVICE_ATTR = "device"  # where the trial was fine-tuned and evaluated (cpu, cuda:1, ...)
THREADS_ATTR = "torch_threads"  # its torch intra-op threads: an exact CPU rebuild needs them
TIMING_METRICS = ("finetune_seconds", "eval_seconds", "latency_measure_seconds",
                  "deploy_build_seconds")
INTERRUPTED = "interrupted"  # prefix of the fail reason of a trial cut short: it uses no budget


class CandidateSource(Protocol):
    """What the objective asks of a space: one candidate per trial (SearchSpace, GridSpace)."""

    def suggest(self, trial: optuna.Trial) -> Candidate: ...


def worker_id() -> str:
    """host:pid, so a restarted search can tell its own dead trials from other workers' live ones."""
    return f"{socket.gethostname()}:{os.getpid()}"


# Written first on every trial and cleared when it ends: a trial that Optuna's heartbeat fails
# from outside (its worker's machine died) cannot be given a reason any more, so it carries one.
CUT_SHORT_REASON = f"{INTERRUPTED}: its worker stopped mid-trial (no heartbeat)"


def start_trial(trial: optuna.Trial) -> None:
    """Tag a new trial: 'cut short' until it ends (see CUT_SHORT_REASON), and host:pid."""
    trial.set_user_attr(FAIL_ATTR, CUT_SHORT_REASON)
    trial.set_user_attr(WORKER_ATTR, worker_id())


@dataclass
class CandidateEvaluator:
    """Scores candidates: compress a copy of the dense model, fine-tune with distillation, validate.

    Cost metrics come from the footprint and, with a hardware profile, the cost model (both pure,
    no forward pass). Identical candidates are scored
    once per process; the objective also reuses results stored by other processes.
    """

    dense: torch.nn.Module
    data: DataSplits
    table: LayerTable
    finetune_cfg: FinetuneConfig
    dense_accuracy: float
    profile: HardwareProfile | None = None
    graph: ChannelGraph | None = None
    latency_table: LatencyTable | None = None  # measured deltas of this model on this machine
    timer: CandidateTimer | GGUFTimer | None = None  # hardware: measure: latency_ms timed
    task: Task | None = None  # loss and metric (None: classification, top-1 accuracy)
    oneshot: OneShotScoring | None = None  # candidates stitched from the level database
    deploy: DeployFileBuilder | None = None  # deploy onnx / onnx-int8: that file is scored
    _taylor: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def _scores(self, candidate: Candidate) -> dict[str, torch.Tensor] | None:
        if not any(choice.criterion == "taylor" for choice in candidate.values()):
            return None
        if self._taylor is None:  # the dense model's gradients never change: compute once
            loader = self.data.loader("train", self.finetune_cfg.batch_size, shuffle=True,
                                      seed=self.finetune_cfg.seed)
            task = None if self.task is None or self.task.is_default else self.task
            self._taylor = taylor_scores(self.dense, loader, self.table.names,
                                         self.finetune_cfg.taylor_batches,
                                         None if task is None else task.loss)
        return self._taylor

    def compress_and_tune(self, candidate: Candidate,
                          cfg: FinetuneConfig | None = None) -> tuple[torch.nn.Module, float]:
        """The candidate's compressed, fine-tuned model (parametrized) and its final loss.

        Deterministic for a given config, so export rebuilds exactly the model a trial scored.
        """
        with self.staged(candidate, cfg) as run:
            result = run.session.run_until()
        return run.student, result.final_loss

    def drop(self, metric: float) -> float:
        """How much worse than the dense model ``metric`` is (points of accuracy; the task's own
        measure, e.g. relative for mse), the value of ``accuracy_drop``."""
        if self.task is None:
            return self.dense_accuracy - metric
        return self.task.drop(self.dense_accuracy, metric)

    def finetune_steps(self, cfg: FinetuneConfig | None = None) -> int:
        """Steps one fine-tune takes under ``cfg``: ``steps``, or ``epochs`` of the train split.
        With oneshot, the work of one full score instead: the tokens it scores."""
        if self.oneshot is not None:
            return self.oneshot_tokens(*self.oneshot_windows(None))
        cfg = cfg or self.finetune_cfg
        return resolve_steps(cfg, _batches_per_epoch(self.data.loader("train", cfg.batch_size)))

    def oneshot_windows(self, share: float | None) -> tuple[int, int]:
        """(validation, calibration) windows a one-shot score reads: all of them, or the first
        ``share`` of each (at least one) for a short score."""
        assert self.oneshot is not None
        validation = self.data.samples("validation")
        calibration = self.oneshot.reference.n_windows
        if share is None or share >= 1:
            return validation, calibration
        return (max(1, min(validation, round(share * validation))),
                max(1, min(calibration, round(share * calibration))))

    def oneshot_tokens(self, validation: int, calibration: int) -> int:
        """Tokens scored over that many windows (each predicts its length - 1 tokens)."""
        assert self.oneshot is not None
        return (validation + calibration) * self.oneshot.reference.tokens_per_window

    def oneshot_low_tokens(self, low_windows: int | None) -> int:
        """The short score's tokens: ``low_windows`` validation windows (default a quarter)
        and the same share of calibration windows; 0 turns screening off."""
        validation = self.data.samples("validation")
        if low_windows == 0:
            return 0
        share = (low_windows if low_windows is not None else max(1, validation // 4)) / validation
        return self.oneshot_tokens(*self.oneshot_windows(share))

    def file_metrics(self, candidate: Candidate, student: torch.nn.Module,
                     splits: tuple[str, ...]) -> list[float]:
        """The task metric on each split, of the model as deployed: the deploy target's file
        where it computes otherwise than the student (int8), else the student itself."""
        def metric(model: torch.nn.Module, split: str) -> float:
            return evaluate(model, self.data.loader(split, self.data.batch_size), self.task)

        if self.deploy is None or not self.deploy.scores_metric:
            return [metric(student, split) for split in splits]
        with self.deploy.build(candidate, student, self._scores(candidate)) as built:
            deployed = built.module()
            return [metric(deployed, split) for split in splits]

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        with self.staged(candidate) as run:
            return run.score()

    def staged(self, candidate: Candidate, cfg: FinetuneConfig | None = None) -> "StagedRun":
        """A fine-tune of the candidate that can be scored part-way and continued (fidelities)."""
        return StagedRun(self, candidate, cfg or self.finetune_cfg)


class StagedRun:
    """One candidate's compressed student and its fine-tune session, scored after each stage.

    ``score(40)`` then ``score()`` trains 40 steps, validates, then continues the same fine-tune
    to its full length: the result equals one uninterrupted fine-tune (FinetuneSession).
    """

    def __init__(self, evaluator: CandidateEvaluator, candidate: Candidate, cfg: FinetuneConfig):
        self.evaluator, self.candidate = evaluator, candidate
        self._seconds = 0.0
        self._measure_seconds = 0.0  # timing this candidate (a short and a full score: once)
        if evaluator.oneshot is not None:  # no compression work: the levels are stored
            self.student = evaluator.oneshot.model(evaluator.dense, candidate)
            self.session = FinetuneSession(self.student, evaluator.dense, [], cfg, evaluator.task)
            return
        scores = evaluator._scores(candidate)
        # which rows/columns the stored layers keep: the masks, and where the size objective
        # reads the student
        self._rows, self._cols, _ = structural_keep(evaluator.dense, candidate, evaluator.graph,
                                                    scores)
        self.student = compress_model(evaluator.dense, candidate, scores, evaluator.graph,
                                      keep=(self._rows, self._cols))
        loader = evaluator.data.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
        self.session = FinetuneSession(self.student, evaluator.dense, loader, cfg,
                                       evaluator.task)

    def __enter__(self) -> "StagedRun":
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def score(self, steps: int | None = None) -> dict[str, float]:
        """Fine-tune up to ``steps`` (default: the full length), then validate. One-shot: no
        fine-tune; ``steps`` is the tokens to score (a short score reads the first windows)."""
        ev = self.evaluator
        if ev.oneshot is not None:
            return self._oneshot_score(steps)
        start = time.perf_counter()
        result = self.session.run_until(steps)
        tuned = time.perf_counter()
        accuracy = evaluate(self.student, ev.data.loader("validation", ev.data.batch_size),
                            ev.task)  # the task metric, in the slot named accuracy
        self._seconds += tuned - start
        zeros = model_zeros(self.student, ev.table, self.candidate, self._rows, self._cols)
        metrics = {
            "accuracy": accuracy,
            "accuracy_drop": ev.drop(accuracy),
            **cost_metrics(ev.table, self.candidate, ev.profile, zeros,
                           latency_table=ev.latency_table),
            "finetune_loss": result.final_loss,
            "finetune_steps": float(result.steps),
            "finetune_seconds": self._seconds,
            "eval_seconds": time.perf_counter() - tuned,
        }
        if ev.deploy is not None:  # the deploy target's file: its size, metric and latency
            self._deployed(metrics)
        elif ev.timer is not None:  # measured on the tuned student; the prediction beside
            self._measured(metrics)
        return metrics

    def _measured(self, metrics: dict[str, float], built: BuiltFile | None = None) -> None:
        ev = self.evaluator
        assert isinstance(ev.timer, CandidateTimer)
        measured = ev.timer.measure(self.candidate, self.student, ev._scores(self.candidate),
                                    None if built is None else (built.timed_format, built.path))
        self._measure_seconds += measured.seconds
        metrics["latency_ms_predicted"] = metrics.get("latency_ms", math.nan)
        metrics.update(measured.metrics(), latency_measure_seconds=self._measure_seconds)

    def _deployed(self, metrics: dict[str, float]) -> None:
        """Score the deploy file instead of the formula (``cost.deploy_file``): ``size_kb`` is
        its bytes (the formula's stays as ``size_kb_packed``); int8's metric is the file's."""
        ev = self.evaluator
        assert ev.deploy is not None
        with ev.deploy.build(self.candidate, self.student, ev._scores(self.candidate)) as built:
            metrics.update(size_kb_packed=metrics["size_kb"], size_kb=built.bytes / 1000,
                           compression_packed=metrics["compression"],
                           compression=ev.deploy.dense_bytes / built.bytes,
                           deploy_build_seconds=built.seconds)
            if ev.deploy.scores_metric:
                accuracy = evaluate(built.module(), ev.data.loader(
                    "validation", ev.data.batch_size), ev.task)
                metrics.update(accuracy_pytorch=metrics["accuracy"], accuracy=accuracy,
                               accuracy_drop=ev.drop(accuracy))
            if ev.timer is not None:
                self._measured(metrics, built)


    def _oneshot_score(self, tokens: int | None) -> dict[str, float]:
        """The task metric on the first validation windows and the KL on the same share of
        calibration windows: all of them unless ``tokens`` asks for less (screening)."""
        ev = self.evaluator
        full = ev.finetune_steps()
        validation, calibration = ev.oneshot_windows(None if tokens is None else tokens / full)
        x, y = ev.data.split("validation").tensors
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x[:validation], y[:validation]),
            batch_size=ev.data.batch_size)
        start = time.perf_counter()
        with ev.oneshot.running(self.student):  # offload: block by block on the device
            accuracy = evaluate(self.student, loader, ev.task)  # the task metric's slot
            metrics = self._oneshot_metrics(accuracy, start, calibration)
        metrics["tokens_scored"] = float(ev.oneshot_tokens(validation, calibration))
        return metrics

    def _oneshot_metrics(self, accuracy: float, tuned: float,
                         calibration: int | None = None) -> dict[str, float]:
        """A one-shot candidate: its task metric on validation, its KL to the dense model on
        the calibration windows, and its size as GGUF stores it (``search_levels``); with
        ``hardware: measure``, its GGUF's ms per generated token in llama.cpp (``gguf_latency``,
        cached by candidate key), the profile's prediction kept as ``latency_ms_predicted``."""
        ev = self.evaluator
        assert ev.oneshot is not None
        dense_bytes = f32_bytes(ev.dense)
        metrics = {
            **cost_metrics(ev.table, self.candidate, ev.profile, latency_table=ev.latency_table),
            "accuracy": accuracy,
            "accuracy_drop": ev.drop(accuracy),
            **ev.oneshot.metrics(self.student, dense_bytes, self.candidate, calibration),
            "finetune_loss": math.nan, "finetune_steps": 0.0, "finetune_seconds": 0.0,
            "eval_seconds": time.perf_counter() - tuned,
        }
        if isinstance(ev.timer, GGUFTimer):  # hardware: measure: its GGUF timed in llama.cpp
            measured = ev.timer.measure(self.candidate.key, ev.oneshot.assignment(self.candidate))
            self._measure_seconds += measured.seconds
            metrics["latency_ms_predicted"] = metrics.get("latency_ms", math.nan)
            metrics.update(measured.metrics(), latency_measure_seconds=self._measure_seconds)
        return metrics


def cost_metrics(table: LayerTable, candidate: Candidate, profile: HardwareProfile | None,
                 zeros: Mapping[str, StoredZeros] | None = None,
                 latency_table: LatencyTable | None = None) -> dict[str, float]:
    """Footprint metrics, plus predicted latency/energy in total and per layer with a profile.

    ``zeros`` (measured on the fine-tuned model) make ``size_kb`` what the packed file stores:
    quantizer zeros free, the cheapest index; without them the pattern's prediction.

    With a ``latency_table`` (measured by ``calibrate --config``), ``latency_ms`` and the
    per-layer latencies come from it where it has entries and from the profile elsewhere;
    ``latency_source.table`` / ``latency_source.analytic`` count the layers of each source.
    Energy stays the profile's.

    Per-layer figures are named ``layer_latency_us.<layer>`` / ``layer_energy_uj.<layer>`` so
    they land in the trial's metrics, in trials.csv and in the trial's MLflow run.
    """
    metrics = footprint_metrics(table, candidate, zeros)
    if profile is not None:
        cost = estimate_cost(table, candidate, profile)
        metrics.update(cost.metrics())
        for layer in cost.layers:
            metrics[f"layer_latency_us.{layer.name}"] = layer.latency_s * 1e6
            metrics[f"layer_energy_uj.{layer.name}"] = layer.energy_j * 1e6
        if latency_table is not None:
            measured = table_latency(latency_table, table, candidate, profile)
            metrics["latency_ms"] = measured.total_ms
            for name, value in measured.layer_us.items():
                metrics[f"layer_latency_us.{name}"] = value
            for source, count in measured.counts().items():
                metrics[f"latency_source.{source}"] = float(count)
    return metrics


def _stored_metrics(study: optuna.Study, key: str) -> dict[str, float] | None:
    """Metrics of a finished trial with the same candidate, from any process or earlier run."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if trial.user_attrs.get(KEY_ATTR) == key and METRICS_ATTR in trial.user_attrs:
            return dict(trial.user_attrs[METRICS_ATTR])
    return None


@dataclass
class SearchObjective:
    """The callable handed to ``study.optimize``."""

    space: CandidateSource
    evaluator: CandidateEvaluator
    objectives: list[str]
    constraints: list[Constraint]
    fidelity: FidelityPlan | None = None
    _cache: dict[str, dict[str, float]] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        start_trial(trial)
        trial.set_user_attr(DEVICE_ATTR, str(next(self.evaluator.dense.parameters()).device))
        trial.set_user_attr(THREADS_ATTR, torch.get_num_threads())
        try:
            candidate = self.space.suggest(trial)
            trial.set_user_attr(CANDIDATE_ATTR, candidate.to_json())
            trial.set_user_attr(KEY_ATTR, candidate.key)
            metrics = self._cache.get(candidate.key) or _stored_metrics(trial.study, candidate.key)
            trial.set_user_attr(CACHED_ATTR, metrics is not None)
            if metrics is None:
                metrics = self._train(trial, candidate)
            else:  # a repeat costs no training: don't report the original's time again
                metrics = {**metrics, **{key: 0.0 for key in TIMING_METRICS}}
                trial.set_user_attr(STEPS_ATTR, 0)
            trial.set_user_attr(FIDELITY_ATTR, "full")
            self._check_finite(metrics)
        except KeyboardInterrupt:
            trial.set_user_attr(FAIL_ATTR, f"{INTERRUPTED}: Ctrl-C")
            raise
        except optuna.TrialPruned:  # screened out after the short fine-tune: not a failure
            trial.set_user_attr(FAIL_ATTR, "")
            raise
        except Exception as err:  # recorded on the trial; the search goes on (optimize catches)
            trial.set_user_attr(FAIL_ATTR, f"{type(err).__name__}: {err}"[:500])
            raise
        self._cache[candidate.key] = metrics
        trial.set_user_attr(METRICS_ATTR, metrics)
        for constraint in self.constraints:
            trial.set_constraint(str(constraint), constraint.violation(metrics[constraint.metric]))
        trial.set_user_attr(FAIL_ATTR, "")  # it finished: not cut short after all
        return tuple(metrics[metric_of(name)] for name in self.objectives)

    def _train(self, trial: optuna.Trial, candidate: Candidate) -> dict[str, float]:
        """Fine-tune and score; with a fidelity plan, a short fine-tune decides first whether the
        full one is worth its steps (otherwise the trial ends PRUNED with its short result).

        The steps about to be spent are recorded before they are spent, so the budget counts a
        trial that diverges or is running in another worker.
        """
        plan = self.fidelity
        oneshot = self.evaluator.oneshot is not None
        short = 0  # one-shot: the short score's tokens, which the full score does not continue
        with self.evaluator.staged(candidate) as run:
            if plan is not None:
                low = stored_low(trial.study, candidate.key, KEY_ATTR)
                trial.set_user_attr(STEPS_ATTR, 0 if low is not None else plan.low_steps)
                if low is None:
                    low = run.score(plan.low_steps)
                    short = plan.low_steps if oneshot else 0
                self._check_finite(low)
                trial.set_user_attr(LOW_ATTR, low)
                promoted, why = plan.promote(trial.study, trial.number, low)
                trial.set_user_attr(PROMOTION_ATTR, why)
                if not promoted:
                    trial.set_user_attr(FIDELITY_ATTR, "low")
                    raise optuna.TrialPruned(why)
            trial.set_user_attr(STEPS_ATTR, short + (self.evaluator.finetune_steps() if oneshot
                                                     else run.session.total_steps))
            metrics = run.score()
        spent = metrics["tokens_scored"] if oneshot else metrics["finetune_steps"]
        trial.set_user_attr(STEPS_ATTR, short + int(spent))
        return metrics

    def _check_finite(self, metrics: Mapping[str, Any]) -> None:
        for name in self.objectives:
            value = metrics[metric_of(name)]
            if not math.isfinite(value):
                raise ValueError(f"objective {name} is {value}")
