"""The dense reference model every candidate is compressed from and compared with.

Built-in models are trained here on first use and cached by a key of everything that changes
the result (model config, data, seed, training recipe), so repeated searches and parallel
workers start from the very same weights. A factory model arrives trained (its checkpoint is
loaded by ``build_model``) and is only evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from autosparse.config.sections import ModelConfig
from autosparse.workload.data_checks import check_model_outputs
from autosparse.workload.devices import torch_threads
from autosparse.workload.evaluate import evaluate
from autosparse.workload.models import build_model, model_name
from autosparse.workload.splits import SPLITS, DataSplits
from autosparse.workload.task import Task

log = logging.getLogger(__name__)

# What the terminal shows while a dense model trains: (model name, epochs, cache path) -> a
# context manager yielding the per-epoch callback. Given by the caller (the runner passes
# ``tracking.progress.dense_training``), so this stage never imports the terminal code.
Announce = Callable[[str, int, Path], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def _silent(model: str, epochs: int, cache: Path) -> Iterator[Callable[[int], None]]:
    yield lambda epoch: None

RECIPE_VERSION = 1  # bump when train_dense changes, so old cached weights are not reused
LR = 1e-3
# Label smoothing 0.1 lifted digits-cnn (30 epochs, 2 data splits x 3 seeds) from 97.2% mean /
# 96.7% worst validation accuracy to 98.5% / 98.1%; weight decay and pixel-shift augmentation
# did not help.
LABEL_SMOOTHING = 0.1
BATCH_SIZE = 64


def _splits_fingerprint(data: DataSplits) -> str:
    """Content hash for DataSplits not made by ``load_data`` (which sets ``fingerprint``)."""
    digest = hashlib.sha1(repr((data.input_shape, data.num_classes)).encode())
    for name in SPLITS:
        dataset = data.split(name)
        digest.update(f"{name}:{len(dataset)}".encode())
        if isinstance(dataset, TensorDataset):
            for tensor in dataset.tensors:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        elif len(dataset):
            x, y = dataset[0]
            digest.update(torch.as_tensor(x).numpy().tobytes() + repr(int(y)).encode())
    return digest.hexdigest()[:12]


def cache_key(model_cfg: ModelConfig, data: DataSplits, seed: int,
              task: Task | None = None) -> str:
    """Short hash of what determines the trained weights. A user's ``task.loss`` (with its
    kwargs) is part of it; without one the key is what it always was, so caches of the
    built-in losses stay valid."""
    payload = {
        "model": model_cfg.model_dump(mode="json"),
        "data": data.fingerprint or _splits_fingerprint(data),
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "seed": seed,
        "recipe": RECIPE_VERSION,
    }
    if task is not None and task.loss_spec is not None:
        payload["task_loss"] = task.loss_spec
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(model_cfg: ModelConfig, data: DataSplits, cache_dir: Path, seed: int,
               task: Task | None = None) -> Path:
    return Path(cache_dir) / f"{model_name(model_cfg)}-{cache_key(model_cfg, data, seed, task)}.pt"


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread, then restore the caller's setting.

    The built-in models are so small that intra-op threads cost more than they give: on the
    2-core dev machine digits-cnn trained 3.6x faster (wall and CPU time) on one thread.
    """
    with torch_threads(1):
        yield


def train_dense(model: nn.Module, data: DataSplits, epochs: int, seed: int,
                task: Task | None = None, on_epoch: Callable[[int], None] | None = None) -> None:
    """Adam (lr 1e-3) with per-step cosine decay, batch 64, label-smoothed cross-entropy.

    Shuffling uses a generator seeded from ``seed``; the caller seeds the initialisation.
    Runs on the model's device (batches are moved there).
    """
    loader = data.loader("train", BATCH_SIZE, shuffle=True, seed=seed)
    device = next(model.parameters()).device
    try:
        batches = len(loader)
    except TypeError:  # a user's loader without a length: count one epoch
        batches = sum(1 for _ in loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches)
    model.train()
    for epoch in range(epochs):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if task is None or (task.kind == "classification" and task.loss_fn is None):
                F.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING).backward()
            else:  # the task's own loss (regression MSE, token cross-entropy, the user's)
                task.loss(model(x), y).backward()
            optimizer.step()
            scheduler.step()
        if on_epoch is not None:  # the terminal's epoch bar (progress.dense_training)
            on_epoch(epoch + 1)
    model.eval()


def _save_atomically(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a temp file beside ``path`` and rename it, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(model: nn.Module, path: Path) -> bool:
    """Load cached weights; a corrupt or stale file is reported and retrained over."""
    if not path.is_file():
        return False
    try:
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception as err:  # truncated file, other architecture, ...
        # torch's own text may advise weights_only=False: name the kind of failure only
        log.warning("ignoring unusable dense cache %s (%s: truncated, corrupt or another "
                    "architecture); training again", path, type(err).__name__)
        return False
    return True


def _metrics(model: nn.Module, data: DataSplits, task: Task | None = None) -> dict[str, float]:
    return {  # "accuracy": the task metric's slot (its name is the task's)
        "accuracy": evaluate(model, data.loader("validation", data.batch_size), task),
        "test_accuracy": evaluate(model, data.loader("test", data.batch_size), task),
    }


def prepare_dense(
    model_cfg: ModelConfig, data: DataSplits, cache_dir: Path, seed: int,
    device: str = "cpu", task: Task | None = None,
    announce: Announce | None = None,
) -> tuple[nn.Module, dict]:
    """The dense model (on the CPU, in eval mode) and its accuracy in percent on validation
    and test, evaluated on ``device``.

    A built-in without a checkpoint is trained on ``device`` (or loaded from ``cache_dir``);
    anything with a checkpoint or from a factory is used as built. The cache key does not
    name the device: a model trained on a GPU is reused on the CPU and back, so a study
    resumed on another device keeps its dense reference. ``announce(model name, epochs, cache
    path)`` is a context manager that yields the per-epoch callback: the terminal's line while
    the model trains (``tracking.progress.dense_training``); by default nothing is shown.
    """
    kind = task.kind if task is not None else "classification"
    if model_cfg.builtin is None or model_cfg.checkpoint:
        model = build_model(model_cfg, data.input_shape, data.num_classes)
        check_model_outputs(model, data, kind)
        model.eval()
        return model, _on_device_metrics(model, data, device, task)

    path = cache_path(model_cfg, data, cache_dir, seed, task)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = build_model(model_cfg, data.input_shape, data.num_classes)
        check_model_outputs(model, data, kind)  # before training, or caching a broken model
        if _load_cached(model, path):
            log.info("dense %s loaded from %s", model_cfg.builtin, path)
        else:
            start = time.perf_counter()
            model.to(device)
            with single_thread() if device == "cpu" else contextlib.nullcontext(), \
                    (announce or _silent)(model_name(model_cfg), model_cfg.train_epochs, path) as on_epoch:
                train_dense(model, data, model_cfg.train_epochs, seed, task, on_epoch)
            model.cpu()
            _save_atomically(model.state_dict(), path)
            log.info(
                "dense %s trained for %d epochs in %.1f s, cached at %s",
                model_cfg.builtin, model_cfg.train_epochs, time.perf_counter() - start, path,
            )
    model.eval()
    return model, _on_device_metrics(model, data, device, task)


def _on_device_metrics(model: nn.Module, data: DataSplits, device: str,
                       task: Task | None = None) -> dict[str, float]:
    """``_metrics`` evaluated on ``device``; the model is handed back on the CPU."""
    try:
        return _metrics(model.to(device), data, task)
    finally:
        model.cpu()
