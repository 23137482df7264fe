"""The task a model is searched for: its training loss, its quality metric, and which way is better.

Every part of a search that trains or scores a model (dense training, each candidate's fine-tune,
validation, sensitivity, re-evaluation, export's check) asks the :class:`Task`, so a regression
model or a language model is searched exactly like a classifier. Internally the quality value
keeps its historic slot name ``accuracy`` (and its drop ``accuracy_drop``); :attr:`Task.name`
is what users see for it (``accuracy``, ``top5``, ``mse``, ``mae``, ``perplexity`` or their own).

Built-ins (``task.kind``):

- ``classification``: cross-entropy; ``accuracy`` (top-1, %) or ``topK`` (%); distillation is
  KL on temperature-softened logits. Unchanged, bit for bit, from before tasks existed.
- ``regression``: MSE; ``mse`` or ``mae`` (minimised); distillation is MSE to the teacher's
  outputs (``temperature`` is not used).
- ``language-model``: next-token cross-entropy over logits (B, T, V) (or an object with
  ``.logits``, as transformers models return); ``perplexity`` = exp(mean token cross-entropy)
  (minimised); distillation is KL per token.

``task.loss`` may be ``"pkg.module:fn"`` with ``fn(outputs, targets, **loss_kwargs) -> Tensor``
(a scalar mean), ``task.metric`` may be ``"pkg.module:fn"`` with ``fn(model, loader,
**metric_kwargs) -> float`` (the user's whole evaluation; the model comes in eval mode under
no_grad). Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autosparse.config.task_metric import TASK_METRICS, TaskConfig
from autosparse.workload.devices import device_of, eval_mode
from autosparse.workload.factory import (
    import_factory,  # the one resolver of user import paths
)

__all__ = ["Task", "build_task", "CLASSIFICATION", "model_outputs", "import_callable"]

LossFn = Callable[[Tensor, Tensor], Tensor]
# (summed statistic, count) of one batch; the metric is finish(sum of sums / sum of counts)
BatchStat = Callable[[Tensor, Tensor], tuple[float, int]]


def model_outputs(output: Any) -> Tensor:
    """The tensor a model's forward returned: itself, ``.logits`` (transformers' output
    objects), or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; expected a tensor, an object "
                    "with .logits, or a tuple whose first element is a tensor")


# ------------------------------------------------------------------ built-in losses and metrics


def _like(targets: Tensor, outputs: Tensor) -> Tensor:
    """Regression targets shaped and typed as the outputs ((B,) targets for (B, 1) outputs)."""
    targets = targets.to(device=outputs.device, dtype=outputs.dtype)
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    return targets


def _token_ce(outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy over every token: logits (B, T, V) against token ids (B, T)."""
    if outputs.dim() != 3:
        raise ValueError(f"language-model: the model must return logits of shape (batch, "
                         f"tokens, vocabulary), got shape {tuple(outputs.shape)}")
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(),
                           targets.reshape(-1).to(outputs.device), reduction=reduction)


def _kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher_T || student_T), mean over rows (samples, or tokens of an LM)."""
    t = temperature
    student = student.reshape(-1, student.shape[-1])
    teacher = teacher.reshape(-1, teacher.shape[-1])
    kd = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                  log_target=True, reduction="batchmean")
    return (t * t) * kd


def _distill_mse(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    return F.mse_loss(student, teacher)


def _topk_stat(k: int) -> BatchStat:
    def stat(outputs: Tensor, targets: Tensor) -> tuple[float, int]:
        targets = torch.as_tensor(targets, device=outputs.device)
        if k == 1:  # exactly the historic top-1 count
            return float(int((outputs.argmax(dim=1) == targets).sum())), int(targets.numel())
        top = outputs.topk(min(k, outputs.shape[1]), dim=1).indices
        return float(int((top == targets.unsqueeze(1)).any(dim=1).sum())), int(targets.numel())
    return stat


def _squared_stat(outputs: Tensor, targets: Tensor) -> tuple[float, int]:
    diff = outputs.float() - _like(targets, outputs).float()
    return float((diff * diff).sum()), int(diff.numel())


def _absolute_stat(outputs: Tensor, targets: Tensor) -> tuple[float, int]:
    diff = outputs.float() - _like(targets, outputs).float()
    return float(diff.abs().sum()), int(diff.numel())


def _token_stat(outputs: Tensor, targets: Tensor) -> tuple[float, int]:
    return float(_token_ce(outputs, targets, "sum")), int(targets.numel())


@dataclass(frozen=True)
class _Builtin:
    stat: BatchStat
    finish: Callable[[float], float]


def _percent(mean: float) -> float:
    return 100.0 * mean


def _builtin_metric(kind: str, name: str) -> _Builtin | None:
    if kind == "classification":
        if name == "accuracy":
            return _Builtin(_topk_stat(1), _percent)
        match = re.fullmatch(r"top([1-9][0-9]*)", name)
        if match:
            return _Builtin(_topk_stat(int(match[1])), _percent)
    if kind == "regression" and name in ("mse", "mae"):
        return _Builtin(_squared_stat if name == "mse" else _absolute_stat, float)
    if kind == "language-model" and name == "perplexity":
        return _Builtin(_token_stat, math.exp)
    return None


_LOSSES: dict[str, LossFn] = {
    "classification": F.cross_entropy,
    "regression": lambda outputs, targets: F.mse_loss(outputs, _like(targets, outputs)),
    "language-model": _token_ce,
}
_DISTILL = {"classification": _kl, "regression": _distill_mse, "language-model": _kl}


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    temperature: float,
    distill_weight: float,
) -> Tensor:
    """``w * T^2 * KL(teacher_T || student_T) + (1 - w) * CE(student, y)``.

    ``teacher_logits`` may be None when ``distill_weight == 0``.
    """
    loss = None
    if distill_weight > 0:
        t = temperature
        kd = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        loss = (distill_weight * t * t) * kd
    if distill_weight < 1:
        ce = (1.0 - distill_weight) * F.cross_entropy(student_logits, labels)
        loss = ce if loss is None else loss + ce
    return loss


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function; errors name the config field ``what``."""

    return import_factory(spec, what)


# ------------------------------------------------------------------------------------ the task


@dataclass(frozen=True)
class Task:
    """Loss, metric, name and direction of what the model is for (see the module docstring)."""

    kind: str = "classification"
    name: str = "accuracy"
    direction: str = "maximize"
    percent: bool = True
    loss_fn: LossFn | None = None  # None: the kind's built-in loss
    metric_fn: Callable[..., float] | None = None  # a user's fn(model, loader, **kwargs)
    metric_kwargs: dict[str, Any] = field(default_factory=dict)
    _builtin: _Builtin | None = None
    # the user's task.loss and loss_kwargs as text (None: the kind's built-in loss): a dense
    # model trained with another loss is another model (dense.cache_key)
    loss_spec: str | None = None

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def is_default(self) -> bool:
        """Plain classification with top-1 accuracy: everything behaves as before tasks."""
        return self.kind == "classification" and self.name == "accuracy" \
            and self.loss_fn is None and self.metric_fn is None

    # -- training
    def loss(self, outputs: Any, targets: Tensor) -> Tensor:
        """The training loss (a scalar mean) of a batch."""
        outputs = model_outputs(outputs)
        if self.loss_fn is not None:
            return self.loss_fn(outputs, targets)
        return _LOSSES[self.kind](outputs, targets)

    def finetune_loss(self, student: Any, teacher: Any | None, targets: Tensor,
                      temperature: float, distill_weight: float) -> Tensor:
        """``w * distill(student, teacher) + (1 - w) * loss(student, y)``; ``teacher`` may be
        None when ``w == 0``. Plain classification is :func:`distill_loss` exactly."""
        student = model_outputs(student)
        if self.kind == "classification" and self.loss_fn is None:
            teacher = None if teacher is None else model_outputs(teacher)
            return distill_loss(student, teacher, targets, temperature, distill_weight)
        loss = None
        if distill_weight > 0:
            kd = _DISTILL[self.kind](student, model_outputs(teacher), temperature)
            loss = distill_weight * kd
        if distill_weight < 1:
            own = (1.0 - distill_weight) * self.loss(student, targets)
            loss = own if loss is None else loss + own
        return loss

    def loss_sum(self, outputs: Any, targets: Tensor) -> tuple[float, int]:
        """(summed loss, items) of a batch, for a mean over many batches (sensitivity)."""
        outputs = model_outputs(outputs)
        if self.kind == "classification" and self.loss_fn is None:
            return (float(F.cross_entropy(outputs.float(), targets, reduction="sum")),
                    int(targets.numel()))
        if self.kind == "language-model" and self.loss_fn is None:
            return float(_token_ce(outputs, targets, "sum")), int(targets.numel())
        count = int(outputs.shape[0])
        return float(self.loss(outputs, targets)) * count, count

    # -- scoring
    def evaluate(self, model: nn.Module, loader: Iterable) -> float:
        """The metric of ``model`` over ``(x, y)`` batches; eval mode, no gradients."""
        with eval_mode(model), torch.no_grad():
            if self.metric_fn is not None:
                return float(self.metric_fn(model, loader, **self.metric_kwargs))
            return self.metric_of_batches(model, loader)

    def metric_of_batches(self, model: nn.Module, batches: Iterable) -> float:
        """The built-in metric accumulated over batches (the caller sets eval mode/no_grad)."""
        if self._builtin is None:
            raise ValueError(f"task metric {self.name!r} is the user's function: it scores a "
                             "whole loader, not batches")
        device = device_of(model)
        total, count = 0.0, 0
        for x, y in batches:
            outputs = model_outputs(model(x.to(device)))
            s, n = self._builtin.stat(outputs, y)
            total += s
            count += n
        if count == 0:
            raise ValueError("evaluate: the loader yielded no samples")
        return self._builtin.finish(total / count)

    def drop(self, dense: float, value: float) -> float:
        """How much worse ``value`` is than ``dense`` (positive = worse) in the metric's units:
        ``dense - value`` when maximised, ``value - dense`` when minimised."""
        return dense - value if self.maximize else value - dense

    def improved(self, value: float, by: float) -> float:
        """``value`` moved ``by`` units in the better direction."""
        return value + by if self.maximize else value - by


CLASSIFICATION = Task(_builtin=_builtin_metric("classification", "accuracy"))


def build_task(cfg: TaskConfig | None) -> Task:
    """The Task a config describes (built-ins resolved, user import paths imported)."""
    if cfg is None or cfg.is_default:
        return CLASSIFICATION
    kind = cfg.kind
    name, direction, percent = cfg.metric_spec()
    loss_fn = None
    if cfg.loss is not None:
        user_loss = import_callable(cfg.loss, "task.loss")
        kwargs = dict(cfg.loss_kwargs)
        loss_fn = (lambda outputs, targets: user_loss(outputs, targets, **kwargs)) \
            if kwargs else user_loss
    metric = cfg.metric or next(iter(TASK_METRICS[kind]))  # the kind's default, as metric_spec
    metric_fn = import_callable(metric, "task.metric") if ":" in metric else None
    builtin = None if metric_fn is not None else _builtin_metric(kind, metric)
    loss_spec = None if cfg.loss is None else json.dumps(
        {"loss": cfg.loss, "kwargs": cfg.loss_kwargs}, sort_keys=True, default=repr)
    return Task(kind=kind, name=name, direction=direction, percent=percent, loss_fn=loss_fn,
                metric_fn=metric_fn, metric_kwargs=dict(cfg.metric_kwargs), _builtin=builtin,
                loss_spec=loss_spec)
