"""``data.factory``: a user's own loaders (augmentation, tokenised text, streamed shards).

``data.factory: "pkg.module:make_loaders"`` is called with ``data.kwargs`` and returns the
train, validation and test iterables of ``(x, y)`` batches, as a tuple/list of three or a dict
with those keys. Any ``DataLoader`` fits, and so does any re-iterable object: the fine-tune
cycles train epoch after epoch, evaluation passes over validation once per trial.

The loaders are used as given: their batch size, shuffling, workers and normalisation are the
user's (``finetune.batch_size`` and ``data.batch_size`` do not apply). Everything the search
needs to know about a sample is read from the batches themselves, once, here: the input shape
from the first train batch, the number of classes and the sample counts from one pass over
validation (which every trial passes over anyway).

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from autosparse.config.sections import DataConfig
from autosparse.config.validation import ConfigError
from autosparse.workload.factory import call_factory, import_factory
from autosparse.workload.splits import SPLITS, DataSplits

__all__ = ["factory_stamp", "load_factory"]

_FIELD = "data.factory"


def load_factory(cfg: DataConfig) -> DataSplits:
    """Call the factory and check what it returned; one ConfigError line when it is wrong."""
    spec = str(cfg.factory)
    returned = call_factory(import_factory(spec, _FIELD), spec, cfg.kwargs, "data",
                             f"{spec}(**data.kwargs)")
    loaders = _three_loaders(spec, returned)
    x, y = _first_batch(spec, "train", loaders["train"])
    input_shape = tuple(int(d) for d in x.shape[1:])
    counts = {"train": _known_samples(loaders["train"])}
    top = _top_label(y)
    for name in ("validation", "test"):
        counts[name], split_top = _scan(spec, name, loaders[name], input_shape)
        top = max(top, split_top)
    if counts["train"] is None:
        del counts["train"]
    return DataSplits(
        train=loaders["train"], validation=loaders["validation"], test=loaders["test"],
        input_shape=input_shape, num_classes=top + 1 if top >= 0 else 0,
        user_loaders=True, sample_counts=counts,  # type: ignore[arg-type]
    )


def factory_stamp(spec: str) -> list:
    """What identifies the factory's data for the dense-model cache: the spec and the size and
    modification time of the module's file (editing the factory retrains a built-in model)."""
    module = sys.modules.get(spec.split(":", 1)[0])
    path = getattr(module, "__file__", None)
    if path and os.path.isfile(path):
        stat = os.stat(path)
        return [spec, stat.st_size, stat.st_mtime_ns]
    return [spec, hashlib.sha1(spec.encode()).hexdigest()[:8]]


def _three_loaders(spec: str, returned: Any) -> dict[str, Iterable]:
    if isinstance(returned, dict):
        missing = [name for name in SPLITS if name not in returned]
        if missing:
            raise ConfigError(f"{_FIELD}: {spec} returned a dict without "
                              f"{', '.join(map(repr, missing))} (keys: "
                              f"{', '.join(map(repr, returned)) or 'none'}); return "
                              f"{{'train': ..., 'validation': ..., 'test': ...}}")
        loaders = {name: returned[name] for name in SPLITS}
    elif isinstance(returned, (tuple, list)) and len(returned) == 3:
        loaders = dict(zip(SPLITS, returned))
    else:
        what = (f"a {type(returned).__name__} of {len(returned)}"
                if isinstance(returned, (tuple, list)) else type(returned).__name__)
        raise ConfigError(f"{_FIELD}: {spec} returned {what}; it must return (train, "
                          "validation, test) loaders or a dict with those keys")
    for name, loader in loaders.items():
        if isinstance(loader, Dataset) and not isinstance(loader, IterableDataset):
            raise ConfigError(f"{_FIELD}: {spec} returned a {type(loader).__name__} (a Dataset "
                              f"of single samples) for {name!r}; wrap it in a "
                              "torch.utils.data.DataLoader, which yields batches")
        if isinstance(loader, Iterator):  # a generator or iterator: consumed after one pass
            raise ConfigError(f"{_FIELD}: {spec} returned a one-pass iterator "
                              f"({type(loader).__name__}) for {name!r}; the search passes over "
                              "each split many times: return a DataLoader or another "
                              "re-iterable object")
    return loaders


def _pair(spec: str, name: str, batch: Any) -> tuple[torch.Tensor, Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and isinstance(batch[0], torch.Tensor)):
        shown = type(batch).__name__ + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                        else "")
        raise ConfigError(f"{_FIELD}: {spec}: the {name!r} loader yields {shown}; each batch "
                          "must be (x, y) with x a tensor of shape (batch, ...)")
    if batch[0].ndim < 1:
        raise ConfigError(f"{_FIELD}: {spec}: the {name!r} loader yields a 0-d x; x must have "
                          "a batch dimension")
    return batch[0], batch[1]


def _first_batch(spec: str, name: str, loader: Iterable) -> tuple[torch.Tensor, Any]:
    for batch in loader:
        return _pair(spec, name, batch)
    raise ConfigError(f"{_FIELD}: {spec}: the {name!r} loader yields no batches")


def _known_samples(loader: Iterable) -> int | None:
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset without a length
        return None


def _top_label(y: Any) -> int:
    """The largest label of an integer batch (class indices, token ids); -1 for float targets."""
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or not y.numel():
        return -1
    return int(y.max())


def _scan(spec: str, name: str, loader: Iterable,
          input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(samples, largest integer label or -1) over one pass, checking every batch's shape."""
    samples, top = 0, -1
    for batch in loader:
        x, y = _pair(spec, name, batch)
        if tuple(x.shape[1:]) != input_shape:
            raise ConfigError(f"{_FIELD}: {spec}: a {name!r} batch has samples of shape "
                              f"{tuple(x.shape[1:])}, the train batches {input_shape}")
        samples += int(x.shape[0])
        top = max(top, _top_label(y))
    if samples == 0:
        raise ConfigError(f"{_FIELD}: {spec}: the {name!r} loader yields no batches")
    return samples, top
