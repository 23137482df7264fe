"""Data and model checked once, when loaded, before any training: what would otherwise fail every
trial (or train a broken dense model and cache it) is one ``ConfigError`` naming the split.

    every split     inputs finite (no NaN / inf); a sample has a shape (not a scalar)
    classification  targets one class index per sample, shape (N,), integers >= 0, finite;
                    the train split holds at least two classes
    regression      targets finite
    the model       (built, untrained) gives one output per class: more outputs than the
                    largest label (a classifier's logits, a language model's vocabulary)

A user's ``data.factory`` loaders are their own iterables: their first train batch is checked
(``data_factory`` has read its shapes and labels already).
"""

from __future__ import annotations

import torch
from torch import nn

from autosparse.config.validation import ConfigError
from autosparse.workload.splits import SPLITS, DataSplits

CLASS_KINDS = ("classification", "language-model")  # targets are class (token) indices


def _tensors(data: DataSplits, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The split's (inputs, targets); a user's loaders: the first batch of train only."""
    if data.user_loaders:
        if split != "train":
            return None
        for x, y in data.train:
            return torch.as_tensor(x), torch.as_tensor(y)
        return None
    tensors = getattr(data.split(split), "tensors", None)
    return tensors if isinstance(tensors, tuple) and len(tensors) == 2 else None


def _non_finite(values: torch.Tensor) -> int:
    return int((~torch.isfinite(values)).sum()) if values.is_floating_point() else 0


def check_data(data: DataSplits, kind: str = "classification") -> None:
    """Refuse data no model could learn from, naming the split (see the module docstring)."""
    for split in SPLITS:
        tensors = _tensors(data, split)
        if tensors is None:
            continue
        x, y = tensors
        if x.ndim < 2:
            raise ConfigError(f"data: the {split} split's samples are scalars (inputs of shape "
                              f"{tuple(x.shape)}); give each sample a shape, e.g. (N, 1)")
        bad = _non_finite(x)
        if bad:
            raise ConfigError(f"data: the {split} split has {bad} input values that are NaN or "
                              "infinite; clean them or drop those samples")
        bad = _non_finite(y)
        if bad:
            raise ConfigError(f"data: the {split} split has {bad} targets that are NaN or "
                              "infinite; clean them or drop those samples")
        if kind == "classification":
            if y.ndim != 1:
                raise ConfigError(f"data: the {split} split's targets have shape "
                                  f"{tuple(y.shape)}; a classifier takes one class index per "
                                  "sample, shape (N,)")
            if y.is_floating_point() and not torch.equal(y, y.round()):
                raise ConfigError(f"data: the {split} split's targets are not whole numbers; a "
                                  "classifier takes class indices 0, 1, ... (for real-valued "
                                  "targets set task.kind: regression)")
            if y.numel() and int(y.min()) < 0:
                raise ConfigError(f"data: the {split} split has a negative class index "
                                  f"({int(y.min())}); classes are 0, 1, ...")
    train = _tensors(data, "train")
    if kind == "classification" and train is not None and not data.user_loaders:
        classes = torch.unique(train[1])
        if len(classes) < 2:
            raise ConfigError(f"data: the train split holds one class only "
                              f"({', '.join(str(int(c)) for c in classes) or 'none'}); a "
                              "classifier needs at least two")


def largest_label(data: DataSplits) -> int | None:
    """The largest class index over the splits held as tensors (None without any)."""
    labels = [t[1] for split in SPLITS if (t := _tensors(data, split)) is not None
              and t[1].numel()]
    return max(int(y.max()) for y in labels) if labels else None


def check_model_outputs(model: nn.Module, data: DataSplits, kind: str = "classification") -> None:
    """A classifier (or language model) must give more outputs than the largest label: one
    forward pass of two train samples, on the CPU, without gradients."""
    if kind not in CLASS_KINDS:
        return
    top = data.num_classes - 1 if data.user_loaders else largest_label(data)
    train = _tensors(data, "train")
    if top is None or top < 0 or train is None:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(train[0][:2])
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", out)
    width = int(logits.shape[-1] if kind == "language-model" or logits.ndim != 2 else
                logits.shape[1])
    if width <= top:
        what = "token ids" if kind == "language-model" else "labels"
        raise ConfigError(f"model: it gives {width} outputs per sample but the {what} go up to "
                          f"{top}: it needs {top + 1} (one per class); build it with "
                          f"{top + 1} outputs, or check the labels")


__all__ = ["check_data", "check_model_outputs", "largest_label"]
