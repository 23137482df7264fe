"""The search config: one YAML file describes model, data, space, strategy, objectives and budget.

Validation happens here, once, with errors that name the field, the bad value and what is
allowed, so that nothing downstream has to re-check user input.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from autosparse.config.choices import CRITERIA, is_valid_bits, is_valid_pattern
from autosparse.config.hardware import builtin_profiles, load_profile
from autosparse.config.objectives import (
    CONSTRAINT_METRICS,
    HARDWARE_METRICS,
    OBJECTIVES,
)
from autosparse.config.validation import ConfigError, Strict, validate

STRATEGIES = ("ga", "bo", "knapsack", "random", "grid-uniform", "grid-global")
BUILTIN_MODELS = ("digits-cnn", "digits-mlp", "digits-resnet", "digits-resnet18",
                  "digits-mobilenet", "digits-vit", "digits-conv1d", "regression-mlp", "tiny-lm")
DATA_SOURCES = ("sklearn-digits", "npz", "torchvision", "image-folder", "sklearn-diabetes",
                "synthetic-tokens")
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"
_IMPORT_RE = re.compile(r"^[\w.]+:[\w.]+$")  # 'package.module:function'


class ModelConfig(Strict):
    """Either a built-in name, or ``factory: "pkg.module:function"`` plus kwargs and a checkpoint."""

    builtin: Literal["digits-cnn", "digits-mlp", "digits-resnet", "digits-resnet18",
                     "digits-mobilenet", "digits-vit", "digits-conv1d", "regression-mlp",
                     "tiny-lm"] | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    train_epochs: int = Field(30, ge=1, description="epochs to train a built-in model on first use")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.builtin is None) == (self.factory is None):
            raise ValueError(f"give exactly one of 'builtin' ({', '.join(BUILTIN_MODELS)}) "
                             "or 'factory'")
        if self.factory is not None and not _IMPORT_RE.match(self.factory):
            raise ValueError(
                f"factory {self.factory!r} must look like 'package.module:function'"
            )
        return self


class SplitConfig(Strict):
    """Train/validation/test of a source without a fixed split: three fractions (a stratified
    split), or three index ranges ``[start, end)`` into the one array (``train: [0, 7000]``),
    for data whose order matters (time series, a split made elsewhere)."""

    train: float | tuple[int, int] = 0.6
    validation: float | tuple[int, int] = 0.2
    test: float | tuple[int, int] = 0.2

    @model_validator(mode="after")
    def _fractions_or_ranges(self) -> "SplitConfig":
        values = {"train": self.train, "validation": self.validation, "test": self.test}
        ranges = {k: v for k, v in values.items() if isinstance(v, tuple)}
        if ranges and len(ranges) != 3:
            raise ValueError(f"give all three splits as fractions or all three as index ranges "
                             f"[start, end), got {values}")
        if ranges:
            for name, (start, end) in ranges.items():
                if not 0 <= start < end:
                    raise ValueError(f"{name}: index range [{start}, {end}) must have "
                                     "0 <= start < end")
            ordered = sorted(ranges.items(), key=lambda item: item[1])
            for (a, (_, end)), (b, (start, _)) in zip(ordered, ordered[1:]):
                if start < end:
                    raise ValueError(f"index ranges {a} {list(ranges[a])} and {b} "
                                     f"{list(ranges[b])} overlap")
            return self
        for name, value in values.items():
            if not 0 < value < 1:
                raise ValueError(f"{name}: fraction {value:g} must be between 0 and 1")
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must sum to 1, got {total:g}")
        return self

    def ranges(self) -> dict[str, tuple[int, int]] | None:
        """The index ranges per split, or None when the split is given as fractions."""
        if isinstance(self.train, tuple):
            return {"train": self.train, "validation": self.validation,  # type: ignore[dict-item]
                    "test": self.test}
        return None


class DataConfig(Strict):
    """Where the data comes from. Search scores on ``validation``; ``test`` is for final reports."""

    source: Literal["sklearn-digits", "npz", "torchvision", "image-folder", "sklearn-diabetes",
                    "synthetic-tokens"] = "sklearn-digits"
    path: str | None = Field(None, description="npz file, torchvision root, or image folder")
    name: str | None = Field(None, description="torchvision dataset class, e.g. MNIST")
    x_key: str = "x"
    y_key: str = "y"
    layout: Literal["NCHW", "NHWC", "NCL", "NLC", "flat"] = "NCHW"
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: list[int] | None = Field(None, description="[height, width] for image folders")
    grayscale: bool = False
    split: SplitConfig = Field(default_factory=SplitConfig)
    batch_size: int = Field(64, ge=1)
    split_seed: int = 0
    factory: str | None = Field(None, description="'pkg.module:make_loaders' returning (train, "
                                "validation, test) iterables of (x, y) batches, or a dict with "
                                "those keys; replaces 'source'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of "
                                   "the factory")

    @model_validator(mode="after")
    def _factory_alone(self) -> "DataConfig":
        if self.factory is None:
            if self.kwargs:
                raise ValueError("'kwargs' are the arguments of 'factory'; give 'factory' too")
            return self
        if not _IMPORT_RE.match(self.factory):
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        extra = sorted(self.model_fields_set - {"factory", "kwargs"})
        if extra:
            raise ValueError(f"'factory' brings its own loaders (batching, splits, "
                             f"normalisation); remove {', '.join(extra)}")
        return self

    @model_validator(mode="after")
    def _needs_path(self) -> "DataConfig":
        if self.source in ("npz", "torchvision", "image-folder") and not self.path:
            raise ValueError(f"source {self.source!r} needs 'path'")
        if self.source == "torchvision" and not self.name:
            raise ValueError("source 'torchvision' needs 'name' (e.g. MNIST, CIFAR10)")
        return self


class SparsityRange(Strict):
    low: float = Field(ge=0, lt=1)
    high: float = Field(ge=0, lt=1)
    step: float = Field(gt=0, lt=1)

    def values(self) -> list[float]:
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        count = int(round((self.high - self.low) / self.step)) + 1
        return [round(self.low + i * self.step, 6) for i in range(count)]


def _check_each(values: list | None, allowed: Callable[[Any], bool],
                message: Callable[[list], str]) -> None:
    """Reject an empty list, or name the values that are not allowed."""
    if values is not None:
        bad = [v for v in values if not allowed(v)]
        if bad or not values:
            raise ValueError(message(bad or values))


class ChoiceSet(Strict):
    """Allowed choices for the layers a rule matches. Unset fields inherit from ``space.default``."""

    sparsity: list[float] | SparsityRange | None = None
    patterns: list[str] | None = None
    bits: list[int] | None = None
    criterion: list[str] | None = None

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value):
        values = value.values() if isinstance(value, SparsityRange) else value
        _check_each(values, lambda v: 0 <= v < 1,
                    lambda shown: f"sparsity values {shown} must be in [0, 1) and non-empty")
        return value

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, value):
        _check_each(value, lambda p: is_valid_pattern(str(p)),
                    lambda shown: f"patterns {shown} not allowed; allowed: unstructured, channel, "
                                  "dense, or N:M with N < M (e.g. '2:4')")
        return value

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value):
        _check_each(value, is_valid_bits,
                    lambda shown: f"bits {shown} not allowed; allowed: 2 to 16, or 32 (float)")
        return value

    @field_validator("criterion")
    @classmethod
    def _check_criterion(cls, value):
        _check_each(value, lambda c: c in CRITERIA,
                    lambda shown: f"criterion {shown} not allowed; allowed: {', '.join(CRITERIA)}")
        return value

    def sparsity_values(self) -> list[float] | None:
        if isinstance(self.sparsity, SparsityRange):
            return self.sparsity.values()
        return None if self.sparsity is None else [float(v) for v in self.sparsity]


class LayerRule(ChoiceSet):
    """Choices for the layers whose names match ``layers`` (exact names or full-match regexes)."""

    layers: list[str]
    tie: bool = Field(False, description="all matched layers share one decision")
    name: str | None = Field(None, description="name of the tied group (defaults to rule index)")

    @field_validator("layers")
    @classmethod
    def _check_regex(cls, value):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"layer pattern {pattern!r} is not a valid regex: {err}") from None
        return value


DEFAULT_CHOICES = ChoiceSet(
    sparsity=[0.0, 0.25, 0.5, 0.75, 0.9],
    patterns=["unstructured", "channel", "2:4"],
    bits=[4, 8, 32],
    criterion=["magnitude"],
)


class SpaceConfig(Strict):
    """Which layers are searched and what each may become. First matching rule wins."""

    include: list[str] | None = Field(None, description="only these layers (names/regexes)")
    exclude: list[str] = Field(default_factory=list, description="kept dense fp32")
    default: ChoiceSet = DEFAULT_CHOICES
    rules: list[LayerRule] = Field(default_factory=list)


class StrategyConfig(Strict):
    name: Literal["ga", "bo", "knapsack", "random", "grid-uniform", "grid-global"] = "ga"
    population_size: int = Field(16, ge=4, description="GA: NSGA-II population (keep well under budget)")
    crossover_prob: float = Field(0.9, ge=0, le=1)
    mutation_prob: float | None = Field(None, ge=0, le=1, description="GA: per-gene; default 1/genes")
    bo_kind: Literal["tpe", "gp"] = "tpe"
    startup_trials: int = Field(10, ge=1, description="BO: random trials before modelling")
    warm_start: bool = Field(
        True, description="GA/BO: first evaluate budgeted allocations (with sensitivity) or "
        "uniform and global-magnitude allocations (without)"
    )
    screen: int = Field(8, ge=1, description="GA/BO: proposals per trial ranked by the predictor; "
                        "only the most promising is fine-tuned (1 = no screening)")
    use_sensitivity: bool = Field(True, description="GA/BO: measure per-layer sensitivity first "
                                  "and use it for seeds, screening and mutation (knapsack always does)")


class SensitivityConfig(Strict):
    """Per-layer sensitivity: each choice of each decision alone, every other layer dense."""

    method: Literal["zero-shot", "fisher"] = Field(
        "zero-shot", description="zero-shot: evaluate each choice on a validation subset; "
        "fisher: 0.5 * sum(F * dw^2) from one empirical-Fisher pass (no forward per choice)")
    samples: int = Field(512, ge=1, description="validation samples used (a fixed subset)")
    batch_size: int = Field(256, ge=1)


class FidelityConfig(Strict):
    """Multi-fidelity screening (with ``budget.finetune_steps``): a short fine-tune first, the
    full one only for candidates whose short result could still reach the front."""

    low_steps: int | None = Field(None, ge=0, description="steps of the short fine-tune; default "
                                  "a quarter of finetune.steps; 0 turns screening off")
    promote_rank: int = Field(0, ge=0, description="promote when the short result's non-dominated "
                              "rank among all short results is at most this (0 = first front)")
    tolerance: float = Field(0.5, ge=0, description="accuracy points added to a short result "
                             "before ranking it (short fine-tunes are noisy and pessimistic); "
                             "for another task metric, its units, in its better direction")


class BudgetConfig(Strict):
    trials: int | None = Field(40, ge=1, description="total trials in the study")
    minutes: float | None = Field(None, gt=0, description="wall time of this invocation")
    finetune_steps: int | None = Field(None, ge=1, description="total fine-tune steps of the "
                                       "search (all fidelities); an alternative to 'trials'")

    @model_validator(mode="after")
    def _some_budget(self) -> "BudgetConfig":
        if self.finetune_steps is not None and "trials" not in self.model_fields_set:
            # an alternative to the default trial count, not an addition to it
            object.__setattr__(self, "trials", None)
        if self.trials is None and self.minutes is None and self.finetune_steps is None:
            raise ValueError("give 'trials', 'minutes', 'finetune_steps' or a combination")
        return self


class FinetuneConfig(Strict):
    """Fast fine-tuning of each candidate with distillation from the dense model."""

    steps: int = Field(150, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    temperature: float = Field(4.0, gt=0)
    distill_weight: float = Field(0.7, ge=0, le=1, description="weight of the KD term vs. labels")
    taylor_batches: int = Field(4, ge=1, description="batches for gradient (Taylor) scores")
    seed: int = 0
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="learning rate over the fine-tune: constant, cosine decay to 0, "
        "or linear decay to 0; each after warmup_steps of linear warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    epochs: float | None = Field(None, gt=0, description="fine-tune length in passes over the "
                                 "train split instead of 'steps'")
    reeval_seeds: int = Field(2, ge=0, description="extra fine-tune seeds for the final front's "
                              "points; the front and export use the mean")
    amp: bool = Field(False, description="mixed precision for the fine-tune's forward and "
                      "backward: bfloat16 autocast (float16 with loss scaling on GPUs without "
                      "bfloat16); evaluation stays float32")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "FinetuneConfig":
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError("give 'steps' or 'epochs', not both")
        return self


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under runs/")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value):
        if value is None or "://" not in value:
            return value  # a local folder (MLflow's file store) or the default
        scheme = value.split("://", 1)[0].split("+", 1)[0]
        if scheme in ("http", "https", "file", "databricks"):
            return value
        check_database_url(value, "tracking.uri")
        return value
    experiment: str | None = Field(None, description="defaults to the search name")


class ExportConfig(Strict):
    """Defaults for ``autosparse export`` (its command-line flags win)."""

    registered_name: str | None = Field(None, description="MLflow Model Registry name; default "
                                        "<search name>-trial-<N>")
    finetune_steps: int | None = Field(None, ge=0, description="fine-tune this many steps before "
                                       "export instead of the search's own")


MEASURE = "measure"  # ``hardware: measure``: latency timed in onnxruntime, not predicted
MEASURE_PROFILE = "x86-server-vnni"  # the analytic model that plans and screens by default


class MeasureConfig(Strict):
    """``hardware: measure``: each candidate's compressed model timed on this machine
    (onnxruntime, 1 thread, batch 1) in interleaved rounds with the dense model."""

    rounds: int = Field(21, ge=1, description="interleaved rounds (median over rounds)")
    calls: int = Field(11, ge=1, description="individually timed calls per round (median)")
    warmup: int = Field(10, ge=0, description="untimed calls per session first")
    profile: str = Field(MEASURE_PROFILE, description="analytic profile (built-in name or YAML "
                         "path) that the sensitivity planner and screening predict with; "
                         "latency_ms itself is measured")

    @field_validator("profile")
    @classmethod
    def _check_profile(cls, value):
        load_profile(value)
        return value


TASK_KINDS = ("classification", "regression", "language-model")
# Built-in metrics of each task kind: name -> (direction, percent). ``topK`` is any top-k.
TASK_METRICS: dict[str, dict[str, tuple[str, bool]]] = {
    "classification": {"accuracy": ("maximize", True)},
    "regression": {"mse": ("minimize", False), "mae": ("minimize", False)},
    "language-model": {"perplexity": ("minimize", False)},
}
_TOPK_RE = re.compile(r"^top[1-9][0-9]*$")


class TaskConfig(Strict):
    """What the model is for: its loss, its quality metric and which way the metric is better
    (``autosparse.workload.task``). Default: classification, cross-entropy, top-1 accuracy."""

    kind: Literal["classification", "regression", "language-model"] = "classification"
    loss: str | None = Field(None, description="'package.module:function' (outputs, targets) -> "
                             "scalar tensor; default the kind's built-in loss")
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)
    metric: str | None = Field(None, description="a built-in metric of the kind (accuracy, topK, "
                               "mse, mae, perplexity) or 'package.module:function' (model, "
                               "loader) -> float")
    metric_kwargs: dict[str, Any] = Field(default_factory=dict)
    metric_name: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$",
                                    description="name shown for the metric (default: its own)")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="needed for a user metric; a built-in's is known")

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        for field in ("loss", "metric"):
            value = getattr(self, field)
            if value is not None and ":" in value and not _IMPORT_RE.match(value):
                raise ValueError(f"task.{field} {value!r} must look like 'package.module:function'")
        if self.loss is not None and ":" not in self.loss:
            raise ValueError(f"task.loss {self.loss!r} must be 'package.module:function' (the "
                             f"built-in loss of {self.kind!r} is used when it is not given)")
        metric = self.metric_spec()  # raises on an unknown built-in or a missing direction
        reserved = (set(CONSTRAINT_METRICS) | set(OBJECTIVES)) - {"accuracy"}
        if metric[0] == "accuracy" and (self.kind != "classification"
                                        or self.metric not in (None, "accuracy")):
            reserved.add("accuracy")  # top-1 accuracy's name: another metric must not take it
        if metric[0] in reserved or metric[0] == "metric_drop":
            raise ValueError(f"task.metric_name {metric[0]!r} is taken by another metric "
                             f"({', '.join(sorted(reserved))}); choose another")
        return self

    def metric_spec(self) -> tuple[str, str, bool]:
        """(shown name, direction, is a percentage 0..100) of the task's metric."""
        metric = self.metric or next(iter(TASK_METRICS[self.kind]))
        if ":" in metric:
            if self.direction is None:
                raise ValueError(f"task.metric {metric!r} is your own function: give "
                                 "task.direction (maximize or minimize)")
            default_name = metric.rsplit(":", 1)[1].rsplit(".", 1)[-1].lower()
            return self.metric_name or default_name, self.direction, False
        builtin = TASK_METRICS[self.kind].get(metric)
        if builtin is None and self.kind == "classification" and _TOPK_RE.match(metric):
            builtin = ("maximize", True)
        if builtin is None:
            allowed = ", ".join(TASK_METRICS[self.kind]) + (
                ", topK (e.g. top5)" if self.kind == "classification" else "")
            raise ValueError(f"task.metric {metric!r} is not a built-in metric of kind "
                             f"{self.kind!r} (allowed: {allowed}) nor 'package.module:function'")
        if self.direction is not None and self.direction != builtin[0]:
            raise ValueError(f"task.direction {self.direction!r} contradicts the built-in metric "
                             f"{metric!r}, which is {builtin[0]}d")
        return self.metric_name or metric, builtin[0], builtin[1]

    @property
    def is_default(self) -> bool:
        return self == TaskConfig()


QUALITY_METRICS = ("accuracy", "accuracy_drop")  # the task metric's slots (any task's name)
_CONSTRAINT_RE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(<=|>=)\s*(-?[0-9.]+(?:e-?\d+)?)\s*$")


class Constraint(Strict):
    metric: str
    op: Literal["<=", ">="]
    bound: float

    @model_validator(mode="after")
    def _possible(self) -> "Constraint":
        """Refuse bounds no model can meet (the search would spend its whole budget)."""
        # the task metric's own bounds (a percentage or not) are checked by SearchConfig
        if self.metric not in QUALITY_METRICS and self.op == "<=" and self.bound <= 0:
            raise ValueError(f"constraint '{self}' can never be met: {self.metric} is always "
                             "positive")
        return self

    def impossible_for(self, percent: bool, name: str = "accuracy") -> str | None:
        """Why a bound on the task metric (shown as ``name``) can never be met, else None."""
        if not percent:
            return None
        if self.metric == "accuracy" and ((self.op == ">=" and self.bound > 100)
                                          or (self.op == "<=" and self.bound < 0)):
            return f"{name} is a percentage from 0 to 100"
        if self.metric == "accuracy_drop" and ((self.op == "<=" and self.bound <= -100)
                                               or (self.op == ">=" and self.bound >= 100)):
            return f"{'accuracy_drop' if name == 'accuracy' else 'metric_drop'} is in points " \
                "and lies between -100 and 100"
        return None

    def violation(self, value: float) -> float:
        """Optuna's convention: feasible when <= 0."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


class HeartbeatConfig(Strict):
    """Optuna's heartbeat on database storages: a trial whose worker stopped beating (a machine
    that died or lost the network) is marked interrupted after ``grace`` seconds and re-run."""

    interval: int = Field(30, ge=1, description="seconds between a running trial's heartbeats")
    grace: int = Field(120, ge=2, description="seconds without a heartbeat before a trial is "
                       "taken as cut short and re-run; more than 'interval'")

    @model_validator(mode="after")
    def _grace_above_interval(self) -> "HeartbeatConfig":
        if self.grace <= self.interval:
            raise ValueError(f"grace ({self.grace}) must be more than interval ({self.interval}):"
                             " otherwise a live trial is taken for a dead one between two beats")
        return self


class SearchConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    objectives: list[str] = Field(default_factory=lambda: ["accuracy", "size"])
    constraints: list[Constraint] = Field(default_factory=list)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite under runs/")
    storage_heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    device: str = Field("auto", description="where dense training, fine-tunes, sensitivity and "
                        "evaluation run: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps; "
                        "export and latency measurement stay on the CPU")
    devices: list[int] | None = Field(None, description="GPU indices for the workers, one per "
                                      "worker in order (list one twice to share it); default "
                                      "all visible GPUs")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value):
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError(f"device {value!r} not allowed; allowed: {', '.join(DEVICE_NAMES)}")
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value):
        if value is not None and (not value or min(value) < 0):
            raise ValueError(f"devices {value} must be a non-empty list of GPU indices (0, 1, ...)")
        return value

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value):
        if value is not None:
            check_database_url(value, "storage")
        return value
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    hardware: str | None = Field(
        None, description="target device: a built-in profile name or a profile YAML path; "
        f"needed for latency and energy; '{MEASURE}' times latency on this machine instead")
    measure: MeasureConfig | None = Field(
        None, description="with 'hardware: measure': rounds, calls, warmup, planning profile")

    @field_validator("hardware")
    @classmethod
    def _check_hardware(cls, value):
        if value is not None and value != MEASURE:
            load_profile(value)  # a bad profile is a config error now, not mid-search
        return value

    @model_validator(mode="after")
    def _measure_settings(self) -> "SearchConfig":
        if self.hardware != MEASURE:
            if self.measure is not None:
                raise ValueError(f"'measure' settings need 'hardware: {MEASURE}' (hardware is "
                                 f"{self.hardware!r})")
            return self
        if self.measure is None:
            object.__setattr__(self, "measure", MeasureConfig())
        wanted = {OBJECTIVES[o].metric for o in self.objectives}
        wanted |= {c.metric for c in self.constraints}
        if "energy_uj" in wanted:
            raise ValueError(
                f"energy_uj (objective 'energy' or a constraint) with 'hardware: {MEASURE}': "
                "energy cannot be measured by timing a model (no power meter is read); set "
                "'hardware' to a profile to predict energy, or drop it")
        return self

    def cost_profile(self) -> str | None:
        """The profile the analytic cost model uses: ``hardware``, or with ``hardware:
        measure`` the planning profile ``measure.profile``."""
        if self.hardware == MEASURE:
            return (self.measure or MeasureConfig()).profile
        return self.hardware

    @model_validator(mode="after")
    def _hardware_when_needed(self) -> "SearchConfig":
        if self.hardware is None:
            wanted = [OBJECTIVES[o].metric for o in self.objectives]
            wanted += [c.metric for c in self.constraints]
            needing = sorted({m for m in wanted if m in HARDWARE_METRICS})
            if needing:
                raise ValueError(
                    f"{', '.join(needing)} {'needs' if len(needing) == 1 else 'need'} a target device: set 'hardware' to a built-in "
                    f"profile ({', '.join(builtin_profiles())}), a profile YAML path, or "
                    f"'{MEASURE}' (latency timed on this machine)")
        return self

    @field_validator("objectives", mode="before")
    @classmethod
    def _task_objective(cls, value, info: ValidationInfo):
        """The task metric may be named by the task's name (``mse``, ``perplexity``) or
        ``metric``; inside, its slot is called ``accuracy`` whatever the task."""
        if not isinstance(value, list):
            return value
        names = _quality_names(info.data.get("task"), "accuracy")
        _refuse_accuracy(info.data.get("task"), value)
        return ["accuracy" if o in names else o for o in value]

    @field_validator("objectives")
    @classmethod
    def _check_objectives(cls, value, info: ValidationInfo):
        task = info.data.get("task")
        shown = task.metric_spec()[0] if isinstance(task, TaskConfig) else "accuracy"
        bad = [o for o in value if o not in OBJECTIVES]
        if bad:
            raise ValueError(f"objectives {bad} not allowed; allowed: {', '.join(OBJECTIVES)}")
        if len(set(value)) != len(value) or len(value) < 2:
            raise ValueError(f"objectives {value} must be at least two distinct names")
        if "accuracy" not in value:
            raise ValueError(f"objectives must include {shown!r}"
                             + (" (the task metric; or 'metric')" if shown != "accuracy" else ""))
        return value

    @field_validator("constraints", mode="before")
    @classmethod
    def _parse_constraints(cls, value, info: ValidationInfo):
        quality = _quality_names(info.data.get("task"), "accuracy")
        drops = _quality_names(info.data.get("task"), "accuracy_drop")
        if isinstance(value, (str, dict)):  # iterating a string would judge it letter by letter
            raise ValueError(f"must be a list of constraints, e.g. ['accuracy_drop <= 1.0'], "
                             f"got a {type(value).__name__}: {value!r}")
        parsed = []
        for item in value or []:
            if isinstance(item, str):
                match = _CONSTRAINT_RE.match(item)
                if not match:
                    raise ValueError(
                        f"constraint {item!r} must look like 'metric <= number', "
                        f"e.g. 'accuracy_drop <= 1.0'"
                    )
                item = {"metric": match[1], "op": match[2], "bound": float(match[3])}
            if isinstance(item, dict):
                _refuse_accuracy(info.data.get("task"), [item.get("metric")])
            if isinstance(item, dict) and item.get("metric") in quality | drops:
                item = {**item, "metric": "accuracy" if item["metric"] in quality
                        else "accuracy_drop"}
            if isinstance(item, dict) and item.get("metric") not in CONSTRAINT_METRICS:
                raise ValueError(
                    f"constraint metric {item.get('metric')!r} not allowed; "
                    f"allowed: {', '.join(CONSTRAINT_METRICS)}"
                )
            parsed.append(item)
        return parsed

    @model_validator(mode="after")
    def _possible_for_task(self) -> "SearchConfig":
        name, _, percent = self.task.metric_spec()
        for constraint in self.constraints:
            why = constraint.impossible_for(percent, name)
            if why:
                raise ValueError(f"constraint '{self.shown(constraint)}' can never be met: {why}")
        return self

    def objective_directions(self) -> list[str]:
        """Optuna's directions: the task metric's own, the costs' minimize."""
        direction = self.task.metric_spec()[1]
        return [direction if name == "accuracy" else OBJECTIVES[name].direction
                for name in self.objectives]

    def shown(self, constraint: "Constraint") -> str:
        """A constraint as the user names it (``mse <= 30``, ``metric_drop <= 2``)."""
        name = self.task.metric_spec()[0]
        if name == "accuracy" or constraint.metric not in QUALITY_METRICS:
            return str(constraint)
        metric = name if constraint.metric == "accuracy" else "metric_drop"
        return f"{metric} {constraint.op} {constraint.bound:g}"


def _refuse_accuracy(task: Any, names: list) -> None:
    """``accuracy`` names top-1 accuracy only, ``accuracy_drop`` the drop of a classifier's."""
    shown = task.metric_spec()[0] if isinstance(task, TaskConfig) else "accuracy"
    kind = task.kind if isinstance(task, TaskConfig) else "classification"
    used = [n for n in names if n == "accuracy" or (n == "accuracy_drop"
                                                    and kind != "classification")]
    if shown != "accuracy" and used:
        raise ValueError(f"{used[0]!r} names the classification metric; this task's metric is "
                         f"{shown!r}: write {shown!r} (or 'metric'), and 'metric_drop' for its "
                         "drop")


def _quality_names(task: Any, slot: str) -> set[str]:
    """Names a config may use for the task metric's ``slot`` (``accuracy``/``accuracy_drop``)."""
    shown = task.metric_spec()[0] if isinstance(task, TaskConfig) else "accuracy"
    if slot == "accuracy":
        return {"accuracy", "metric", shown} if shown == "accuracy" else {"metric", shown}
    return {"accuracy_drop", "metric_drop"}


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def check_database_url(url: str, what: str) -> None:
    """An SQLAlchemy URL of a known database: ``sqlite//x.db`` (a missing colon) would
    otherwise create ``./sqlite/x.db`` silently; an unwritable SQLite folder fails later."""
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if not sep or base not in STORAGE_SCHEMES:
        raise ValueError(f"{url!r} is not a database URL; allowed: "
                         + ", ".join(f"{s}://..." for s in STORAGE_SCHEMES)
                         + " (e.g. sqlite:///runs/my.db)")
    if base == "sqlite" and rest.startswith("/"):
        folder = Path(rest[1:]).expanduser().parent if rest != "/" else Path(".")
        existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
        if not existing.is_dir():
            raise ValueError(f"{url!r}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK):
            raise ValueError(f"{url!r}: cannot write SQLite file there ({existing} is not "
                             "writable)")


def parse_config(data: Any, source: str = "<dict>") -> SearchConfig:
    return validate(SearchConfig, data, "config", source)


def load_config(path: str | os.PathLike) -> SearchConfig:
    """Read and validate a YAML config; relative paths inside it stay relative to the CWD."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; give the YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a UTF-8 text file (a YAML config is text)") \
            from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"config {path} is not valid YAML{at}: "
                          f"{getattr(err, 'problem', None) or err}") from None
    if data is None:
        raise ConfigError(f"config {path} is empty; see search_spaces/quickstart.yaml")
    return parse_config(data, str(path))
