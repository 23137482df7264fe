"""The weight of a layer the one-shot compressors work on, always as ``[out, in]``.

Why: every one-shot compressor (RTN, GPTQ, SparseGPT, Wanda) and the GGUF block layout take a
weight whose ROWS are output features and whose columns are the inputs the calibration hooks
see. ``nn.Linear`` stores its weight that way; transformers' ``Conv1D`` (GPT-2's attention and
MLP layers, ``y = x @ W + b``) stores the transpose, ``[in, out]``. Reading and writing a layer's
weight only through these helpers lets the level database, the calibration hooks and candidate
stitching treat both alike, with no copy of a Linear's weight and no change to any compressor.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_conv1d", "is_oneshot_layer", "layer_weight", "swap_layer_weight"]


def is_conv1d(module: nn.Module | None) -> bool:
    """transformers' ``Conv1D`` (weight stored ``[in, out]``), recognised without importing
    transformers (the same test as ``space.discovery``)."""
    return module is not None and type(module).__name__ == "Conv1D" \
        and type(module).__module__.startswith("transformers")


def is_oneshot_layer(module: nn.Module | None) -> bool:
    """A layer the one-shot compressors accept: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]``: the parameter itself for a Linear, its transposed
    VIEW for a Conv1D (so ``layer_weight(m).copy_(w)`` writes the parameter)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise ValueError(f"{type(module).__name__} is not a Linear or transformers Conv1D layer")


def swap_layer_weight(module: nn.Module, new: torch.Tensor) -> torch.Tensor:
    """Put ``new`` (``[out, in]``) in as the layer's ``weight.data`` (a Conv1D gets its
    contiguous transpose, the layout its matmul was written for) and return the old data, which
    ``weight.data = old`` restores."""
    old = module.weight.data
    if is_conv1d(module):
        module.weight.data = new.t().contiguous()
    elif isinstance(module, nn.Linear):
        module.weight.data = new
    else:
        raise ValueError(f"{type(module).__name__} is not a Linear or transformers Conv1D layer")
    return old
