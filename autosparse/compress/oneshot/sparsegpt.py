"""SparseGPT: prune a layer in one shot with OBS weight updates, optionally quantizing the kept
weights in the same pass (Frantar & Alistarh, 2023).

The loop is GPTQ's (see ``gptq``): columns left to right, each column's error
``(w_j - q_j) / U_jj`` pushed onto the columns not yet done through the upper Cholesky factor
``U`` of ``H^-1``, lazily per block. Pruning a weight is "quantizing" it to 0, so the same update
compensates both. What SparseGPT adds is the mask choice, made as the loop goes with the weights
as they stand (already updated by the errors of the columns before):

* unstructured: at the start of each lazy block, the block's weights with the lowest
  ``w^2 / U_jj^2`` (the OBS saliency with the current inverse Hessian's diagonal) are pruned,
  ``sparsity`` of them - adaptive mask selection, one block of ``blocksize`` columns at a time;
* N:M: at the start of every group of M columns, the ``M - N`` lowest saliencies of each row.

Joint sparsify + quantize (``grid`` given): a kept weight is rounded onto the grid, a pruned one
set to exactly 0, and the error is ``w - q`` either way. The grid parameters of a grid block are
fitted when its first column comes up, on the current weights with the pruned ones at 0 (for
N:M, whose masks inside the grid block are not chosen yet, with the mask the current saliencies
would give - the final choice may differ a little, the zeros are exact whatever the fit).
So that a grid block never straddles two lazy blocks, the lazy block is rounded up to a multiple
of ``grid.block`` (and of M): with a GGUF super-block of 256, the unstructured mask is chosen per
256 columns instead of 128.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from autosparse.compress.oneshot.gptq import (
    check_grid_columns,
    inverse_cholesky_upper,
    prepare_hessian,
    prune_preview,
)
from autosparse.compress.oneshot.grid import Grid, grid_zero
from autosparse.compress.oneshot.magnitude import (
    UNSTRUCTURED,
    check_nm_columns,
    check_sparsity,
    keep_smallest_pruned,
    nm_keep_mask,
)


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: str = UNSTRUCTURED,
    grid: Grid | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Prune ``weight`` ``[out, in]`` (and, with ``grid``, quantize what is kept) with SparseGPT.

    Returns the dense-shaped float32 tensor on the weight's device, exact zeros where pruned.
    Unstructured: exactly ``round(sparsity * numel)`` zeros in all (each lazy block prunes its
    share, the shares rounded so that they add up); N:M: exactly N kept of every M.
    """
    nm = check_sparsity(sparsity, pattern)
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    w, h = prepare_hessian(weight, hessian, percdamp)
    rows, cols = w.shape
    check_nm_columns(cols, nm)
    align = 1
    if nm is not None:
        align = nm[1]
    if grid is not None:
        check_grid_columns(cols, grid)
        if nm is not None and grid.block % nm[1]:
            raise ValueError(f"pattern {pattern!r}: M={nm[1]} must divide {grid.name}'s block "
                             f"{grid.block} to prune and quantize jointly")
        align = math.lcm(align, grid.block)
    step = -(-blocksize // align) * align
    u = inverse_cholesky_upper(h)
    del h

    params: Any = None
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d2 = torch.diagonal(u1).square().unsqueeze(0)
        err1 = torch.zeros_like(w1)
        if nm is None:
            prune = round(sparsity * (rows * i2)) - round(sparsity * (rows * i1))
            keep1 = keep_smallest_pruned(w1.square() / d2, prune)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = w1[:, i : i + nm[1]].square() / d2[:, i : i + nm[1]]
                keep1[:, i : i + nm[1]] = nm_keep_mask(sal, *nm)
            if grid is not None and (i1 + i) % grid.block == 0:
                end = i + grid.block
                preview, fit_keep = prune_preview(w1[:, i:end], u1[i:end, i:end],
                                                  keep1[:, i:end], nm)
                params = grid.fit(torch.where(fit_keep, preview, 0.0))
            wj = w1[:, i]
            zero = torch.zeros_like(wj)
            qj = wj
            if grid is not None:
                qj = grid.quantize_column(wj, params, (i1 + i) % grid.block).to(torch.float32)
                zero = grid_zero(grid, params, (i1 + i) % grid.block, wj)
            qj = torch.where(keep1[:, i], qj, zero)
            ej = (wj - qj) / u1[i, i]
            w1[:, i:].sub_(ej.unsqueeze(1) * u1[i, i:].unsqueeze(0))
            w1[:, i] = qj  # exact: the update leaves w - e * U_jj = q only up to rounding
            err1[:, i] = ej
        w[:, i1:i2] = w1
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
    return w

