"""The ``task`` section and constraints: what the model is for (its loss, its quality metric
and that metric's direction), and bounds such as ``accuracy_drop <= 1.0`` on the metrics.

Split out of ``schema``: the task metric decides which names objectives and constraints may use,
so the task, the constraint model and the helpers that map a task's metric names to the
``accuracy``/``accuracy_drop`` slots live together.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from autosparse.config.objectives import CONSTRAINT_METRICS, OBJECTIVES
from autosparse.config.sections import _IMPORT_RE
from autosparse.config.validation import Strict

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
