"""GPTQ: quantize a layer column by column, pushing each rounding error onto the columns left
(Frantar et al., 2022), with an optional sparsity mask for sparsity and bits together.

The layer-wise loss ``||W X - Q X||^2`` has Hessian ``H = 2 X^T X`` (per row, the same for all
rows). Optimal Brain Quantization fixes one column ``j`` at a time: rounding it costs
``err = (w_j - q_j) / [H^-1]_jj`` and the columns not yet fixed absorb it optimally by
``W[:, k] -= err * [H^-1]_jk``. GPTQ's observations make that fast and stable:

* every row uses the same column order, so ``H^-1`` after removing columns ``0..j-1`` is needed
  only through its row ``j``, which is row ``j`` of the upper Cholesky factor ``U`` of ``H^-1``
  (scaled by ``U_jj``); so compute ``U`` once and read rows of it;
* lazy batches: inside a block of ``blocksize`` columns the updates are applied column by column
  to that block only; the columns after the block get the whole block's errors in one matmul.

Pseudocode (``U`` = upper Cholesky of ``(H + damp I)^-1``)::

    for each block [i1, i2):
        for j in block:
            if column j starts a grid block: params = grid.fit(current weights of that block)
            q_j = quantize(w_j, params)               # 0 where the mask prunes
            e_j = (w_j - q_j) / U_jj
            W[:, j:i2] -= e_j * U[j, j:i2]
        W[:, i2:] -= E_block @ U[block, i2:]

Grid parameters are fitted on the CURRENT (error-updated) weights when the first column of a
grid block is reached, as the reference does with ``groupsize`` and ``static_groups=False``.
With ``act_order`` the columns are processed by decreasing ``H_jj`` but a grid block is still a
run of ``grid.block`` consecutive ORIGINAL columns (the stored format): its parameters are fitted
when the first of its columns comes up, on the current values of all its columns (those past the
lazy block get the pending updates of the current block added for the fit). ``grid.fit`` is
called exactly once per grid block: in column order without ``act_order``, in the order the
blocks are first reached with it (``gguf_grids.pack`` matches recorded fits to their blocks, so
both orders pack).

With a ``mask``, a grid block is fitted on a preview of its weights after the pruning updates
inside it (``prune_preview``), pruned weights at 0: the scored zeros are exact whatever the grid,
but a stored format with an offset (GGUF Q4_K, Q2_K) cannot hold them - use a symmetric grid
(``grid_for_bits(bits, exact_zero=True)``) for sparse + quantized layers.

Dead inputs (``H_jj == 0``: feature never non-zero on the calibration data) are set to weight 0
and ``H_jj = 1``, as the reference does: the weight never mattered on the data and the
factorization stays defined.
"""

from __future__ import annotations

from typing import Any

import torch

from autosparse.compress.oneshot.grid import Grid, grid_zero
from autosparse.compress.oneshot.magnitude import nm_keep_mask


def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copy of ``weight`` with dead columns zeroed, and ``H`` (float64, same device)
    with dead diagonals set to 1 and ``percdamp * mean(diag(H))`` added to the diagonal.

    Float64 for the inverse: the factorization of a nearly singular ``X^T X`` in float32 is
    where GPTQ's reference fails most often; the loop itself runs in float32.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}] for a weight with {cols} input "
                         f"columns, got {tuple(hessian.shape)}")
    if not 0.0 < percdamp < 1.0:
        raise ValueError(f"percdamp must be in (0, 1), got {percdamp}")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    if not torch.isfinite(h).all():
        raise ValueError("hessian has NaN or infinite entries")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    return w, h


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``h^-1`` (float32). If ``h`` is not positive definite (a
    rank-deficient Hessian with too little damping), add more damping, up to four times."""
    extra = 0.0
    scale = torch.diagonal(h).mean()
    for _ in range(5):
        damped = h + extra * scale * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        low, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(low)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper.to(torch.float32)
        extra = 0.01 if extra == 0.0 else extra * 10
    raise ValueError("hessian is not positive definite even with 100 % extra damping")


def check_grid_columns(columns: int, grid: Grid) -> None:
    if columns % grid.block:
        raise ValueError(f"{columns} input columns are not a multiple of {grid.name}'s block "
                         f"{grid.block}")


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``weight`` ``[out, in]`` onto ``grid`` with GPTQ; float32, dequantized, on the
    weight's device.

    ``mask`` (bool ``[out, in]``, ``True`` = kept), if given, makes pruned weights exactly 0:
    their values are still error-updated like any other until their column comes up, and then the
    whole value is the error pushed onto the columns left - so the pruning is compensated by the
    same update that compensates rounding (SparseGPT's joint step with a fixed mask).
    """
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    w, h = prepare_hessian(weight, hessian, percdamp)
    cols = w.shape[1]
    check_grid_columns(cols, grid)
    keep = None
    if mask is not None:
        if mask.shape != w.shape:
            raise ValueError(f"mask must have the weight's shape {tuple(w.shape)}, got "
                             f"{tuple(mask.shape)}")
        keep = mask.to(device=w.device, dtype=torch.bool)
    device = w.device
    # position p of the processing order handles original column order[p]
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
        keep = keep[:, order] if keep is not None else None
    else:
        order = torch.arange(cols, device=device)
    position = torch.argsort(order)  # original column -> position
    order_list = order.tolist()
    u = inverse_cholesky_upper(h)
    del h

    out = torch.zeros_like(w)
    params: dict[int, Any] = {}
    gb = grid.block
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = order_list[i1 + i]
            group = col // gb
            if group not in params:
                where = position[group * gb : (group + 1) * gb]  # positions, original order
                current = _current_values(w, w1, err1, u, where, i1, i2, i)
                if keep is not None:
                    ordered = torch.argsort(where)  # the group's columns in processing order
                    back = torch.argsort(ordered)
                    at = where[ordered]
                    preview, _ = prune_preview(current[:, ordered], u[at][:, at], keep[:, at])
                    current = torch.where(keep[:, where], preview[:, back], 0.0)
                params[group] = grid.fit(current)
            wj = w1[:, i]
            qj = grid.quantize_column(wj, params[group], col % gb).to(torch.float32)
            if keep is not None and not bool(keep[:, i1 + i].all()):
                qj = torch.where(keep[:, i1 + i], qj, grid_zero(grid, params[group], col % gb, wj))
            ej = (wj - qj) / u1[i, i]
            w1[:, i:].sub_(ej.unsqueeze(1) * u1[i, i:].unsqueeze(0))
            err1[:, i] = ej
            out[:, i1 + i] = qj
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
    return out[:, position] if act_order else out


def _current_values(
    w: torch.Tensor,
    w1: torch.Tensor,
    err1: torch.Tensor,
    u: torch.Tensor,
    where: torch.Tensor,
    i1: int,
    i2: int,
    i: int,
) -> torch.Tensor:
    """The up-to-date values of the columns at positions ``where`` (all not yet quantized), at
    step ``i`` of the lazy block ``[i1, i2)``: inside the block they are in ``w1``; past it ``w``
    still lacks the updates of the block's first ``i`` columns, added here."""
    cur = w[:, where].clone()
    inside = where < i2
    if bool(inside.any()):
        cur[:, inside] = w1[:, where[inside] - i1]
    outside = ~inside
    if i > 0 and bool(outside.any()):
        cur[:, outside] -= err1[:, :i] @ u[i1 : i1 + i][:, where[outside]]
    return cur


def prune_preview(
    block: torch.Tensor,
    u: torch.Tensor,
    keep: torch.Tensor,
    nm: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid block's weights as they will stand when rounded: after the OBS updates of the
    pruning inside the block (``u``: ``U`` restricted to the block, columns in processing order).

    Why: the parameters of a grid block are fitted when its first column comes up, but a pruned
    weight's whole value is pushed onto the block's later columns, which can move them well
    past the range fitted on the values before (then they clamp at the grid's ends). Fitting on
    this preview - pruning updates only, no rounding errors, which are small - keeps the range
    right. With ``nm``, the N:M choices inside the block are made in the preview the way the real
    pass makes them (lowest ``w^2 / U_jj^2`` of each group, on the values as they stand), and
    the keep mask it used is returned with the values.
    """
    w = block.clone()
    keep = keep.clone()
    d2 = torch.diagonal(u).square().unsqueeze(0)
    for i in range(w.shape[1]):
        if nm is not None and i % nm[1] == 0:
            sal = w[:, i : i + nm[1]].square() / d2[:, i : i + nm[1]]
            keep[:, i : i + nm[1]] = nm_keep_mask(sal, *nm)
        if bool(keep[:, i].all()):
            continue
        e = torch.where(keep[:, i], 0.0, w[:, i]) / u[i, i]
        w[:, i:].sub_(e.unsqueeze(1) * u[i, i:].unsqueeze(0))
    return w, keep
