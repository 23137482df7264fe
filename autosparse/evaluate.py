"""Accuracy of a classifier on a loader: the one number every part of the search compares.

Kept in a module of its own so the fine-tune, dense and export code share exactly one definition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .devices import device_of
from .task import model_outputs

if TYPE_CHECKING:
    from .task import Task


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own previous mode.

    Restoring per module (not ``model.train(was_training)``) keeps deliberately frozen parts,
    e.g. batch norm held in eval during training, the way the caller left them.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def evaluate(model: nn.Module, loader: Iterable, task: "Task | None" = None) -> float:
    """Top-1 accuracy in percent (0-100) over ``(x, y)`` batches; eval mode, no gradients.

    With a ``task`` (``autosparse.task``), the task's metric instead (MSE, perplexity, ...).
    """
    if task is not None and not task.is_default:
        return task.evaluate(model, loader)
    device = device_of(model)
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for x, y in loader:
            logits = model_outputs(model(x.to(device)))  # a tensor, or transformers' .logits
            y = torch.as_tensor(y, device=logits.device)
            correct += int((logits.argmax(dim=1) == y).sum())
            total += int(y.numel())
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return 100.0 * correct / total
