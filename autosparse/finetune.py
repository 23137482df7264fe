"""Fast fine-tuning of a compressed candidate with knowledge distillation from the dense model.

The student is a :func:`autosparse.compress.compress_model` copy: its trainable tensors are the
parametrizations' ``original`` weights, and every forward re-applies the fixed masks and the
fake quantization, so the zeros stay zero and the values stay on the quantization grid.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FinetuneConfig

__all__ = ["CandidateDiverged", "FinetuneResult", "distill_loss", "finetune"]

# A run has diverged when its loss is not finite, or when it blows up: one step's loss above
# EXPLODE_FACTOR x (first loss + 1), or the final (last-10 mean) loss above END_FACTOR x (first
# loss + 1). Adam with an absurd learning rate drives a ReLU net to huge but finite losses (then
# to dead units), so "not finite" alone misses it; the "+ 1" keeps a near-zero first loss (an
# almost lossless candidate) from making ordinary noise look like divergence.
EXPLODE_FACTOR = 1e6
END_FACTOR = 1e3


class CandidateDiverged(RuntimeError):
    """Fine-tuning produced a non-finite loss or non-finite weights."""

    def __init__(self, message: str, step: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.step = step
        self.loss = loss


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    final_loss: float  # mean loss of the last (up to) 10 steps; NaN when no step was taken
    seconds: float


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


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _cycle(loader: Iterable):
    """Batches of ``loader``, epoch after epoch (re-iterating it, so shuffling re-draws)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_loader yielded no batches")


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: FinetuneConfig,
) -> FinetuneResult:
    """``cfg.steps`` Adam steps on ``student``, distilling from ``teacher`` (:func:`distill_loss`).

    Cycles through ``train_loader`` as many epochs as needed. Seeded with ``cfg.seed`` inside a
    forked RNG, so the result is repeatable and the caller's random state is left alone.
    The teacher runs in eval mode under no_grad; the student ends in eval mode.
    Raises :class:`CandidateDiverged` on a non-finite or exploding loss (see ``EXPLODE_FACTOR``)
    and on non-finite weights after training.
    """
    start = time.perf_counter()
    if cfg.steps == 0:
        student.eval()
        return FinetuneResult(steps=0, final_loss=math.nan, seconds=time.perf_counter() - start)

    device = _device_of(student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("student has no trainable parameters")
    T, w = float(cfg.temperature), float(cfg.distill_weight)
    recent: deque[float] = deque(maxlen=10)
    teacher_was_training = teacher.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    step = 0
    first: float | None = None
    batches = _cycle(train_loader)
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(cfg.seed)
            optimizer = torch.optim.Adam(params, lr=cfg.lr)
            teacher.eval()
            student.train()
            while step < cfg.steps:
                x, y = next(batches)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                teacher_logits = None
                if w > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                loss = distill_loss(student(x), teacher_logits, y, T, w)
                value = loss.item()
                if first is None:
                    first = value
                if not math.isfinite(value) or value > EXPLODE_FACTOR * (abs(first) + 1.0):
                    raise CandidateDiverged(
                        f"fine-tuning diverged at step {step + 1}/{cfg.steps}: loss is {value:.6g}"
                        + ("" if step == 0 else f" (first step: {first:.6g})"),
                        step=step + 1,
                        loss=value,
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                recent.append(value)
            optimizer.zero_grad(set_to_none=True)
    finally:
        batches.close()  # release the loader's iterator (and its workers) mid-epoch
        student.eval()
        teacher.train(teacher_was_training)

    with torch.no_grad():
        for name, tensor in student.named_parameters():
            if not bool(torch.isfinite(tensor).all()):
                raise CandidateDiverged(
                    f"fine-tuning diverged: parameter {name!r} is not finite after {step} steps",
                    step=step,
                )
    final = sum(recent) / len(recent)
    if final > END_FACTOR * (abs(first) + 1.0):
        raise CandidateDiverged(
            f"fine-tuning diverged: mean loss of the last {len(recent)} steps is {final:.6g} "
            f"after {step} steps (first step: {first:.6g})",
            step=step,
            loss=final,
        )
    return FinetuneResult(steps=step, final_loss=final, seconds=time.perf_counter() - start)
