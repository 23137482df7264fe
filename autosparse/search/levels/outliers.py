"""OWL's per-layer outlier ratios from weights and input norms: the one torch module here.

Why apart: the searches are pure functions of plain numbers; only this input to OWL needs the
model's tensors, so only this module imports torch (``import autosparse.search.levels`` does
not). OWL (Yin et al., 2024) measures outliers on the Wanda score::

    A_ij   = |W_ij| * ||X_j||_2                 (X_j: input feature j over the calibration tokens)
    D(M)   = #{ij : A_ij > M * mean(A)} / #A     (mean over the whole layer, or the whole block)

The authors compute D per transformer block, over the concatenated scores of all its Linear
layers; pass ``groups`` (layer -> block) to do the same, every layer of a block then getting the
block's ratio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from autosparse.compress.oneshot.wanda import wanda_scores

MS = (3.0, 5.0, 7.0, 10.0)


def outlier_ratio(weight: torch.Tensor | Sequence[torch.Tensor],
                  input_norm: torch.Tensor | Sequence[torch.Tensor], m: float) -> float:
    """Fraction of Wanda scores above ``m`` times their mean; sequences of weights (and their
    input norms) are scored together, as one block."""
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    norms = [input_norm] if isinstance(input_norm, torch.Tensor) else list(input_norm)
    if not weights or len(weights) != len(norms):
        raise ValueError(f"weight and input_norm must pair up (got {len(weights)} weights, "
                         f"{len(norms)} norms)")
    if not m > 0:
        raise ValueError(f"m must be a positive threshold multiple, got {m!r}")
    scores = torch.cat([wanda_scores(w, n).flatten().cpu() for w, n in zip(weights, norms)])
    threshold = float(m) * scores.double().mean()
    return float((scores.double() > threshold).double().mean())


def outlier_ratios(weights: Mapping[str, torch.Tensor], input_norms: Mapping[str, torch.Tensor],
                   ms: Iterable[float] = MS, groups: Mapping[str, str] | None = None
                   ) -> dict[float, dict[str, float]]:
    """``{M: {layer: ratio}}`` for ``owl(outlier_ratios=...)``; with ``groups``, per block."""
    missing = [name for name in weights if name not in input_norms]
    if missing:
        raise ValueError(f"input_norms has no entry for layers {missing}")
    blocks: dict[str, list[str]] = {}
    for name in weights:
        blocks.setdefault(groups.get(name, name) if groups else name, []).append(name)
    out: dict[float, dict[str, float]] = {}
    for m in ms:
        row: dict[str, float] = {}
        for members in blocks.values():
            ratio = outlier_ratio([weights[n] for n in members],
                                  [input_norms[n] for n in members], m)
            row.update(dict.fromkeys(members, ratio))
        out[float(m)] = row
    return out
