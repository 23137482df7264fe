"""The model's dependency graph: which layers' channels must be removed together (Torch-Pruning).

Torch-Pruning's ``DependencyGraph`` traces the model once and, for any layer's output channels,
returns every coupled tensor: the batch norms and consumers behind it, the other producers a
residual add ties to it, a depthwise conv's channels, concat offsets, a flatten's columns. We turn
its groups into plain :class:`~autosparse.space.layers.ChannelGroup` records (for the pure search side)
plus the exact row and column indices per channel (for masks), and use the same library at export
to remove the channels physically.

A group is offered only if export can remove it exactly. Besides the rules below (model output,
normalisation across channels, modules autosparse does not prune), each candidate group is
*checked*: half its channels are masked in one copy and physically removed in another, and the
two must compute the same outputs. A group that fails is blocked with the reason.

Layer rule: torch (and torch_pruning) only, never optuna or mlflow.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from autosparse.space.layers import ChannelGroup
from autosparse.workload.devices import eval_mode

_PER_CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                      nn.InstanceNorm2d, nn.InstanceNorm3d)
_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
_HEAD_ATTRIBUTES = ("head_dim", "attention_head_size", "head_size")
CHANNEL_STEP = 4  # channels go in fours where a group allows: N:M consumers and SIMD lanes fit
CHECK_TOLERANCE = 1e-4  # relative: masked vs physically pruned outputs, in float32


@dataclass
class ChannelGraph:
    """Groups for the search plus, per group and layer, which rows/columns each channel is."""

    groups: tuple[ChannelGroup, ...]
    rows: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # group -> layer -> (C,)
    columns: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # group -> layer -> (C, r)
    error: str | None = None

    def group(self, name: str) -> ChannelGroup:
        return next(g for g in self.groups if g.name == name)


def build_dependency_graph(model: nn.Module, example: Tensor) -> tp.DependencyGraph:
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters": those groups get blocked below
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def _is_depthwise(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == module.in_channels == module.out_channels


def _not_channel_prunable(module: nn.Module) -> bool:
    """Embeddings and transformers' transposed Conv1D: searched for bits and sparsity only."""
    return isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"


def _head_unit(model_modules: dict[str, nn.Module], name: str, channels: int) -> int:
    """An attention projection's head width (its parent's ``head_dim``), else 1."""
    parent = model_modules.get(name.rsplit(".", 1)[0]) if "." in name else None
    for attribute in _HEAD_ATTRIBUTES:
        width = getattr(parent, attribute, None)
        if isinstance(width, int) and 1 < width < channels and channels % width == 0:
            return width
    return 1


def _per_channel(item_idxs: list[int], root_idxs: list[int], channels: int) -> Tensor:
    """(channels, r) indices of the layer dimension each group channel maps to."""
    buckets: list[list[int]] = [[] for _ in range(channels)]
    for idx, root in zip(item_idxs, root_idxs):
        buckets[int(root)].append(int(idx))
    width = len(buckets[0])
    if any(len(b) != width for b in buckets):
        raise ValueError("channels map to unequal numbers of columns")
    return torch.tensor(buckets, dtype=torch.long).reshape(channels, width)


def _group_of(dg: tp.DependencyGraph, module: nn.Module) -> tp.dependency.Group:
    channels = dg.get_out_channels(module)
    pruner = dg.get_pruner_of_module(module)
    return dg.get_pruning_group(module, pruner.prune_out_channels, idxs=list(range(channels)))


def _describe(group: tp.dependency.Group, dg: tp.DependencyGraph, layers: dict[int, str],
              names: dict[int, str], channels: int, modules: dict[str, nn.Module]
              ) -> tuple[ChannelGroup, dict[str, Tensor], dict[str, Tensor]]:
    producers, through, blocked = [], [], []
    consumers: dict[str, int] = {}
    rows: dict[str, Tensor] = {}
    columns: dict[str, Tensor] = {}
    other = 0
    for item in group:
        dep = item.dep
        target = dep.target.module
        out = dg.is_out_channel_pruning_fn(dep.handler)
        if out and not dep.target.outputs:
            blocked.append("its channels are the model's output")
        name = layers.get(id(target)) or names.get(id(target))
        if id(target) in layers and _not_channel_prunable(target):
            blocked.append(f"{name} ({type(target).__name__}) is not channel-pruned")
        elif id(target) in layers:
            if out:
                producers.append(name)
                rows[name] = _per_channel(item.idxs, item.root_idxs, channels)[:, 0]
            elif not _is_depthwise(target):
                if getattr(target, "groups", 1) > 1:
                    blocked.append(f"{name} is a grouped conv (groups={target.groups})")
                cols = _per_channel(item.idxs, item.root_idxs, channels)
                columns[name] = cols
                consumers[name] = cols.shape[1]
        elif isinstance(target, _CROSS_CHANNEL_NORMS):
            blocked.append(f"{name} ({type(target).__name__}) normalises across these channels, "
                           "so removing them would change its statistics")
        elif isinstance(target, _PER_CHANNEL_NORMS):
            if out and name not in through:
                through.append(name)
                other += sum(p.numel() for p in target.parameters(recurse=False)) // channels
        elif isinstance(target, nn.Parameter):
            blocked.append("a bare parameter (e.g. a position embedding) is added to them")
        elif isinstance(target, nn.Module) and not type(target).__module__.startswith(
                "torch_pruning"):
            blocked.append(f"{name or type(target).__name__} ({type(target).__name__}) is not a "
                           "layer autosparse prunes")
    order = list(layers.values())
    producers = sorted(set(producers), key=order.index)
    unit = _head_unit(modules, producers[0], channels) if producers else 1
    if not consumers and not blocked:
        blocked.append("no layer reads its channels (they reach the model's output)")
    units = channels // unit
    record = ChannelGroup(
        name=producers[0] if producers else "?", producers=tuple(producers),
        consumers=tuple(sorted(consumers.items(), key=lambda kv: order.index(kv[0]))),
        channels=channels, unit=unit, other_params=other, through=tuple(through),
        blocked=blocked[0] if blocked else None,
        step=CHANNEL_STEP if unit == 1 and units >= 2 * CHANNEL_STEP and units % CHANNEL_STEP == 0
        else 1,
    )
    return record, rows, columns


def trace_channel_groups(model: nn.Module, layers: dict[str, nn.Module], example: Tensor,
                         check: bool = True) -> ChannelGraph:
    """Every channel group of ``model``'s discovered ``layers``; never raises.

    A model Torch-Pruning cannot trace gets no groups and an ``error`` (channel pruning is then
    not offered anywhere, and ``autosparse space`` says why).
    """
    try:
        dg = build_dependency_graph(model, example)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "no channel pruning"
        return ChannelGraph((), error=f"{type(err).__name__}: {err}")
    layer_ids = {id(module): name for name, module in layers.items()}
    modules = dict(model.named_modules())
    names = {id(module): name for name, module in modules.items()}
    graph = ChannelGraph(())
    groups, covered = [], set()
    for name, module in layers.items():
        if (name in covered or module not in dg.module2node
                or dg.get_pruner_of_module(module) is None):
            continue  # never called by the forward pass, or a type Torch-Pruning cannot prune
        channels = int(dg.get_out_channels(module) or 0)
        if channels < 2:
            continue
        try:
            record, rows, columns = _describe(_group_of(dg, module), dg, layer_ids, names,
                                              channels, modules)
        except Exception as err:  # noqa: BLE001
            covered.add(name)
            groups.append(ChannelGroup(name, (name,), (), channels,
                                       blocked=f"the dependency graph failed: {err}"))
            continue
        covered.update(record.producers)
        graph.rows[record.name], graph.columns[record.name] = rows, columns
        groups.append(record)
    graph.groups = tuple(groups)
    if check:
        graph.groups = tuple(g if g.blocked else _checked(model, graph, g, example)
                             for g in graph.groups)
    return graph


def removed_channels(group: ChannelGroup, keep: Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(~keep).flatten()]


def zero_channels(model: nn.Module, graph: ChannelGraph, group: ChannelGroup,
                  keep: Tensor) -> None:
    """Zero the group's removed channels in ``model``'s weights: producer rows (and biases) and
    consumer columns. What then reaches any kept computation equals the pruned model's."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, rows in graph.rows[group.name].items():
            module = modules[name]
            drop = rows[~keep]
            module.weight[drop] = 0
            if getattr(module, "bias", None) is not None:
                module.bias[drop] = 0
        for name, cols in graph.columns[group.name].items():
            modules[name].weight[:, cols[~keep].flatten()] = 0


def remove_channels(model: nn.Module, example: Tensor, removed: dict[str, list[int]]) -> None:
    """Physically remove each group's channels (by leader name) from ``model``, in place."""
    if not any(removed.values()):
        return
    dg = build_dependency_graph(model, example)
    modules = dict(model.named_modules())
    for leader, idxs in removed.items():
        if idxs:
            module = modules[leader]
            pruner = dg.get_pruner_of_module(module)
            dg.get_pruning_group(module, pruner.prune_out_channels, idxs=list(idxs)).prune()


def _half_keep(group: ChannelGroup) -> Tensor:
    """Every other unit removed: a spread-out pattern that exercises offsets and heads."""
    unit_keep = torch.arange(group.units) % 2 == 0
    return unit_keep.repeat_interleave(group.unit)


def _checked(model: nn.Module, graph: ChannelGraph, group: ChannelGroup,
             example: Tensor) -> ChannelGroup:
    """Block the group unless masking half its channels equals removing them."""
    keep = _half_keep(group)
    try:
        masked = copy.deepcopy(model)
        zero_channels(masked, graph, group, keep)
        pruned = copy.deepcopy(masked)
        remove_channels(pruned, example, {group.name: removed_channels(group, keep)})
        with eval_mode(masked), eval_mode(pruned), torch.no_grad():
            want, got = masked(example), pruned(example)
        if not isinstance(want, Tensor) or want.shape != got.shape:
            raise ValueError("the output shape changed")
        scale = float(want.abs().max()) or 1.0
        error = float((want - got).abs().max()) / scale
        if error > CHECK_TOLERANCE:
            raise ValueError(f"outputs differ by {error:.2e} (relative)")
    except Exception as err:  # noqa: BLE001 - whatever fails, the group is not offered
        return ChannelGroup(**{**group.__dict__, "blocked": f"removing them failed the "
                                                            f"exactness check ({err})"})
    return group
