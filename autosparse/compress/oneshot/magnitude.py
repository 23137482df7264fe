"""Magnitude pruning, and the sparsity patterns every one-shot pruner shares.

A pattern is ``"unstructured"`` (any weights may go) or ``"N:M"``: in every group of ``M``
consecutive weights along the input dimension of a row, ``N`` are kept and the ``M - N`` with the
smallest score are zeroed (so ``"2:4"`` is 50 % sparse, the layout sparse tensor cores run). All
masks here are KEEP masks: ``True`` where the weight stays.

The selection helpers (``keep_smallest_pruned``, ``nm_keep_mask``) take any score, so Wanda and
SparseGPT use them with their own scores and the three methods differ only in what they rank.
"""

from __future__ import annotations

import re

import torch

UNSTRUCTURED = "unstructured"
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> ``None``; ``"N:M"`` -> ``(N, M)`` with ``1 <= N < M``."""
    if pattern == UNSTRUCTURED:
        return None
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"pattern {pattern!r}: N:M needs 1 <= N < M (N weights kept of every M)")
    return n, m


def pattern_sparsity(pattern: str) -> float | None:
    """The sparsity an N:M pattern implies (``1 - N/M``); ``None`` for unstructured."""
    nm = parse_pattern(pattern)
    return None if nm is None else 1.0 - nm[0] / nm[1]


def check_sparsity(sparsity: float, pattern: str) -> tuple[int, int] | None:
    """Validate a (sparsity, pattern) pair and return the parsed pattern.

    For N:M the pattern fixes the sparsity, so ``sparsity`` must equal ``1 - N/M``: one level has
    one spelling, and a caller asking for 2:4 at 30 % learns at once that it cannot have it.
    """
    nm = parse_pattern(pattern)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(  # noqa: TRY004 - every bad argument is a ValueError here
            f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if nm is not None and abs(float(sparsity) - (1.0 - nm[0] / nm[1])) > 1e-9:
        raise ValueError(
            f"sparsity {sparsity} does not match pattern {pattern!r}, which prunes "
            f"{1.0 - nm[0] / nm[1]:.4g} (N kept of every M); use sparsity={1.0 - nm[0] / nm[1]!r}")
    return nm


def check_nm_columns(columns: int, nm: tuple[int, int] | None) -> None:
    if nm is not None and columns % nm[1]:
        raise ValueError(f"pattern '{nm[0]}:{nm[1]}' needs the input dimension ({columns}) to be "
                         f"a multiple of M={nm[1]}")


def keep_smallest_pruned(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """Keep mask of ``scores``' shape with exactly ``prune`` entries (the lowest scores) dropped.

    Exact count rather than a threshold: ties at the threshold would otherwise prune more or
    fewer weights than asked, and the cost model counts stored weights exactly.
    """
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if prune > 0:
        drop = torch.topk(scores.flatten(), prune, largest=False, sorted=False).indices
        keep[drop] = False
    return keep.view(scores.shape)


def keep_per_row(scores: torch.Tensor, prune_per_row: int) -> torch.Tensor:
    """Keep mask with exactly ``prune_per_row`` lowest scores dropped in every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prune_per_row > 0:
        drop = torch.topk(scores, prune_per_row, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, drop, False)
    return keep


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask: the ``n`` highest scores of every ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2, sorted=False).indices, True)
    return keep.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """Keep mask from any score: N:M per group, or unstructured either per row (``per_row``,
    Wanda's comparison group) or over the whole matrix (one threshold per layer)."""
    if scores.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(scores.shape)}")
    nm = check_sparsity(sparsity, pattern)
    check_nm_columns(scores.shape[1], nm)
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    if per_row:
        return keep_per_row(scores, round(sparsity * scores.shape[1]))
    return keep_smallest_pruned(scores, round(sparsity * scores.numel()))


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str = UNSTRUCTURED) -> torch.Tensor:
    """Keep mask by ``|W|``: unstructured prunes exactly ``round(sparsity * numel)`` weights of
    the layer (one threshold for the whole layer), N:M the ``M - N`` smallest of every group."""
    return select_mask(weight.detach().float().abs(), sparsity, pattern, per_row=False)
