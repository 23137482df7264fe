"""Stored size, MACs and bit operations of a candidate: pure functions of the layer table.

Size counts every bit a deployment stores (see the README's "Size formula"):

    left    = kept rows x kept input columns x kernel: what channel groups leave of the layer
              (its own kept output channels and the kept channels of what feeds it)
    values  = kept weights of ``left`` x bits
    index   = unstructured: min(bitmask, column index per kept value + per-row count) over left
              N:M: ceil(log2 M) bits per kept value;  a group's leader: one bit per channel
    scales  = one fp32 scale per kept output channel when bits < 32
    bias    = fp32 per kept output channel
    rest    = every parameter outside the searched layers at fp32, less the batch-norm
              parameters of removed channels

MACs count the multiply-accumulates left after pruning (the ideal a sparse kernel could reach;
whether a device reaches it is the hardware cost model's business). BOPs = MACs x weight bits x
activation bits, with activations at 32 bits because only weights are quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .candidate import CHANNEL, DENSE, FLOAT_BITS, UNSTRUCTURED, Candidate, LayerChoice, parse_nm
from .layers import LayerInfo, LayerTable
from .structure import LayerStructure, layer_structures, other_params_removed

ACTIVATION_BITS = 32
SCALE_BITS = 32
BIAS_BITS = 32


@dataclass(frozen=True)
class LayerFootprint:
    name: str
    kept_weights: int
    kept_channels: int
    value_bits: int
    index_bits: int
    scale_bits: int
    bias_bits: int
    macs: float
    bops: float

    @property
    def total_bits(self) -> int:
        return self.value_bits + self.index_bits + self.scale_bits + self.bias_bits


@dataclass(frozen=True)
class Footprint:
    layers: tuple[LayerFootprint, ...]
    other_bits: int

    @property
    def total_bits(self) -> int:
        return sum(layer.total_bits for layer in self.layers) + self.other_bits

    @property
    def size_kb(self) -> float:
        return self.total_bits / 8 / 1000

    @property
    def macs(self) -> float:
        return sum(layer.macs for layer in self.layers)

    @property
    def bops(self) -> float:
        return sum(layer.bops for layer in self.layers)


def _bits_for(count: int) -> int:
    return max(1, math.ceil(math.log2(count))) if count > 1 else 1


def _own_structure(layer: LayerInfo, choice: LayerChoice) -> LayerStructure:
    """A layer on its own: a channel choice keeps its rows (one channel at a time), nothing
    else changes. Per-layer estimates (the allocation planner) use this; a whole candidate's
    footprint uses the groups (:func:`model_footprint`)."""
    rows = layer.out_channels
    if choice.pattern == CHANNEL:
        rows = max(1, rows - round(choice.sparsity * rows))
    return LayerStructure(rows, layer.in_columns, layer.name if choice.pattern == CHANNEL else None)


def layer_footprint(layer: LayerInfo, choice: LayerChoice,
                    structure: LayerStructure | None = None) -> LayerFootprint:
    structure = structure or _own_structure(layer, choice)
    n_full = layer.weight_count
    rows = kept_rows = structure.kept_rows
    n = structure.weight_count(layer)
    row = n // rows
    if choice.pattern == DENSE:
        kept, index = n, 0
    elif choice.pattern == UNSTRUCTURED:
        kept = n - round(choice.sparsity * n)
        csr = kept * _bits_for(row) + rows * _bits_for(row + 1)
        index = min(n, csr)
    elif choice.pattern == CHANNEL:
        kept, index = n, 0
    else:
        keep, group = parse_nm(choice.pattern)  # type: ignore[misc]
        kept = n * keep // group
        index = kept * _bits_for(group)
    if structure.leads is not None:
        index += layer.out_channels  # the group's channel bitmask, stored once, with its leader
    quantized = choice.bits < FLOAT_BITS
    macs = layer.macs * kept / n_full if n_full else 0.0
    return LayerFootprint(
        name=layer.name,
        kept_weights=kept,
        kept_channels=kept_rows,
        value_bits=kept * choice.bits,
        index_bits=index,
        scale_bits=kept_rows * SCALE_BITS if quantized else 0,
        bias_bits=layer.kept_bias(kept_rows) * BIAS_BITS,
        macs=macs,
        bops=macs * choice.bits * ACTIVATION_BITS,
    )


def model_footprint(table: LayerTable, candidate: Candidate) -> Footprint:
    """Footprint of every layer in the table; layers the candidate omits count as dense fp32."""
    structures = layer_structures(table, candidate)
    layers = tuple(layer_footprint(layer, candidate.get_choice(layer.name), structures[layer.name])
                   for layer in table.layers)
    other = table.other_params - other_params_removed(table, candidate)
    return Footprint(layers=layers, other_bits=other * FLOAT_BITS)


def footprint_metrics(table: LayerTable, candidate: Candidate) -> dict[str, float]:
    """The cost metrics a search objective or constraint can name, plus helpful extras."""
    footprint = model_footprint(table, candidate)
    dense = model_footprint(table, Candidate({}))
    total_weights = sum(layer.weight_count for layer in table.layers)
    kept_weights = sum(layer.kept_weights for layer in footprint.layers)
    return {
        "size_kb": footprint.size_kb,
        "compression": dense.total_bits / footprint.total_bits,
        "macs": footprint.macs,
        "bops": footprint.bops,
        "weight_sparsity": 1.0 - kept_weights / max(1, total_weights),
    }
