"""Which channels a candidate removes, per layer: pure arithmetic on the layer table's groups.

A channel group (found at discovery, see ``graph.py``) is pruned when its *leader* (its first
producer) chooses the ``channel`` pattern. Then every producer loses those output rows and every
consumer loses the input columns they feed; each layer's own pattern (unstructured, N:M) and
bits apply to what is left. Size, MACs, latency and energy are all computed from this one
structure, and export removes exactly these channels, so the scores are what deploys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping

from autosparse.space.candidate import CHANNEL, LayerChoice, parse_nm
from autosparse.space.layers import ChannelGroup, LayerInfo, LayerTable


@dataclass(frozen=True)
class LayerStructure:
    """What is left of one layer's weight after channel groups: kept rows x kept input columns."""

    kept_rows: int
    kept_columns: int
    leads: str | None = None  # the group this layer leads, when it chose channel

    def weight_count(self, layer: LayerInfo) -> int:
        return self.kept_rows * self.kept_columns * layer.kernel_elements


def channel_groups(table: LayerTable) -> tuple[ChannelGroup, ...]:
    """The table's groups. A table built by hand (no graph traced, no error) treats each layer
    as its own group with no consumers: channel pruning then only counts the layer's own rows."""
    if table.channel_groups or table.graph_error is not None:
        return table.channel_groups
    return tuple(ChannelGroup(layer.name, (layer.name,), (), layer.out_channels)
                 for layer in table.layers if layer.out_channels > 1)


def leaders(table: LayerTable) -> dict[str, ChannelGroup]:
    """Group by leader name, for the groups export can remove."""
    return {g.producers[0]: g for g in channel_groups(table) if g.blocked is None and g.producers}


def pruned_by_group(table: LayerTable, candidate: Mapping[str, LayerChoice]) -> dict[str, int]:
    """Channels each group loses under the candidate (only groups whose leader chose channel).

    A ``channel`` choice on a layer that leads no removable group is an error: the search only
    offers channel on leaders, and scoring something export cannot deploy would break the promise.
    """
    led = leaders(table)
    out: dict[str, int] = {}
    for name, choice in candidate.items():
        if choice.pattern != CHANNEL:
            continue
        group = led.get(name)
        if group is None:
            raise ValueError(f"layer {name!r} cannot be channel-pruned: {channel_blocker(table, name)}")
        out[group.name] = group.pruned_channels(choice.sparsity)
    return out


def layer_structures(table: LayerTable, candidate: Mapping[str, LayerChoice]
                     ) -> dict[str, LayerStructure]:
    """Kept rows and input columns of every layer in the table under the candidate."""
    pruned = pruned_by_group(table, candidate)
    rows = {layer.name: layer.out_channels for layer in table.layers}
    columns = {layer.name: layer.in_columns for layer in table.layers}
    lead: dict[str, str] = {}
    for group in channel_groups(table):
        removed = pruned.get(group.name, 0)
        if not removed:
            continue
        lead[group.producers[0]] = group.name
        for producer in group.producers:
            rows[producer] -= removed
        for consumer, per_channel in group.consumers:
            columns[consumer] -= removed * per_channel
    out = {}
    for layer in table.layers:
        structure = LayerStructure(rows[layer.name], columns[layer.name], lead.get(layer.name))
        if structure.kept_rows < 1 or structure.kept_columns < 1:
            raise ValueError(f"layer {layer.name!r} would keep {structure.kept_rows} rows and "
                             f"{structure.kept_columns} input columns")
        check_pattern_fits(layer, candidate.get(layer.name), structure)
        out[layer.name] = structure
    return out


def check_pattern_fits(layer: LayerInfo, choice: LayerChoice | None,
                       structure: LayerStructure) -> None:
    """N:M needs the reduction length left after channel pruning to be a multiple of M."""
    nm = parse_nm(choice.pattern) if choice is not None else None
    if nm is None:
        return
    row = structure.kept_columns * layer.kernel_elements
    if row % nm[1]:
        why = (f"channel pruning of its inputs leaves {structure.kept_columns} input columns x "
               f"{layer.kernel_elements} = {row}" if structure.kept_columns < layer.in_columns
               else f"it is {row}")
        raise ValueError(f"layer {layer.name!r}: {choice.pattern} needs its reduction length to "
                         f"be a multiple of {nm[1]}, but {why}")


def other_params_removed(table: LayerTable, candidate: Mapping[str, LayerChoice]) -> int:
    """Parameters outside searched layers (batch norm) removed with the pruned channels."""
    pruned = pruned_by_group(table, candidate)
    return sum(pruned.get(g.name, 0) * g.other_params for g in channel_groups(table))


def parameter_count(table: LayerTable, candidate: Mapping[str, LayerChoice]) -> int:
    """Parameters of the physically shrunk model: what is left of every layer (zeros of its own
    pattern included: they are values of a dense tensor) plus the other parameters left."""
    structures = layer_structures(table, candidate)
    layers = sum(structures[layer.name].weight_count(layer)
                 + layer.kept_bias(structures[layer.name].kept_rows)
                 for layer in table.layers)
    return layers + table.other_params - other_params_removed(table, candidate)


def producer_group(table: LayerTable, name: str) -> ChannelGroup | None:
    return next((g for g in channel_groups(table) if name in g.producers), None)


def channel_blocker(table: LayerTable, name: str,
                    searched: Collection[str] | None = None) -> str | None:
    """Why ``channel`` is not offered to a layer (None: it is offered).

    Channel pruning is offered on a group's leader only, when export can remove the group and
    every producer is searched (an excluded layer must not lose channels behind the user's back).
    """
    if table.graph_error is not None:
        return f"no dependency graph: {table.graph_error}"
    group = producer_group(table, name)
    if group is None:
        return "its output channels are in no channel group (not traced by the dependency graph)"
    if group.blocked is not None:
        return group.blocked
    if group.producers[0] != name:
        return f"its channels follow {group.producers[0]!r} (group {group.name})"
    if searched is not None:
        excluded = [p for p in group.producers if p not in searched]
        if excluded:
            return (f"its channels are tied to {', '.join(excluded)}, which the config excludes "
                    "from the search")
    return None


def describe_group(group: ChannelGroup) -> str:
    """One line for ``autosparse space``."""
    consumers = ", ".join(name for name, _ in group.consumers) or "none"
    unit = f", in units of {group.unit} (attention heads)" if group.unit > 1 else ""
    through = f"; through {', '.join(group.through)}" if group.through else ""
    state = f"not offered: {group.blocked}" if group.blocked else f"led by {group.producers[0]}"
    return (f"{group.name}: {group.channels} channels{unit} from {', '.join(group.producers)} "
            f"into {consumers}{through} - {state}")


__all__ = [
    "LayerStructure", "channel_groups", "leaders", "pruned_by_group", "layer_structures",
    "check_pattern_fits", "other_params_removed", "parameter_count", "producer_group", "channel_blocker",
    "describe_group",
]
