"""Accuracy of a classifier on a loader: the one number every part of the search compares.

Kept in a module of its own so the fine-tune, dense and export code share exactly one definition.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from autosparse.workload.devices import device_of, eval_mode
from autosparse.workload.task import model_outputs

if TYPE_CHECKING:
    from autosparse.workload.task import Task


def evaluate(model: nn.Module, loader: Iterable, task: "Task | None" = None) -> float:
    """Top-1 accuracy in percent (0-100) over ``(x, y)`` batches; eval mode, no gradients.

    With a ``task`` (``autosparse.workload.task``), the task's metric instead (MSE, perplexity, ...).
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
