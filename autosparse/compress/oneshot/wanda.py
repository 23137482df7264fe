"""Wanda: prune by weight magnitude times input activation norm (Sun et al., 2023).

A weight ``W_ij`` contributes ``W_ij x_j`` to output ``i``; over the calibration tokens its size is
about ``|W_ij| * ||X_j||_2`` (``X_j``: input feature ``j`` over all tokens). Ranking by that score
keeps small weights on loud inputs that magnitude pruning would drop. No weight update, one pass.

As in the paper, unstructured pruning compares weights within each output row (every row loses
``round(sparsity * in_features)`` weights): the paper found per-output groups better than one
threshold per layer for language models. N:M picks within each group of M as usual.
"""

from __future__ import annotations

import torch

from autosparse.compress.oneshot.magnitude import UNSTRUCTURED, select_mask


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``, float32, ``[out, in]``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm must have shape ({weight.shape[1]},) (one norm per input "
                         f"feature), got {tuple(input_norm.shape)}")
    norm = input_norm.detach().to(device=weight.device, dtype=torch.float32)
    return weight.detach().float().abs() * norm.unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, pattern: str = UNSTRUCTURED
) -> torch.Tensor:
    """Keep mask (``True`` = kept) by Wanda's score; unstructured per output row, or N:M."""
    return select_mask(wanda_scores(weight, input_norm), sparsity, pattern, per_row=True)
