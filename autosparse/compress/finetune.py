"""Fast fine-tuning of a compressed candidate with knowledge distillation from the dense model.

The student is a :func:`autosparse.compress.apply.compress_model` copy: its trainable tensors are the
parametrizations' ``original`` weights, and every forward re-applies the fixed masks and the
fake quantization, so the zeros stay zero and the values stay on the quantization grid.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from autosparse.config.sections import FinetuneConfig
from autosparse.workload.devices import amp_mode, device_of
from autosparse.workload.task import Task, distill_loss

__all__ = [
    "CandidateDiverged", "FinetuneResult", "FinetuneSession", "distill_loss", "finetune",
    "learning_rate", "lr_multiplier", "resolve_steps",
]

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
    steps: int  # steps the student has been trained so far (all run_until calls of a session)
    final_loss: float  # mean loss of the last (up to) 10 steps; NaN when no step was taken
    seconds: float  # time spent training so far (all run_until calls of a session)


def lr_multiplier(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """The factor on ``lr`` for 0-based ``step`` of a ``total_steps`` fine-tune.

    Warm-up: step s < warmup_steps gets (s + 1) / warmup_steps, so the first step already
    moves (a step at lr 0 is a wasted step) and the last warm-up step is at the full lr. After
    it, over the d = total_steps - warmup_steps remaining steps, with p = (s - warmup) / d:
    constant 1; cosine (1 + cos(pi * p)) / 2; linear 1 - p. Both decays reach 0 at
    ``total_steps``, just after the last step (a last step at lr 0 would be wasted too). With
    warmup_steps >= total_steps the whole fine-tune is warm-up.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside a fine-tune of {total_steps} steps "
                         f"(0-based: 0..{total_steps - 1})")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"schedule {schedule!r} is not one of constant, cosine, linear")


def learning_rate(step: int, total_steps: int, cfg: FinetuneConfig) -> float:
    """The learning rate of 0-based ``step`` under ``cfg`` (see :func:`lr_multiplier`).

    Exactly ``cfg.lr`` (not ``cfg.lr * 1.0`` by another route) where the factor is 1, so the
    default recipe (constant, no warm-up) trains bit for bit as before schedules existed.
    """
    factor = lr_multiplier(step, total_steps, cfg.schedule, cfg.warmup_steps)
    return cfg.lr if factor == 1.0 else cfg.lr * factor


def resolve_steps(cfg: FinetuneConfig, batches_per_epoch: int | None) -> int:
    """Steps of a fine-tune: ``cfg.steps``, or ceil(``cfg.epochs`` x batches per epoch).

    ``epochs`` is taken as the decimal the user wrote (0.1 x 30 batches is 3 steps, not the 4
    that float rounding would give). ``batches_per_epoch`` is only needed with ``epochs``; None
    means the loader has no length.
    """
    if cfg.epochs is None:
        return cfg.steps
    if batches_per_epoch is None:
        raise ValueError(f"finetune.epochs is {cfg.epochs:g} but the train loader has no len(), "
                         "so an epoch has no known length: give finetune.steps instead")
    if batches_per_epoch <= 0:
        raise ValueError(f"finetune.epochs is {cfg.epochs:g} but the train loader has "
                         f"{batches_per_epoch} batches per epoch")
    return math.ceil(Fraction(repr(float(cfg.epochs))) * batches_per_epoch)


def _batches_per_epoch(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # a generator, or a DataLoader over an IterableDataset without a length
        return None


def _cycle(loader: Iterable):
    """Batches of ``loader``, epoch after epoch (re-iterating it, so shuffling re-draws)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_loader yielded no batches")


class FinetuneSession:
    """One fine-tune of ``student`` that can be run in pieces: ``run_until(40)``, later
    ``run_until(150)``.

    Multi-fidelity screening trains a candidate briefly and continues only the promising ones;
    continuing the same student (same Adam state, same batch stream, same RNG stream, the
    learning-rate schedule laid over the full length) makes the pieces add up to exactly one
    uninterrupted fine-tune: ``run_until(k)`` then ``run_until(total)`` gives the same weights
    and loss as ``run_until(total)`` alone, bit for bit. :func:`finetune` is one session run to
    the end.

    The length is ``total_steps`` = :func:`resolve_steps` (``cfg.steps``, or ``cfg.epochs`` x
    ``len(train_loader)``). The loader is cycled epoch after epoch; between calls its iterator
    stays open mid-epoch (:meth:`close`, or the session used as a context manager, releases it;
    reaching ``total_steps`` does too). The torch RNG is seeded with ``cfg.seed`` inside a
    forked RNG on the first call and its state is carried from call to call, so the caller's
    random state is left alone and whatever runs between calls cannot disturb the stream.

    Each ``run_until`` returns a :class:`FinetuneResult` counting every step so far (``steps``,
    ``seconds``: subtract the previous result's to charge a budget for one piece), ends with
    the student in eval mode and the teacher in its own mode, and checks for divergence as
    :func:`finetune` does: :class:`CandidateDiverged` on a non-finite or exploding step loss,
    non-finite weights, or a last-10 mean loss far above the first step's. A session that
    raised cannot be continued.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        train_loader: Iterable[tuple[Tensor, Tensor]],
        cfg: FinetuneConfig,
        task: "Task | None" = None,
    ) -> None:
        batches_per_epoch = _batches_per_epoch(train_loader) if cfg.epochs is not None else None
        self.total_steps: int = resolve_steps(cfg, batches_per_epoch)
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self._task = task  # None: classification through distill_loss (the historic path)
        self._loader = train_loader
        self._device = device_of(student)
        self._amp = amp_mode(self._device.type, cfg.amp)
        self._scaler = torch.amp.GradScaler(self._device.type) if self._amp.scale_loss else None
        self._step = 0
        self._first: float | None = None
        self._recent: deque[float] = deque(maxlen=10)
        self._seconds = 0.0
        self._optimizer: torch.optim.Optimizer | None = None
        self._batches: Iterator | None = None
        self._rng: tuple[Tensor, Tensor | None] | None = None  # (cpu, cuda) after the last call
        self._broken: str | None = None

    @property
    def step(self) -> int:
        """Steps taken so far."""
        return self._step

    @property
    def done(self) -> bool:
        return self._step >= self.total_steps

    def __enter__(self) -> "FinetuneSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the loader's iterator (and its workers) mid-epoch; training can't go on."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        if not self.done and self._broken is None:
            self._broken = "it was closed"

    def run_until(self, step: int | None = None) -> FinetuneResult:
        """Train up to ``step`` steps in all (default: ``total_steps``); see the class docstring."""
        target = self.total_steps if step is None else step
        if self._broken is not None:
            raise RuntimeError(f"this fine-tune session cannot continue: {self._broken}")
        if not self._step <= target <= self.total_steps:
            raise ValueError(f"run_until({target}): the session is at step {self._step} of "
                             f"{self.total_steps}; give a step in {self._step}..{self.total_steps}")
        start = time.perf_counter()
        try:
            if target > self._step:
                self._train(target)
        except BaseException as error:
            self._broken = f"{type(error).__name__}: {error}"
            self.close()
            raise
        finally:
            self.student.eval()
            self._seconds += time.perf_counter() - start
        if self.done:
            self.close()
        return self._result()

    def _autocast(self):
        """Autocast to the amp dtype on the student's device; disabled without finetune.amp."""
        return torch.autocast(self._device.type, dtype=self._amp.dtype,
                              enabled=self._amp.enabled)

    def _train(self, target: int) -> None:
        student, teacher, cfg, device = self.student, self.teacher, self.cfg, self._device
        if self._optimizer is None:
            params = [p for p in student.parameters() if p.requires_grad]
            if not params:
                raise ValueError("student has no trainable parameters")
            if isinstance(cfg.lr, str):  # 'auto' is resolved per study (search.lr_choice)
                raise ValueError(f"finetune.lr {cfg.lr!r} was not resolved to a number before "
                                 "fine-tuning")
            self._optimizer = torch.optim.Adam(params, lr=cfg.lr)
            self._batches = _cycle(self._loader)
        optimizer, batches, recent = self._optimizer, self._batches, self._recent
        T, w = float(cfg.temperature), float(cfg.distill_weight)
        cuda = device.type == "cuda"
        cuda_index = device.index if device.index is not None else 0
        teacher_was_training = teacher.training
        try:
            with torch.random.fork_rng(devices=[cuda_index] if cuda else []):
                if self._rng is None:
                    torch.manual_seed(cfg.seed)
                else:
                    torch.set_rng_state(self._rng[0])
                    if cuda and self._rng[1] is not None:
                        torch.cuda.set_rng_state(self._rng[1], cuda_index)
                teacher.eval()
                student.train()
                while self._step < target:
                    step = self._step
                    x, y = next(batches)
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    with self._autocast():  # finetune.amp; a no-op in float32
                        teacher_logits = None
                        if w > 0:
                            with torch.no_grad():
                                teacher_logits = teacher(x)
                        if self._task is None:
                            loss = distill_loss(student(x), teacher_logits, y, T, w)
                        else:
                            loss = self._task.finetune_loss(student(x), teacher_logits, y, T, w)
                    value = loss.item()
                    if self._first is None:
                        self._first = value
                    first = self._first
                    if not math.isfinite(value) or value > EXPLODE_FACTOR * (abs(first) + 1.0):
                        raise CandidateDiverged(
                            f"fine-tuning diverged at step {step + 1}/{self.total_steps}: "
                            f"loss is {value:.6g}"
                            + ("" if step == 0 else f" (first step: {first:.6g})"),
                            step=step + 1,
                            loss=value,
                        )
                    lr = learning_rate(step, self.total_steps, cfg)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.zero_grad(set_to_none=True)
                    if self._scaler is not None:  # float16: scaled so small gradients survive
                        self._scaler.scale(loss).backward()
                        self._scaler.step(optimizer)
                        self._scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    self._step += 1
                    recent.append(value)
                optimizer.zero_grad(set_to_none=True)
                self._rng = (torch.get_rng_state(),
                             torch.cuda.get_rng_state(cuda_index) if cuda else None)
        finally:
            teacher.train(teacher_was_training)

    def _result(self) -> FinetuneResult:
        """The result so far, after the divergence checks on weights and on the final loss."""
        step, recent, first = self._step, self._recent, self._first
        if step == 0:
            return FinetuneResult(steps=0, final_loss=math.nan, seconds=self._seconds)
        with torch.no_grad():
            for name, tensor in self.student.named_parameters():
                if not bool(torch.isfinite(tensor).all()):
                    self._broken = f"parameter {name!r} is not finite"
                    self.close()
                    raise CandidateDiverged(
                        f"fine-tuning diverged: parameter {name!r} is not finite after "
                        f"{step} steps",
                        step=step,
                    )
        final = sum(recent) / len(recent)
        if final > END_FACTOR * (abs(first) + 1.0):
            self._broken = "its loss diverged"
            self.close()
            raise CandidateDiverged(
                f"fine-tuning diverged: mean loss of the last {len(recent)} steps is {final:.6g} "
                f"after {step} steps (first step: {first:.6g})",
                step=step,
                loss=final,
            )
        return FinetuneResult(steps=step, final_loss=final, seconds=self._seconds)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: FinetuneConfig,
    task: "Task | None" = None,
) -> FinetuneResult:
    """A whole fine-tune: :func:`resolve_steps` Adam steps on ``student``, distilling from
    ``teacher`` (:func:`distill_loss`), the learning rate following ``cfg.schedule`` after
    ``cfg.warmup_steps`` of warm-up (:func:`learning_rate`).

    One :class:`FinetuneSession` run to the end: cycles through ``train_loader`` as many epochs
    as needed, seeded with ``cfg.seed`` inside a forked RNG (repeatable, the caller's random
    state left alone). The teacher runs in eval mode under no_grad; the student ends in eval
    mode. Raises :class:`CandidateDiverged` on a non-finite or exploding loss (see
    ``EXPLODE_FACTOR``) and on non-finite weights after training; ValueError when
    ``cfg.epochs`` is set and the loader has no len().
    """
    with FinetuneSession(student, teacher, train_loader, cfg, task) as session:
        return session.run_until(session.total_steps)
