"""Stored size, MACs and bit operations of a candidate: pure functions of the layer table.

Size counts every bit a deployment stores (see the README's "Size formula"):

    left    = kept rows x kept input columns x kernel: what channel groups leave of the layer
              (its own kept output channels and the kept channels of what feeds it)
    values  = kept weights of ``left`` x bits
    index   = unstructured: min(bitmask, column index per kept value + per-row count) over left
              N:M: ceil(log2 M) bits per kept value;  a group's leader: one bit per channel
    measured (``zeros``: the fine-tuned weights are known) = values the quantizer rounded to
              zero are free like pruned ones, and the cheapest of dense values, bitmask, column
              index and a w-bit relative index (Deep Compression; its filler entries counted,
              w = 1..8) is stored; N:M keeps its fixed layout
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
from collections.abc import Mapping
from dataclasses import dataclass

from autosparse.space.candidate import (
    CHANNEL,
    DENSE,
    FLOAT_BITS,
    UNSTRUCTURED,
    Candidate,
    LayerChoice,
    parse_nm,
)
from autosparse.space.layers import LayerInfo, LayerTable
from autosparse.space.structure import (
    LayerStructure,
    layer_structures,
    other_params_removed,
)

ACTIVATION_BITS = 32
SCALE_BITS = 32
BIAS_BITS = 32


MAX_RELATIVE_BITS = 8


@dataclass(frozen=True)
class StoredZeros:
    """Measured on a compressed layer's stored tensor (what channel groups left, row-major):
    how many values are nonzero, and the filler entries a w-bit relative index needs
    (``fillers[w - 1]``: a gap of d positions takes (d - 1) // (2^w - 1) of them)."""

    nonzeros: int
    fillers: tuple[int, ...]


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
    storage: str = "dense"  # how the values are indexed: dense, bitmask, csr, relativeW, nm
    kernel_index_bits: int = 0  # the sparse index a kernel reads (bitmask or CSR of the kept)

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


def _csr_bits(kept: int, rows: int, row: int) -> int:
    return kept * _bits_for(row) + rows * _bits_for(row + 1)


def storage_options(n: int, rows: int, bits: int, zeros: StoredZeros) -> dict[str, tuple[int, int]]:
    """Every way to store ``n`` values of which ``zeros.nonzeros`` are nonzero, as
    ``format -> (index bits, value bits)``, in tie-break order."""
    k, row = zeros.nonzeros, n // rows
    options = {"dense": (0, n * bits), "bitmask": (n, k * bits),
               "csr": (_csr_bits(k, rows, row), k * bits)}
    for width, fillers in enumerate(zeros.fillers, start=1):
        # every entry, value or filler, is a w-bit code; a filler stores no value
        options[f"relative{width}"] = ((k + fillers) * width, k * bits)
    return options


def cheapest_storage(n: int, rows: int, bits: int, zeros: StoredZeros) -> tuple[str, int, int]:
    """(format, index bits, value bits) of the smallest storage; the first on ties."""
    options = storage_options(n, rows, bits, zeros)
    name = min(options, key=lambda key: sum(options[key]))
    return (name, *options[name])


def layer_footprint(layer: LayerInfo, choice: LayerChoice,
                    structure: LayerStructure | None = None,
                    zeros: StoredZeros | None = None) -> LayerFootprint:
    """One layer's stored bits and MACs. Without ``zeros`` a prediction from the pattern alone
    (the count it keeps, bitmask or CSR); with them, what the fine-tuned weights really need."""
    structure = structure or _own_structure(layer, choice)
    n_full = layer.weight_count
    rows = kept_rows = structure.kept_rows
    n = structure.weight_count(layer)
    row = n // rows
    nm = parse_nm(choice.pattern)
    if choice.pattern in (DENSE, CHANNEL):
        kept, index, storage = n, 0, "dense"
    elif choice.pattern == UNSTRUCTURED:
        kept = n - round(choice.sparsity * n)
        csr = _csr_bits(kept, rows, row)
        index, storage = (n, "bitmask") if n <= csr else (csr, "csr")
    else:
        keep, group = nm  # type: ignore[misc]
        kept = n * keep // group
        index, storage = kept * _bits_for(group), "nm"
    kernel_index = 0 if choice.pattern in (DENSE, CHANNEL) else index
    values = kept * choice.bits
    if zeros is not None and nm is None:
        storage, index, values = cheapest_storage(n, rows, choice.bits, zeros)
    if structure.leads is not None:
        index += layer.out_channels  # the group's channel bitmask, stored once, with its leader
    quantized = choice.bits < FLOAT_BITS
    macs = layer.macs * kept / n_full if n_full else 0.0
    return LayerFootprint(
        name=layer.name,
        kept_weights=kept,
        kept_channels=kept_rows,
        value_bits=values,
        index_bits=index,
        scale_bits=kept_rows * SCALE_BITS if quantized else 0,
        bias_bits=layer.kept_bias(kept_rows) * BIAS_BITS,
        macs=macs,
        bops=macs * choice.bits * ACTIVATION_BITS,
        storage=storage,
        kernel_index_bits=kernel_index,
    )


def model_footprint(table: LayerTable, candidate: Candidate,
                    zeros: Mapping[str, StoredZeros] | None = None) -> Footprint:
    """Footprint of every layer in the table; layers the candidate omits count as dense fp32.
    ``zeros`` (per layer, measured on the compressed model) make it what the packed file stores."""
    structures = layer_structures(table, candidate)
    zeros = zeros or {}
    layers = tuple(layer_footprint(layer, candidate.get_choice(layer.name), structures[layer.name],
                                   zeros.get(layer.name))
                   for layer in table.layers)
    other = table.other_params - other_params_removed(table, candidate)
    return Footprint(layers=layers, other_bits=other * FLOAT_BITS)


def footprint_metrics(table: LayerTable, candidate: Candidate,
                      zeros: Mapping[str, StoredZeros] | None = None) -> dict[str, float]:
    """The cost metrics a search objective or constraint can name, plus helpful extras."""
    footprint = model_footprint(table, candidate, zeros)
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
