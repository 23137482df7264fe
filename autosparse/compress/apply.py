"""Compression of a model copy through ``torch.nn.utils.parametrize``: fixed masks x fake-quant.

A candidate (``{layer: LayerChoice}``) becomes, on each listed layer, one parametrization on the
weight that re-applies a fixed sparsity mask and per-output-channel symmetric fake quantization on
every forward pass (straight-through estimator for the gradient), so fine-tuning trains the
underlying dense ``original`` tensor while the zeros stay zero and the values stay on the grid.
``bake`` removes the parametrizations and leaves the compressed values as plain weights.

Patterns (masks are computed once, from the dense weights or from given importance scores):

- ``unstructured``: the ``round(sparsity * numel)`` lowest-scoring weights are zeroed (exact).
- ``N:M``: groups of M consecutive weights along the reduction dimension, input channels fastest
  (conv ``(O, I, *k)`` is viewed as ``(O, *k, I)``), keep the N highest-scoring per group.
- ``channel`` (only on a channel group's leader, see ``graph.py``): the group's lowest-scoring
  channels (row norms summed over its producers, each normalised by its mean; whole heads for
  attention) are zeroed in every producer's rows and biases *and in every consumer's input
  columns*. So nothing a batch norm shift or an activation leaves in a removed channel ever
  reaches a kept computation: the fine-tuned model computes exactly what the shrunk export does.
  A layer whose rows or columns a group removed applies its own pattern to what is left.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Collection, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autosparse.space.candidate import (
    CHANNEL,
    DENSE,
    FLOAT_BITS,
    UNSTRUCTURED,
    Candidate,
    LayerChoice,
    parse_nm,
)
from autosparse.space.graph import ChannelGraph
from autosparse.space.layers import ChannelGroup

__all__ = [
    "MaskedQuantizer",
    "BiasMask",
    "compute_mask",
    "pruned_count",
    "qmax_for_bits",
    "fake_quant",
    "taylor_scores",
    "compress_model",
    "bake",
    "layer_sparsity",
    "weight_mask",
    "channel_keep",
    "structural_keep",
]


# --------------------------------------------------------------------------------------------
# masks


def pruned_count(choice: LayerChoice, total: int) -> int:
    """How many of ``total`` items (weights, or output channels) a sparsity prunes.

    ``round(sparsity * total)``; the ``channel`` caller additionally keeps at least one channel.
    """
    return int(round(choice.sparsity * total))


def _nm_view_perm(ndim: int) -> tuple[int, ...]:
    """Permutation (O, I, *k) -> (O, *k, I) so that input channels run fastest."""
    return (0, *range(2, ndim), 1)


def _check_scores(weight: Tensor, scores: Tensor | None) -> Tensor:
    if scores is None:
        return weight.detach().abs()
    if scores.shape != weight.shape:
        raise ValueError(
            f"scores shape {tuple(scores.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    return scores.detach().to(device=weight.device)


def compute_mask(weight: Tensor, choice: LayerChoice, scores: Tensor | None = None) -> Tensor:
    """A boolean keep-mask (True = kept) of ``weight``'s shape for ``choice``'s pattern.

    ``scores`` (same shape as ``weight``; higher = more important) default to ``|weight|``.
    Ties are broken deterministically (the lower flat index is pruned first).
    Raises ValueError when the pattern does not fit the layer (N:M row length not a multiple
    of M, channel pruning of a single-channel layer), mirroring ``LayerInfo.supports``.
    """
    if weight.dim() < 2:
        raise ValueError(
            f"weight must have at least 2 dims (out, in, ...), got {tuple(weight.shape)}"
        )
    pattern = choice.pattern
    if pattern == DENSE or choice.sparsity == 0.0:
        return torch.ones_like(weight, dtype=torch.bool)
    out_channels = weight.shape[0]
    row_length = weight.numel() // out_channels
    nm = parse_nm(pattern)

    if pattern == UNSTRUCTURED:
        s = _check_scores(weight, scores).reshape(-1).float()
        k = pruned_count(choice, s.numel())
        mask = torch.ones(s.numel(), dtype=torch.bool, device=weight.device)
        if k > 0:
            order = torch.argsort(s, stable=True)
            mask[order[:k]] = False
        return mask.reshape(weight.shape)

    if nm is not None:
        n, m = nm
        if row_length % m != 0:
            raise ValueError(
                f"pattern {pattern} needs the reduction length per output channel ({row_length}, "
                f"weight shape {tuple(weight.shape)}) to be a multiple of {m}"
            )
        perm = _nm_view_perm(weight.dim())
        s = _check_scores(weight, scores).float().permute(perm)
        permuted_shape = s.shape
        groups = s.reshape(out_channels, row_length // m, m)
        # descending + stable: among equal scores the earlier weight is kept
        keep = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        inverse = [0] * len(perm)
        for i, p in enumerate(perm):
            inverse[p] = i
        return mask.reshape(permuted_shape).permute(inverse).contiguous()

    if pattern == CHANNEL:
        if out_channels < 2:
            raise ValueError(
                f"channel pruning needs more than one output channel (weight {tuple(weight.shape)})"
            )
        flat = weight.detach().reshape(out_channels, -1).float()
        if scores is None:
            row_scores = flat.norm(dim=1)
        else:
            row_scores = _check_scores(weight, scores).reshape(out_channels, -1).float().sum(dim=1)
        k = min(pruned_count(choice, out_channels), out_channels - 1)
        keep_rows = torch.ones(out_channels, dtype=torch.bool, device=weight.device)
        if k > 0:
            keep_rows[torch.argsort(row_scores, stable=True)[:k]] = False
        return keep_rows.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()

    raise ValueError(f"unknown pattern {pattern!r}")


# --------------------------------------------------------------------------------------------
# fake quantization


def qmax_for_bits(bits: int) -> int:
    """Largest integer level of symmetric ``bits``-bit quantization: ``2**(bits-1) - 1``."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits {bits!r} must be from 2 to 16 to quantize (32 means float)")
    return 2 ** (bits - 1) - 1


def _per_row_scale(w: Tensor, qmax: int) -> Tensor:
    """Per-output-channel scale ``max|w_row| / qmax`` shaped to broadcast.

    All-zero rows (pruned channels) get the smallest normal float instead of 0, so they quantize
    to exactly 0 instead of 0/0.
    """
    amax = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    return amax.div_(qmax).clamp_min_(torch.finfo(amax.dtype).tiny)


def _fake_quant(w: Tensor, qmax: int) -> Tensor:
    scale = _per_row_scale(w, qmax)
    # |w| <= max|w_row| = qmax * scale, so the rounded level is already in [-qmax, qmax]: no clamp
    q = w.detach().div(scale).round_().mul_(scale)
    # straight-through estimator whose *value* is exactly q: (w - w.detach()) is exactly 0
    return q + (w - w.detach())


def fake_quant(weight: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric fake quantization with a straight-through gradient.

    ``bits`` 2..16: integer levels ``[-(2^(b-1)-1), 2^(b-1)-1]`` times ``max|w_row| / qmax``,
    round-to-nearest; ``bits == 32`` is the identity (float32 weights).
    """
    if bits == FLOAT_BITS:
        return weight
    if weight.dim() < 1:
        raise ValueError("weight must have an output-channel dimension")
    return _fake_quant(weight, qmax_for_bits(bits))


class MaskedQuantizer(nn.Module):
    """Parametrization ``w -> fake_quant(w * mask, bits)`` with a fixed mask buffer.

    ``mask`` may be None (dense, quantize only); ``bits == 32`` skips quantization (mask only).
    The scale is computed from the masked weights on each call (they change while fine-tuning);
    everything else is precomputed, and there is no Python loop over channels.
    """

    def __init__(self, mask: Tensor | None, bits: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not (bits == FLOAT_BITS or 2 <= bits <= 16):
            raise ValueError(f"bits {bits!r} must be from 2 to 16, or 32 (float)")
        self.bits = int(bits)
        self.qmax = 0 if bits == FLOAT_BITS else qmax_for_bits(bits)
        if mask is not None:
            mask = mask.to(dtype)
        self.register_buffer("mask", mask)

    def forward(self, w: Tensor) -> Tensor:
        if self.mask is not None:
            w = w * self.mask
        if self.qmax:
            w = _fake_quant(w, self.qmax)
        return w

    def extra_repr(self) -> str:
        density = "dense" if self.mask is None else f"density={float(self.mask.mean()):.3f}"
        return f"bits={self.bits}, {density}"


class BiasMask(nn.Module):
    """Parametrization ``b -> b * keep`` zeroing the bias of pruned output channels."""

    def __init__(self, keep: Tensor):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, b: Tensor) -> Tensor:
        return b * self.keep


# --------------------------------------------------------------------------------------------
# importance scores


def _weight_of(module: nn.Module) -> Tensor:
    """The trainable weight tensor: the parametrization's ``original`` when parametrized."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _get_layer(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        raise KeyError(f"layer {name!r} is not a module of the model")
    module = modules[name]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has no weight of shape (out, in, ...) "
            "to compress"
        )
    return module


def taylor_scores(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    layer_names: Collection[str],
    max_batches: int,
    loss: Callable[[Any, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """First-order Taylor importance ``sum_batches |w * dL/dw|`` for the named layers.

    ``L`` is cross-entropy on the labels (or ``loss(outputs, y)``, a task's own: MSE, token
    cross-entropy), the model runs in eval mode (batch-norm statistics are
    not touched). Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is left on
    the model and its weights, train/eval mode and ``requires_grad`` flags are as before.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches!r}")
    modules = dict(model.named_modules())
    names = list(layer_names)
    weights = [_weight_of(_get_layer(modules, name)) for name in names]
    scores = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    if not names:
        return {}
    device = weights[0].device
    was_training = model.training
    flags = [w.requires_grad for w in weights]
    used = 0
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        for x, y in batches:
            if used >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            with torch.enable_grad():
                value = F.cross_entropy(model(x), y) if loss is None else loss(model(x), y)
                grads = torch.autograd.grad(value, weights, allow_unused=True)
            for acc, w, g in zip(scores, weights, grads):
                if g is not None:
                    acc.add_((w.detach() * g).abs().float())
            used += 1
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)
    if used == 0:
        raise ValueError("taylor_scores got no batches")
    return dict(zip(names, scores))


# --------------------------------------------------------------------------------------------
# channel groups


def _row_importance(weight: Tensor, scores: Tensor | None) -> Tensor:
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    if scores is None:
        value = rows.norm(dim=1)
    else:
        value = scores.detach().reshape(weight.shape[0], -1).float().sum(dim=1)
    return value / value.mean().clamp_min(torch.finfo(value.dtype).tiny)


def channel_keep(modules: Mapping[str, nn.Module], graph: ChannelGraph, group: ChannelGroup,
                 choice: LayerChoice, scores: Mapping[str, Tensor] | None = None) -> Tensor:
    """Boolean keep-mask over the group's channels for the leader's ``channel`` choice.

    Importance is the sum over producers of their normalised row norms (Taylor row sums when the
    leader's criterion is taylor and scores exist), added up per unit (head); the
    ``group.pruned_channels`` lowest units go, ties broken by the lower index first.
    """
    total = torch.zeros(group.channels)
    for name, rows in graph.rows[group.name].items():
        weight = _weight_of(modules[name])
        layer_scores = scores.get(name) if scores and choice.criterion == "taylor" else None
        total += _row_importance(weight, layer_scores).cpu()[rows]
    per_unit = total.reshape(group.units, group.unit).sum(dim=1)
    drop = group.pruned_channels(choice.sparsity) // group.unit
    keep_units = torch.ones(group.units, dtype=torch.bool)
    if drop:
        keep_units[torch.argsort(per_unit, stable=True)[:drop]] = False
    return keep_units.repeat_interleave(group.unit)


def structural_keep(model: nn.Module, candidate: Mapping[str, LayerChoice],
                    graph: ChannelGraph | None, scores: Mapping[str, Tensor] | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(rows kept per layer, input columns kept per layer, channels kept per group) for the
    candidate's channel choices; layers a group does not touch are absent. With no ``graph``
    (a layer table built by hand) nothing is structural."""
    rows: dict[str, Tensor] = {}
    cols: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    leaders = {g.producers[0]: g for g in (graph.groups if graph else ()) if g.blocked is None}
    modules = dict(model.named_modules())
    for name, choice in candidate.items():
        if choice.pattern != CHANNEL or graph is None:
            continue  # without a graph, a channel choice zeroes its own rows only (compute_mask)
        group = leaders.get(name)
        if group is None:
            raise ValueError(f"layer {name!r} leads no channel group export can remove")
        keep = channel_keep(modules, graph, group, choice, scores)
        kept[group.name] = keep
        for producer, index in graph.rows[group.name].items():
            module_rows = rows.setdefault(producer, torch.ones(_weight_of(modules[producer]).shape[0],
                                                               dtype=torch.bool))
            module_rows[index[~keep]] = False
        for consumer, index in graph.columns[group.name].items():
            weight = _weight_of(modules[consumer])
            module_cols = cols.setdefault(consumer, torch.ones(weight.shape[1], dtype=torch.bool))
            module_cols[index[~keep].flatten()] = False
    return rows, cols, kept


def _structured_mask(weight: Tensor, choice: LayerChoice, scores: Tensor | None,
                     rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """The layer's own pattern applied to the rows and columns the channel groups left."""
    device = weight.device
    row_idx = (torch.nonzero(rows).flatten() if rows is not None
               else torch.arange(weight.shape[0])).to(device)
    col_idx = (torch.nonzero(cols).flatten() if cols is not None
               else torch.arange(weight.shape[1])).to(device)
    full = torch.zeros_like(weight, dtype=torch.bool)
    if choice.pattern in (DENSE, CHANNEL):
        sub_mask = torch.ones((len(row_idx), len(col_idx), *weight.shape[2:]), dtype=torch.bool,
                              device=device)
    else:
        sub = weight.detach()[row_idx][:, col_idx]
        sub_scores = None if scores is None else scores.to(device)[row_idx][:, col_idx]
        sub_mask = compute_mask(sub, choice, sub_scores)
    block = torch.zeros((len(row_idx), *weight.shape[1:]), dtype=torch.bool, device=device)
    block[:, col_idx] = sub_mask
    full[row_idx] = block
    return full


# --------------------------------------------------------------------------------------------
# models


def compress_model(
    dense: nn.Module,
    candidate: Candidate | Mapping[str, LayerChoice],
    scores: Mapping[str, Tensor] | None = None,
    graph: ChannelGraph | None = None,
    keep: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
) -> nn.Module:
    """A deep copy of ``dense`` with the candidate's masks and fake-quant as parametrizations.

    Masks come from the dense weights (magnitude) or, for layers whose criterion is ``taylor``,
    from ``scores[name]`` (see :func:`taylor_scores`). Channel choices prune their whole group
    (``graph``, from ``trace_channel_groups``), including layers the candidate does not list;
    ``keep`` is :func:`structural_keep`'s (rows, columns) for a caller that needs them too.
    Layers left dense fp32 are untouched. ``dense`` itself is not modified.
    """
    model = copy.deepcopy(dense)
    modules = dict(model.named_modules())
    rows, cols = keep if keep is not None else structural_keep(model, candidate, graph, scores)[:2]
    names = list(dict.fromkeys([*candidate, *rows, *cols]))
    for name in names:
        choice = candidate.get(name, DENSE_CHOICE)
        module = _get_layer(modules, name)
        structured = name in rows or name in cols
        if choice.pattern == DENSE and choice.bits == FLOAT_BITS and not structured:
            continue
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"layer {name!r} is already parametrized; compress a dense model")
        weight = module.weight
        layer_scores = None
        if choice.criterion == "taylor" and choice.pattern != DENSE:
            if scores is None or name not in scores:
                raise ValueError(
                    f"layer {name!r} asks for criterion 'taylor' but no Taylor scores were given "
                    "for it; compute them with taylor_scores(...) and pass scores="
                )
            layer_scores = scores[name]
        try:
            mask = None
            if structured:
                mask = _structured_mask(weight, choice, layer_scores, rows.get(name),
                                        cols.get(name))
            elif choice.pattern != DENSE:
                mask = compute_mask(weight, choice, layer_scores)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        parametrize.register_parametrization(
            module, "weight", MaskedQuantizer(mask, choice.bits, dtype=weight.dtype)
        )
        bias = getattr(module, "bias", None)
        keep_rows = rows.get(name)
        if keep_rows is None and choice.pattern == CHANNEL:  # no graph: the layer's own rows
            keep_rows = mask.reshape(mask.shape[0], -1).any(dim=1)
        if keep_rows is not None and isinstance(bias, Tensor):
            keep = keep_rows.to(device=bias.device, dtype=bias.dtype)
            parametrize.register_parametrization(module, "bias", BiasMask(keep))
    return model


DENSE_CHOICE = LayerChoice(DENSE, 0.0, FLOAT_BITS)


def bake(model: nn.Module) -> nn.Module:
    """Remove all parametrizations, keeping the compressed values as plain parameters (in place)."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def weight_mask(model: nn.Module, name: str) -> Tensor | None:
    """The keep-mask of a compressed layer (as stored in its parametrization), or None."""
    module = dict(model.named_modules())[name]
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, MaskedQuantizer):
            return p.mask
    return None


def layer_sparsity(model: nn.Module, name: str) -> float:
    """Fraction of exactly-zero entries of the layer's effective weight (baked or parametrized)."""
    module = dict(model.named_modules())[name]
    with torch.no_grad():
        weight = module.weight
        return float((weight == 0).sum()) / weight.numel()
