"""The search config: one YAML file describes model, data, space, strategy, objectives and budget.

Validation happens here, once, with errors that name the field, the bad value and what is
allowed, so that nothing downstream has to re-check user input.

The sections live in ``sections`` (model, data, strategy, budget, fine-tune, ...),
``space_rules`` (the search space), ``task_metric`` (task and constraints) and ``runtime``
(storage, tracking, export, measured hardware); this module joins them into ``SearchConfig``,
checks the rules that span sections, and reads the YAML file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from autosparse.config.hardware import builtin_profiles, load_profile
from autosparse.config.objectives import (
    CONSTRAINT_METRICS,
    HARDWARE_METRICS,
    OBJECTIVES,
    ONESHOT_METRICS,
)
from autosparse.config.runtime import (
    DEPLOY_FILES,
    DEPLOY_TARGETS,
    MEASURE,
    ExportConfig,
    HeartbeatConfig,
    MeasureConfig,
    TrackingConfig,
    check_database_url,
)
from autosparse.config.sections import (
    NAME_MAX,
    RESERVED_NAMES,
    BudgetConfig,
    DataConfig,
    FidelityConfig,
    FinetuneConfig,
    ModelConfig,
    OneShotConfig,
    SensitivityConfig,
    StrategyConfig,
    check_run_name,
)
from autosparse.config.space_rules import SpaceConfig, check_oneshot_space, int8_space
from autosparse.config.task_metric import (
    _CONSTRAINT_RE,
    QUALITY_METRICS,
    Constraint,
    TaskConfig,
    _quality_names,
    _refuse_accuracy,
)
from autosparse.config.validation import ConfigError, Strict, validate
from autosparse.config.yaml_loader import read_yaml

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"


class SearchConfig(Strict):
    name: str = Field(description="the search's folder under the runs folder: 1 to "
                      f"{NAME_MAX} letters, digits, '_', '.', '-', not starting with '.' or '-', "
                      f"not one of {', '.join(RESERVED_NAMES)}")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_run_name(value)

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
    oneshot: OneShotConfig | None = Field(None, description="score candidates without a "
                                          "fine-tune, from a level database (language models)")
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
    deploy: str | None = Field(
        None, description="the file the model is deployed as, whose size (and measured "
        "latency) the search scores: packed (model.packed, the default), onnx "
        "(model.compact.onnx), onnx-int8 (model.int8.onnx); gguf with oneshot")

    @field_validator("deploy")
    @classmethod
    def _check_deploy(cls, value):
        if value is not None and value not in DEPLOY_TARGETS:
            raise ValueError(f"deploy {value!r} not allowed; allowed: {', '.join(DEPLOY_TARGETS)}")
        return value

    @model_validator(mode="after")
    def _deploy_target(self) -> "SearchConfig":
        """gguf is the one-shot file and the only one a one-shot search writes; onnx-int8
        narrows the space to what int8 weights can hold (``space_rules.int8_space``)."""
        if self.oneshot is not None:
            if self.deploy not in (None, "gguf"):
                raise ValueError(f"deploy {self.deploy!r}: a oneshot search exports "
                                 f"{DEPLOY_FILES['gguf']} for llama.cpp; use deploy 'gguf' or "
                                 "leave it out")
            object.__setattr__(self, "deploy", "gguf")
            return self
        if self.deploy == "gguf":
            raise ValueError("deploy 'gguf' is the oneshot language-model file (llama.cpp): add "
                             "a 'oneshot:' section, or deploy to packed, onnx or onnx-int8")
        if self.deploy is None:
            object.__setattr__(self, "deploy", "packed")
        if self.deploy == "onnx-int8":
            try:
                object.__setattr__(self, "space", int8_space(self.space))
            except ValueError as err:
                raise ValueError(str(err)) from None
        return self

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
        if self.oneshot is None and "prompt_tokens" in self.measure.model_fields_set:
            raise ValueError("measure.prompt_tokens is the prompt of a oneshot candidate's "
                             "llama.cpp timing; without 'oneshot' the ONNX model is timed: "
                             "remove it")
        wanted = {OBJECTIVES[o].metric for o in self.objectives}
        wanted |= {c.metric for c in self.constraints}
        if "energy_uj" in wanted:
            raise ValueError(
                f"energy_uj (objective 'energy' or a constraint) with 'hardware: {MEASURE}': "
                "energy cannot be measured by timing a model (no power meter is read); set "
                "'hardware' to a profile to predict energy, or drop it")
        return self

    @model_validator(mode="after")
    def _text_and_oneshot_rules(self) -> "SearchConfig":
        language = self.task.kind == "language-model"
        if self.data.source == "text" and not language:
            raise ValueError("data.source 'text' gives next-token windows: set task.kind "
                             "'language-model'")
        if self.strategy.switch_prob() > 0 and not self.strategy.breeds_on_planner():
            raise ValueError(f"strategy.level_switch {self.strategy.level_switch}: the level "
                             "switch is a GA mutation on the sensitivity planner's costs; use "
                             "strategy 'ga' with use_sensitivity (or 'hybrid'), or remove "
                             "level_switch")
        oneshot_only = sorted({OBJECTIVES[o].metric for o in self.objectives
                               if OBJECTIVES[o].metric in ONESHOT_METRICS}
                              | {c.metric for c in self.constraints if c.metric in ONESHOT_METRICS})
        if self.oneshot is None:
            if self.budget.tokens is not None:
                raise ValueError("budget.tokens counts the tokens oneshot scores: add a "
                                 "'oneshot:' section, or give budget.finetune_steps")
            if self.fidelity.low_windows is not None:
                raise ValueError("fidelity.low_windows screens oneshot candidates on a few "
                                 "windows: add a 'oneshot:' section, or use fidelity.low_steps")
            if oneshot_only:
                raise ValueError(f"{', '.join(oneshot_only)} (objectives 'bits', 'kl' or a "
                                 "constraint) are measured by oneshot's level database: add a "
                                 "'oneshot:' section, or use 'size' and the task metric")
            return self
        if not language:
            raise ValueError("oneshot scores next-token distributions: set task.kind "
                             f"'language-model' (got {self.task.kind!r})")
        check_oneshot_space(self.space)
        if "steps" in self.finetune.model_fields_set and self.finetune.steps:
            raise ValueError(f"finetune.steps {self.finetune.steps}: oneshot fine-tunes no "
                             "candidate; remove finetune.steps (or remove oneshot)")
        if self.budget.finetune_steps is not None:
            raise ValueError("budget.finetune_steps counts fine-tune steps; oneshot takes none: "
                             "give budget.tokens, budget.trials or budget.minutes")
        if self.fidelity.low_steps is not None:
            raise ValueError("fidelity.low_steps counts fine-tune steps; oneshot screens on "
                             "fewer windows: use fidelity.low_windows")
        wanted = {OBJECTIVES[o].metric for o in self.objectives} | {c.metric for c in self.constraints}
        if self.strategy.name in ("knapsack", "hybrid") and self.hardware == MEASURE \
                and "latency_ms" in wanted:
            raise ValueError(f"strategy {self.strategy.name!r} plans latency with an analytic "
                             "profile, but 'hardware: measure' with oneshot measures ms per "
                             "token in llama.cpp, another scale: use ga or bo for a measured "
                             "latency, or a profile")
        if self.strategy.level_switch is None and self.strategy.breeds_on_planner():
            object.__setattr__(self.strategy, "level_switch", 0.5)
        for constraint in self.constraints:
            if constraint.metric == "sparsity" and not (
                    (constraint.op == ">=" and 0 <= constraint.bound < 1)
                    or (constraint.op == "<=" and 0 < constraint.bound <= 1)):
                raise ValueError(f"constraint '{constraint}' can never be met or always is: "
                                 "sparsity is the pruned share of the searched weights, 0 to 1")
        # deterministic scoring: one score per candidate, nothing to re-run with other seeds
        object.__setattr__(self.finetune, "steps", 0)
        object.__setattr__(self.finetune, "reeval_seeds", 0)
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


def parse_config(data: Any, source: str = "<dict>") -> SearchConfig:
    return validate(SearchConfig, data, "config", source)


def load_config(path: str | os.PathLike) -> SearchConfig:
    """Read and validate a YAML config; relative paths inside it stay relative to the CWD."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; give the YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path, "config")  # no alias bombs, no duplicate keys
    if data is None:
        raise ConfigError(f"config {path} is empty; see search_spaces/quickstart.yaml")
    return parse_config(data, str(path))
