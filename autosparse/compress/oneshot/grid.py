"""A quantization grid: which values a row's block of weights may take, and how it is stored.

A weight ``W[out, in]`` is quantized along its input dimension in blocks of ``block`` columns; each
row of a block has its own parameters (scale, and offset where the grid has one), fitted from the
weights of that block. GPTQ needs the parameters fixed before it quantizes a block's columns one
at a time (each column's rounding error is pushed onto the columns not yet quantized), so a grid
separates ``fit`` (parameters of one block) from ``quantize_column`` (one column on those
parameters). Round-to-nearest is ``fit`` then every column, with no error feedback
(``round_to_nearest`` below).

Grids that match a GGUF tensor type bit for bit live in ``gguf_grids``; ``UniformGrid`` is the
plain asymmetric min-max grid of the GPTQ paper.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Grid(Protocol):
    """The contract every grid meets (see ``tests/compress/test_oneshot_grids.py``)."""

    name: str  # the stored format, e.g. "Q4_K" or "uniform4g32"
    bits_per_weight: float  # stored bits per weight, scales and offsets included
    block: int  # columns whose parameters are fitted together (a multiple of 16)

    def fit(self, w: torch.Tensor) -> Any:
        """Parameters for one block: ``w`` is ``[rows, block]`` float32 (the weights as they
        stand when the block is reached)."""

    def quantize_column(self, column: torch.Tensor, params: Any, index: int) -> torch.Tensor:
        """``column`` (``[rows]``, column ``index`` of its block) rounded onto the grid and
        returned dequantized (float32, same shape)."""


class UniformGrid:
    """Asymmetric min-max grid per row and group: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``,
    ``w ~ s (q - z)``, with fp16 scale and integer zero-point (GPTQ's quantizer)."""

    def __init__(self, bits: int, group_size: int = 128) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be 1..8, got {bits}")
        self.bits = bits
        self.block = group_size
        self.name = f"uniform{bits}g{group_size}"
        self.bits_per_weight = bits + 32 / group_size  # fp16 scale + fp16 zero per group

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = 2**self.bits - 1
        low = w.min(dim=1).values.clamp(max=0)
        high = w.max(dim=1).values.clamp(min=0)
        scale = ((high - low) / levels).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / scale)
        return scale, zero

    def quantize_column(
        self, column: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor], index: int
    ) -> torch.Tensor:
        scale, zero = params
        q = torch.clamp(torch.round(column / scale) + zero, 0, 2**self.bits - 1)
        return scale * (q - zero)

    def quantize_block(
        self, w: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """All columns of a block ``[rows, block]`` at once (RTN's fast path), the same values
        as ``quantize_column`` on each."""
        scale, zero = params
        return self.quantize_column(w, (scale.unsqueeze(1), zero.unsqueeze(1)), 0)


def round_to_nearest(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """RTN: every block fitted on the dense weights and every column rounded, no feedback.

    A grid may offer ``quantize_block(w[rows, block], params) -> [rows, block]`` (optional, not
    part of the protocol) returning what ``quantize_column`` gives column by column; RTN then
    rounds a block in one call instead of ``block`` calls.
    """
    w = weight.detach().float()
    cols = w.shape[1]
    if cols % grid.block:
        raise ValueError(f"{cols} input columns are not a multiple of {grid.name}'s block {grid.block}")
    out = torch.empty_like(w)
    whole_block = getattr(grid, "quantize_block", None)
    for start in range(0, cols, grid.block):
        params = grid.fit(w[:, start : start + grid.block])
        if whole_block is not None:
            out[:, start : start + grid.block] = whole_block(w[:, start : start + grid.block], params)
            continue
        for i in range(grid.block):
            out[:, start + i] = grid.quantize_column(w[:, start + i], params, i)
    return out


def grid_zero(grid: Grid, params: Any, index: int, like: torch.Tensor) -> torch.Tensor:
    """What a pruned weight of column ``index`` is stored as: the grid's own rounding of 0 where
    that is 0 - sign included: a grid with a negative step gives -0.0, and a bit-exact export
    checks the bits - else +0.0 (a grid with an offset, ``d * q - m``, may hold no exact 0; the
    zero then lives in the sparsity mask stored beside the codes)."""
    zero = grid.quantize_column(torch.zeros_like(like), params, index).to(torch.float32)
    return torch.where(zero == 0, zero, torch.zeros_like(zero))
