"""Run a model whose weights stay on the CPU on an accelerator, one block at a time, so a model
larger than the accelerator's memory still gets its calibration statistics and its scores there.

Why hooks rather than an architecture's own block loop: the level database and the scorer run
any ``transformers`` causal LM (Llama, Qwen2, GPT-2, GPT-NeoX, ...), and each family calls its
blocks with other arguments (rotary embeddings, masks, caches). A pre-hook on each unit moves
its tensors and its inputs to the device just before it runs, and a hook after moves its
tensors back, so every family streams the same way::

    units   = the items of the model's longest nn.ModuleList (its decoder blocks), plus every
              other module holding tensors of its own (embeddings, final norm, output head,
              rotary tables)
    forward = for each unit as the model calls it: its tensors -> device, run, -> back home
    output  = the model's output (logits) moved back home, where the caller's targets are

Peak device memory is one block's weights plus one batch's activations (and whatever the
caller keeps there, e.g. a layer's Hessian). Each block travels once per batch: slower than
holding the model on the device, which is what to do when it fits. A tensor shared by two units
(tied embeddings) moves with whichever runs. ``data`` is swapped in place, so parameter
identities (hooks, tied weights) are kept; everything is home again when the context ends,
also after an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["stream_units", "streamed"]


def _blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's longest ``nn.ModuleList`` (its decoder blocks), or None."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=len) if lists else None


def stream_units(model: nn.Module) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    """(module, the tensors that travel with it) for every unit of ``model`` (module doc)."""
    blocks = _blocks(model)
    units: list[tuple[nn.Module, list[torch.Tensor]]] = []
    inside: set[int] = set()
    if blocks is not None:
        for block in blocks:
            tensors = [*block.parameters(), *block.buffers()]
            units.append((block, tensors))
            inside.update(id(m) for m in block.modules())
    seen = {id(t) for _, tensors in units for t in tensors}
    for module in model.modules():
        if id(module) in inside:
            continue
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
               if id(t) not in seen]
        if own:
            units.append((module, own))
            seen.update(id(t) for t in own)
    return units


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _place(tensors: list[torch.Tensor], device: torch.device) -> None:
    for tensor in tensors:
        if tensor.device != device:
            tensor.data = tensor.data.to(device)


def _arrive(tensors: list[torch.Tensor], device: torch.device, _module: nn.Module,
            args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _place(tensors, device)
    return _move(args, device), _move(kwargs, device)


def _leave(tensors: list[torch.Tensor], home: torch.device, _module: nn.Module, _args: Any,
           _output: Any) -> None:
    _place(tensors, home)


def _home_output(home: torch.device, _module: nn.Module, _args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.to(home)
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        output.logits = logits.to(home)
    return output


@contextmanager
def streamed(model: nn.Module, device: torch.device | str | None, *,
             always: bool = False) -> Iterator[nn.Module]:
    """Within the context, ``model(...)`` runs unit by unit on ``device`` while its weights
    live where they are (the CPU); ``None`` or the weights' own device: nothing changes
    (``always``: the hooks are installed even then - how a machine without an accelerator
    checks that streaming computes what the plain model does)."""
    first = next(model.parameters(), None)
    if device is None or first is None or (torch.device(device) == first.device and not always):
        yield model
        return
    device, home = torch.device(device), first.device
    units = stream_units(model)
    handles = []
    try:
        for module, tensors in units:
            handles.append(module.register_forward_pre_hook(partial(_arrive, tensors, device),
                                                            with_kwargs=True))
            handles.append(module.register_forward_hook(partial(_leave, tensors, home)))
        handles.append(model.register_forward_hook(partial(_home_output, home)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for _, tensors in units:
            _place(tensors, home)
