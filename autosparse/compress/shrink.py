"""Physical removal of the channel groups a candidate prunes, so they cost nothing deployed.

The search scores a candidate by what is *left* of each layer after its channel groups (see
``structure.py``): a group's leader chose ``channel``, so every producer of the group loses those
output rows, every consumer the input columns they feed, every batch norm in between those
entries. ``compress_model`` zeroes exactly these rows and columns, so nothing a batch-norm shift
or an activation leaves in a removed channel reaches a kept computation. Removing them for real
is therefore exact by construction: :func:`shrink_model` hands each pruned group to
Torch-Pruning (``graph.remove_channels``, the library discovery traced the groups with and
checked each one against), then verifies the result three ways (every layer's shape equals the
structure the footprint counted, the parameter count equals the prediction, the outputs equal
the baked model's). Any mismatch is a :class:`ShrinkError`: the export would not be what the
search scored.

Layer rule: torch (and torch_pruning through ``graph``) only, never optuna or mlflow.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autosparse.compress.apply import structural_keep
from autosparse.space.candidate import Candidate
from autosparse.space.discovery import example_input
from autosparse.space.graph import (
    CHECK_TOLERANCE,
    ChannelGraph,
    remove_channels,
    removed_channels,
)
from autosparse.space.layers import LayerTable
from autosparse.space.structure import (
    channel_groups,
    layer_structures,
    parameter_count,
    pruned_by_group,
)
from autosparse.workload.devices import eval_mode

__all__ = ["GroupShrink", "ShrinkError", "ShrinkReport", "expected_shapes",
           "predicted_parameters", "remove_groups", "shrink_as_compressed", "shrink_model",
           "OUTPUT_TOLERANCE"]

OUTPUT_TOLERANCE = CHECK_TOLERANCE  # max |shrunk - baked| / max |baked|: float32 reordering


class ShrinkError(RuntimeError):
    """Removing the candidate's channels did not give the model the search scored."""


# --------------------------------------------------------------------------------------------
# predictions (pure arithmetic on the layer table)


def expected_shapes(table: LayerTable, candidate: Mapping) -> dict[str, tuple[int, ...]]:
    """Weight shape of every table layer once the candidate's groups are removed:
    (kept rows, kept input columns, *kernel), exactly the structure the footprint counts."""
    structures = layer_structures(table, candidate)
    return {layer.name: (structures[layer.name].kept_rows, structures[layer.name].kept_columns,
                         *layer.weight_shape[2:])
            for layer in table.layers}


predicted_parameters = parameter_count  # one formula: what the search counts


# --------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class GroupShrink:
    """One removed channel group: its leader, who produced and who read the channels."""

    name: str
    leader: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    through: tuple[str, ...]
    channels_before: int
    channels_after: int
    unit: int = 1

    def to_dict(self) -> dict:
        return {"name": self.name, "leader": self.leader, "producers": list(self.producers),
                "consumers": list(self.consumers), "through": list(self.through),
                "channels_before": self.channels_before, "channels_after": self.channels_after,
                "unit": self.unit}

    def describe(self) -> str:
        heads = f" ({self.unit}-wide heads)" if self.unit > 1 else ""
        return (f"{self.name}: {self.channels_before} -> {self.channels_after} channels{heads} "
                f"in {', '.join(self.producers)}; read by {', '.join(self.consumers) or 'none'}")


@dataclass(frozen=True)
class ShrinkReport:
    """Per-group outcome plus parameter counts: before, after, and what the footprint predicts."""

    groups: tuple[GroupShrink, ...]
    parameters_before: int
    parameters_after: int
    parameters_predicted: int

    @property
    def shrunk(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> GroupShrink:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"group {name!r} is not in the report (shrunk: {', '.join(self.shrunk)})")

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups],
                "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after,
                "parameters_predicted": self.parameters_predicted}

    def describe(self) -> str:
        """Human lines, e.g. ``stem: 16 -> 8 channels in stem, blocks.0.conv2; read by ...``."""
        lines = [f"parameters: {self.parameters_before} -> {self.parameters_after} "
                 f"(predicted {self.parameters_predicted})"]
        lines += [g.describe() for g in self.groups] or ["no channel group pruned"]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# checks


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_zeros(modules: dict[str, nn.Module], graph: ChannelGraph, name: str,
                 keep: Tensor) -> None:
    """The removed channels must already be zeros in the baked model (its producers' rows and
    biases, its consumers' columns): otherwise ``kept`` is not the one it was compressed with."""
    for layer, rows in graph.rows[name].items():
        module = modules[layer]
        drop = rows[~keep]
        bias = getattr(module, "bias", None)
        if bool(module.weight.detach()[drop].any()) or (
                bias is not None and bool(bias.detach()[drop].any())):
            raise ShrinkError(f"group {name}: {layer} has nonzero weights in the channels to be "
                              "removed; are the kept channels those the model was compressed "
                              "with?")
    for layer, cols in graph.columns[name].items():
        if bool(modules[layer].weight.detach()[:, cols[~keep].flatten()].any()):
            raise ShrinkError(f"group {name}: consumer {layer} reads the channels to be removed "
                              "with nonzero weights; are these the kept channels of its "
                              "compression?")


def _check_shapes(shrunk: nn.Module, expected: dict[str, tuple[int, ...]]) -> None:
    modules = dict(shrunk.named_modules())
    wrong = {name: (tuple(modules[name].weight.shape), shape) for name, shape in expected.items()
             if tuple(modules[name].weight.shape) != shape}
    if wrong:
        detail = "; ".join(f"{n} is {got}, the footprint counted {want}"
                           for n, (got, want) in wrong.items())
        raise ShrinkError(f"the shrunk model's layers are not what the search scored: {detail}")


def _check_outputs(baked: nn.Module, shrunk: nn.Module, example: Tensor) -> None:
    with eval_mode(baked), eval_mode(shrunk), torch.no_grad():
        want, got = baked(example), shrunk(example)
    if not isinstance(want, Tensor) or not isinstance(got, Tensor) or want.shape != got.shape:
        raise ShrinkError("the shrunk model's output does not have the baked model's shape")
    scale = float(want.abs().max()) or 1.0
    error = float((want - got).abs().max()) / scale
    if not error <= OUTPUT_TOLERANCE:
        raise ShrinkError(f"the shrunk model's outputs differ from the baked model's by "
                          f"{error:.2e} relative (allowed {OUTPUT_TOLERANCE:.0e})")


# --------------------------------------------------------------------------------------------
# entry point


def _removed(table: LayerTable, candidate: Mapping, kept: Mapping[str, Tensor]
             ) -> dict[str, list[int]]:
    """Channel indices (in the leader's numbering) each pruned group loses, checked against the
    count the footprint assumed."""
    pruned = {name: count for name, count in pruned_by_group(table, candidate).items() if count}
    missing = sorted(set(pruned) - set(kept))
    if missing:
        raise ShrinkError(f"no kept-channel mask for the pruned groups {', '.join(missing)}")
    groups = {g.name: g for g in channel_groups(table)}
    removed = {}
    for name, count in sorted(pruned.items(), key=lambda kv: list(groups).index(kv[0])):
        idxs = removed_channels(groups[name], kept[name].to(torch.bool).cpu())
        if len(idxs) != count:
            raise ShrinkError(f"group {name}: the kept mask removes {len(idxs)} channels, the "
                              f"candidate prunes {count}")
        removed[name] = idxs
    return removed


def remove_groups(model: nn.Module, example: Tensor, removed: Mapping[str, list[int]]) -> None:
    """Remove each group's channels (by leader name) from ``model`` in place, one group per
    Torch-Pruning call (a fresh trace each, so a failure names its group). Export and
    ``load_packed`` both go through here, so a loaded skeleton gets the very same layout."""
    was_training = model.training
    model.eval()
    try:
        for name, idxs in removed.items():
            try:
                remove_channels(model, example, {name: list(idxs)})
            except Exception as err:  # noqa: BLE001 - any Torch-Pruning failure is fatal here
                raise ShrinkError(f"Torch-Pruning could not remove group {name} "
                                  f"({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)


def shrink_model(baked: nn.Module, candidate: Candidate, table: LayerTable,
                 graph: ChannelGraph | None,
                 kept: Mapping[str, Tensor], example: Tensor) -> tuple[nn.Module, ShrinkReport]:
    """A physically smaller copy of a *baked* compressed model: every pruned group removed.

    ``kept`` is the third result of ``compress.structural_keep`` on the dense model (the same
    masks ``compress_model`` used); ``example`` is one input batch (tracing and the output
    check). Each group goes to Torch-Pruning on its own, so a failure names its group. Raises
    :class:`ShrinkError` unless the copy has the shapes and parameter count the footprint
    predicts and gives the baked model's eval-mode outputs. ``baked`` is not modified.
    """
    if any(parametrize.is_parametrized(m) for m in baked.modules()):
        raise ValueError("shrink_model needs a baked model: call compress.bake(model) first")
    removed = _removed(table, candidate, kept)
    if removed and graph is None:
        raise ShrinkError(f"the candidate prunes {', '.join(removed)} but no channel graph was "
                          "given (discovery.discover returns it)")
    modules = dict(baked.named_modules())
    for name in removed:
        _check_zeros(modules, graph, name, kept[name].to(torch.bool).cpu())
    shrunk = copy.deepcopy(baked)
    remove_groups(shrunk, example, removed)
    _check_shapes(shrunk, expected_shapes(table, candidate))
    predicted = predicted_parameters(table, candidate)
    after = _count(shrunk)
    if after != predicted:
        raise ShrinkError(f"the shrunk model has {after} parameters, the footprint predicts "
                          f"{predicted}")
    _check_outputs(baked, shrunk, example)
    groups = {g.name: g for g in channel_groups(table)}
    report = tuple(
        GroupShrink(name, groups[name].producers[0], groups[name].producers,
                    tuple(c for c, _ in groups[name].consumers), groups[name].through,
                    groups[name].channels, groups[name].channels - len(idxs), groups[name].unit)
        for name, idxs in removed.items())
    return shrunk, ShrinkReport(report, _count(baked), after, predicted)


def shrink_as_compressed(baked: nn.Module, dense: nn.Module, candidate: Candidate,
                         table: LayerTable, graph: ChannelGraph | None,
                         scores: Mapping[str, Tensor] | None = None
                         ) -> tuple[nn.Module, ShrinkReport, dict[str, Tensor]]:
    """:func:`shrink_model` removing exactly the channels compression chose: the kept masks are
    recomputed on the dense model with the same scores. Returns (shrunk, report, kept)."""
    _, _, kept = structural_keep(dense, candidate, graph, scores)
    kept = {name: mask.cpu() for name, mask in kept.items()}
    shrunk, report = shrink_model(baked, candidate, table, graph, kept,
                                  example_input(baked, table.input_shape))
    return shrunk, report, kept
