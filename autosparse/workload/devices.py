"""Which torch device a search runs on, which GPU each worker process gets, and eval mode.

Resolution and placement are pure functions of the config and of the devices present (a list
of names such as ``["cpu", "cuda:0", "cuda:1"]``), so they are tested against faked lists on a
machine without GPUs; :func:`present_devices` is the one place that asks torch. Both run before
anything heavy (data, dense training), so a wrong name costs a second, not minutes.

Placement: one worker per GPU. Two workers on one GPU compete for its memory and its streams
and are slower together than one, so they share a GPU only when the config lists it twice
(``devices: [0, 0]``); more workers than GPUs is an error, not a silent doubling-up.

Layer rule: torch only (never optuna or mlflow); only :func:`present_devices`,
:func:`amp_mode` and :func:`device_of` touch torch, lazily; :func:`eval_mode` only flips
module flags.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autosparse.config.validation import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["AmpMode", "amp_mode", "device_of", "eval_mode", "place_workers", "present_devices",
           "resolve_device", "torch_threads"]

_CUDA = re.compile(r"cuda(?::(\d+))?")


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run torch ops on ``count`` intra-op threads (None: as they are), then restore the
    caller's setting. A CPU conv fine-tune's last bits depend on the thread count (the order
    of its reductions), so repeating a trial exactly needs the trial's own count."""
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def eval_mode(model: "torch.nn.Module") -> Iterator["torch.nn.Module"]:
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


def device_of(module: "torch.nn.Module") -> "torch.device":
    """Where ``module`` lives: its first parameter's device, else its first buffer's, else cpu."""
    import torch

    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def present_devices() -> list[str]:
    """``cpu``, then ``cuda:0`` .. ``cuda:K-1`` (visible GPUs), then ``mps`` where present."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def _gpus(present: Sequence[str]) -> list[int]:
    return [int(m[1]) for name in present if (m := _CUDA.fullmatch(name)) and m[1] is not None]


def _listing(present: Sequence[str]) -> str:
    return ", ".join(present) or "none"


def resolve_device(name: str, present: Sequence[str]) -> str:
    """The concrete device for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    ``auto`` is the first GPU, else mps, else cpu; ``cuda`` is ``cuda:0``. A device that is not
    present is a ConfigError naming the devices that are.
    """
    gpus = _gpus(present)
    if name == "auto":
        if gpus:
            return f"cuda:{gpus[0]}"
        return "mps" if "mps" in present else "cpu"
    if name in ("cpu", "mps"):
        if name not in present:
            raise ConfigError(f"device: {name!r} is not available on this machine; present: "
                              f"{_listing(present)}")
        return name
    match = _CUDA.fullmatch(name)
    if match is None:
        raise ConfigError(f"device: {name!r} not allowed; allowed: auto, cpu, cuda, cuda:N, mps "
                          f"(present here: {_listing(present)})")
    if not gpus:
        raise ConfigError(f"device: {name!r} but torch sees no CUDA GPU here (present: "
                          f"{_listing(present)}); use device: auto or cpu")
    index = int(match[1]) if match[1] is not None else gpus[0]
    if index not in gpus:
        raise ConfigError(f"device: {name!r}: there is no GPU {index}; present: "
                          f"{_listing(present)}")
    return f"cuda:{index}"


def place_workers(workers: int, device: str, devices: Sequence[int] | None,
                  present: Sequence[str]) -> list[str]:
    """The device of each of ``workers`` processes (worker 0 is the main process).

    On the CPU (or mps) every worker shares the device, as processes share cores today. On
    GPUs the pool is ``devices`` (in its order, repeats allowed: that is how a user asks to
    share a GPU) or every visible GPU; worker i gets pool[i], and more workers than the pool
    holds is an error. ``cuda:N`` pins the search to one GPU, so it takes one worker (or
    ``devices`` listing N as often as there are workers).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    gpus = _gpus(present)
    if devices is not None:
        if device not in ("auto", "cuda"):
            raise ConfigError(f"devices: {list(devices)} picks GPUs for the workers; it needs "
                              f"device: cuda (or auto), not {device!r}")
        missing = sorted({i for i in devices if i not in gpus})
        if missing:
            raise ConfigError(f"devices: {list(devices)}: no GPU {', '.join(map(str, missing))} "
                              f"here; present: {_listing(present)}")
        pool = [f"cuda:{i}" for i in devices]
    else:
        resolved = resolve_device(device, present)
        if not resolved.startswith("cuda"):
            return [resolved] * workers
        pool = [resolved] if device.startswith("cuda:") else [f"cuda:{i}" for i in gpus]
    if workers > len(pool):
        shown = ", ".join(pool)
        raise ConfigError(
            f"--workers {workers} but only {len(pool)} GPU(s) to place them on ({shown}): two "
            f"workers never share a GPU unless asked; give at most --workers {len(pool)}, or "
            f"list a GPU once per worker in 'devices' (e.g. devices: "
            f"{[int(pool[i % len(pool)].split(':')[1]) for i in range(workers)]})")
    return pool[:workers]


@dataclass(frozen=True)
class AmpMode:
    """How the fine-tune runs mixed precision on one device (``enabled`` False: float32)."""

    enabled: bool
    dtype: object = None  # torch.bfloat16 / torch.float16
    scale_loss: bool = False  # float16 needs a GradScaler; bfloat16 has float32's range

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.enabled else "float32"


def amp_mode(device_type: str, enabled: bool) -> AmpMode:
    """``finetune.amp`` on ``device_type``: bfloat16 on CPU and on GPUs that have it, float16
    with loss scaling on older GPUs; refused on mps (its autocast is too new to trust here)."""
    if not enabled:
        return AmpMode(False)
    import torch

    if device_type == "cpu":
        return AmpMode(True, torch.bfloat16)
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return AmpMode(True, torch.bfloat16)
        return AmpMode(True, torch.float16, scale_loss=True)
    raise ConfigError(f"finetune.amp: mixed precision is supported on cpu and cuda, not on "
                      f"{device_type!r}; set finetune.amp: false")
