"""The hardware cost model: latency and energy of a candidate on a profile, with no forward pass.

A pure function of (layer table, candidate, profile), so the search can score thousands of
candidates for free and a test can check every number by hand. Per layer (README, "Cost model"):

    precision  = what the device runs weights of this width on (int4 on an int8 CPU -> int8)
    macs       = layer MACs x kept output channels x kept input channels (channel groups shrink
                 the dense layer and what it reads) x compute fraction of the pattern (1 unless the device accelerates it here)
    compute    = macs x (channels rounded up to the precision's channel block) / channels
                 [x (a dense conv's input channels rounded up to the input block) / inputs]
                 / (peak MACs/s of the precision x efficiency of the kind at the precision)
    memory     = weight bytes / bandwidth(weights' level) + activation bytes (kept input and
                 output channels) / bandwidth(act level)
    latency    = max(compute, memory) + layer overhead [+ precision switch]      (roofline)
    switch     = conversion overhead + input elements x conversion time per element
    op between = op overhead(activation precision) + max(activation matmul MACs / peak,
    layers       elements x kept share x activation bytes / bandwidth(level holding them))
    energy     = macs x pJ/MAC(precision) + bytes x pJ/byte(level) + static power x latency

The kernel reads what it computes on: weights at the precision's width, compressed (values +
index) only where the sparse pattern is accelerated; a pattern the device does not accelerate
is decompressed to a dense tensor, so it saves stored size but neither time nor energy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from autosparse.compress.footprint import layer_footprint
from autosparse.config.hardware import (
    HardwareProfile,
    MemoryLevel,
    Precision,
    SparseAcceleration,
)
from autosparse.space.candidate import CHANNEL, DENSE, Candidate, LayerChoice
from autosparse.space.layers import LayerInfo, LayerTable, OpInfo
from autosparse.space.structure import LayerStructure, layer_structures

INPUT_ACTIVATION_BITS = 32  # the model's input and output are float32 tensors
US = 1e-6
PJ = 1e-12


@dataclass(frozen=True)
class LayerCost:
    """Everything the model decided about one layer, in seconds, joules and bytes."""

    name: str
    precision: str
    native: bool
    macs: float
    weight_bytes: float
    activation_bytes: float
    weight_level: str
    activation_level: str
    compute_s: float
    memory_s: float
    overhead_s: float
    latency_s: float
    compute_energy_j: float
    memory_energy_j: float
    static_energy_j: float
    accelerated: bool | None  # None: nothing to accelerate (dense)
    note: str

    @property
    def energy_j(self) -> float:
        return self.compute_energy_j + self.memory_energy_j + self.static_energy_j

    @property
    def bound(self) -> str:
        """Which term dominates: compute, memory, or the fixed overhead."""
        top = max(self.compute_s, self.memory_s)
        if self.overhead_s > top:
            return "overhead"
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def to_dict(self) -> dict:
        return {**asdict(self), "energy_j": self.energy_j, "bound": self.bound}


@dataclass(frozen=True)
class OpCost:
    """One op between weight layers (``OpInfo``): its activations, time and energy."""

    kind: str
    after_layer: str | None
    precision: str  # of the activations around it (the layer before it)
    elements: float  # read + written, after channel pruning
    activation_bytes: float
    level: str
    compute_s: float
    memory_s: float
    overhead_s: float
    latency_s: float
    energy_j: float


@dataclass(frozen=True)
class ModelCost:
    profile: str
    layers: tuple[LayerCost, ...]
    fixed_s: float  # model overhead + conversion back to the float output
    fixed_energy_j: float
    ops: tuple[OpCost, ...] = ()  # ops between weight layers (adds, pooling, transposes...)

    @property
    def ops_s(self) -> float:
        return sum(op.latency_s for op in self.ops)

    @property
    def latency_s(self) -> float:
        return sum(layer.latency_s for layer in self.layers) + self.fixed_s + self.ops_s

    @property
    def energy_j(self) -> float:
        return (sum(layer.energy_j for layer in self.layers) + self.fixed_energy_j
                + sum(op.energy_j for op in self.ops))

    @property
    def latency_ms(self) -> float:
        return self.latency_s * 1e3

    @property
    def energy_uj(self) -> float:
        return self.energy_j * 1e6

    def metrics(self) -> dict[str, float]:
        return {"latency_ms": self.latency_ms, "energy_uj": self.energy_uj}


@dataclass(frozen=True)
class _Plan:
    """How one layer executes, before any time or energy is charged."""

    precision: Precision
    native: bool
    sparse: SparseAcceleration | None  # the acceleration that applies, if any
    fraction: float  # compute fraction from the sparse pattern
    keep_rows: float  # share of output channels kept
    keep_columns: float  # share of input channels kept (what channel groups left of its inputs)
    weight_bits: float  # bits the kernel reads
    note: str


def _plan(layer: LayerInfo, choice: LayerChoice, profile: HardwareProfile,
          allow_sparse: bool = True, structure: LayerStructure | None = None) -> _Plan:
    precision, native = profile.precision_for(choice.bits)
    footprint = layer_footprint(layer, choice, structure)
    keep_rows = footprint.kept_channels / layer.out_channels
    keep_columns = (structure.kept_columns / layer.in_columns) if structure else 1.0
    notes = []
    if not native:
        notes.append(f"no {choice.bits}-bit arithmetic: emulated on {precision.label}")
    elif choice.bits < precision.bits:
        notes.append(f"int{choice.bits} runs on {precision.label}")
    sparse, fraction = None, 1.0
    weight_bits = float(footprint.kept_channels * layer.row_length * keep_columns * precision.bits)
    if choice.pattern not in (DENSE, CHANNEL):
        entry = profile.acceleration(choice.pattern)
        if entry is None:
            notes.append(f"{choice.pattern} not accelerated: dense kernel")
        elif not entry.covers(layer.kind, layer.weight_shape):
            notes.append(f"{choice.pattern} not accelerated for this {layer.kind}: dense kernel")
        elif entry.precisions is not None and precision.bits not in entry.precisions:
            notes.append(f"{choice.pattern} not accelerated at {precision.label}: dense kernel")
        elif choice.sparsity < entry.min_sparsity:
            notes.append(f"{choice.pattern} below {entry.min_sparsity:g}: dense kernel")
        elif not allow_sparse:
            notes.append(f"{choice.pattern} slower than dense here: dense kernel")
        else:
            sparse, fraction = entry, entry.compute_fraction(choice.sparsity)
            weight_bits = float(footprint.kept_weights * precision.bits
                                + footprint.kernel_index_bits)
    # per-channel scales exist only where integers are computed on; float kernels get floats
    weight_bits += (footprint.scale_bits if precision.kind == "int" else 0) + footprint.bias_bits
    return _Plan(precision, native, sparse, fraction, keep_rows, keep_columns, weight_bits,
                 "; ".join(notes))


def conversion_s(profile: HardwareProfile, elements: float) -> float:
    """A precision switch (quantize / dequantize, often a layout change): fixed + per element."""
    return profile.conversion_overhead_us * US + elements * profile.conversion_ns_per_element * 1e-9


def _accelerated(choice: LayerChoice, plan: _Plan) -> bool | None:
    if choice.pattern == DENSE:
        return None
    return choice.pattern == CHANNEL or plan.sparse is not None


def _layer_cost(layer: LayerInfo, choice: LayerChoice, plan: _Plan, profile: HardwareProfile,
                weight_level: MemoryLevel, switch: bool) -> LayerCost:
    rows = layer.out_channels * plan.keep_rows
    block = plan.precision.channel_block
    blocked_rows = math.ceil(round(rows, 6) / block) * block
    macs = layer.macs * plan.keep_rows * plan.keep_columns * plan.fraction  # arithmetic to do
    run_macs = macs * blocked_rows / rows  # what the hardware spends time on
    if layer.cost_kind in ("Conv1d", "Conv2d") and plan.precision.input_channel_block > 1:
        columns = layer.in_columns * plan.keep_columns
        in_block = plan.precision.input_channel_block
        run_macs *= math.ceil(round(columns, 6) / in_block) * in_block / columns
    compute_s = run_macs / (plan.precision.macs_per_second
                            * profile.efficiency(layer.cost_kind, plan.precision))
    weight_bytes = plan.weight_bits / 8
    activation_bytes = ((layer.input_elements * plan.keep_columns
                         + layer.output_elements * plan.keep_rows)
                        * plan.precision.act_bits / 8)
    act_level = profile.level_holding(activation_bytes)
    memory_s = (weight_bytes / weight_level.bandwidth_bytes_per_second
                + activation_bytes / act_level.bandwidth_bytes_per_second)
    overhead_s = plan.precision.layer_overhead_us * US
    if switch:
        overhead_s += conversion_s(profile, layer.input_elements)
    latency_s = max(compute_s, memory_s) + overhead_s
    return LayerCost(
        name=layer.name,
        precision=plan.precision.label,
        native=plan.native,
        macs=macs,
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        weight_level=weight_level.name,
        activation_level=act_level.name,
        compute_s=compute_s,
        memory_s=memory_s,
        overhead_s=overhead_s,
        latency_s=latency_s,
        compute_energy_j=run_macs * profile.mac_energy_pj(plan.precision) * PJ,
        memory_energy_j=(weight_bytes * weight_level.energy_pj_per_byte
                         + activation_bytes * act_level.energy_pj_per_byte) * PJ,
        static_energy_j=profile.static_power_watts * latency_s,
        accelerated=_accelerated(choice, plan),
        note=plan.note,
    )


def _op_cost(op: OpInfo, precision: Precision, keep: float,
             profile: HardwareProfile) -> OpCost:
    """An op between layers at the precision of the activations around it.

    ``keep`` is the kept output-channel share of the layer before it: exact for an add or a
    pooling on that layer's channels (a residual add sums one channel group), approximate for a
    concat (its other inputs may keep another share) and attention (softmax and the score
    matmul scale with tokens, not channels: they shrink less than charged here).
    """
    elements = op.elements * keep
    activation_bytes = elements * precision.act_bits / 8
    level = profile.level_holding(activation_bytes)
    memory_s = activation_bytes / level.bandwidth_bytes_per_second
    macs = op.macs * keep
    compute_s = macs / (precision.macs_per_second * profile.efficiency("Linear", precision))
    overhead_s = precision.op_overhead_us * US
    latency_s = max(compute_s, memory_s) + overhead_s
    energy_j = (macs * profile.mac_energy_pj(precision) + activation_bytes
                * level.energy_pj_per_byte) * PJ + profile.static_power_watts * latency_s
    return OpCost(op.kind, op.after_layer, precision.label, elements, activation_bytes,
                  level.name, compute_s, memory_s, overhead_s, latency_s, energy_j)


def estimate_cost(table: LayerTable, candidate: Candidate, profile: HardwareProfile) -> ModelCost:
    """Latency and energy of one inference (batch 1) of the candidate on the profile's device.

    Where a sparse kernel would be slower than the dense one (index overhead on a
    memory-bound layer), the layer runs dense, as a runtime choosing kernels would.
    """
    choices = [candidate.get_choice(layer.name) for layer in table.layers]
    structures = layer_structures(table, candidate)
    plans = [_plan(layer, choice, profile, structure=structures[layer.name])
             for layer, choice in zip(table.layers, choices)]
    total_weight_bytes = sum(plan.weight_bits for plan in plans) / 8
    weight_level = (profile.level(profile.weights_level) if profile.weights_level
                    else profile.level_holding(total_weight_bytes))
    layers = []
    previous_bits = INPUT_ACTIVATION_BITS
    for layer, choice, plan in zip(table.layers, choices, plans):
        switch = plan.precision.act_bits != previous_bits
        cost = _layer_cost(layer, choice, plan, profile, weight_level, switch)
        if plan.sparse is not None:
            dense_plan = _plan(layer, choice, profile, False, structures[layer.name])
            dense = _layer_cost(layer, choice, dense_plan, profile, weight_level, switch)
            cost = min(cost, dense, key=lambda c: c.latency_s)
        layers.append(cost)
        previous_bits = plan.precision.act_bits
    fixed_s = profile.model_overhead_us * US
    if previous_bits != INPUT_ACTIVATION_BITS and layers:
        last = table.layers[-1]
        fixed_s += conversion_s(profile, last.output_elements)
    by_name = {layer.name: plan for layer, plan in zip(table.layers, plans)}
    input_precision = profile.precision_for(INPUT_ACTIVATION_BITS)[0]
    ops = tuple(
        _op_cost(op, by_name[op.after_layer].precision, by_name[op.after_layer].keep_rows,
                 profile) if op.after_layer in by_name
        else _op_cost(op, input_precision, 1.0, profile)
        for op in table.ops)
    return ModelCost(profile=profile.name, layers=tuple(layers), fixed_s=fixed_s,
                     fixed_energy_j=profile.static_power_watts * fixed_s, ops=ops)


def cost_metrics(table: LayerTable, candidate: Candidate, profile: HardwareProfile) -> dict[str, float]:
    """The metrics a search objective or constraint can name: latency_ms and energy_uj."""
    return estimate_cost(table, candidate, profile).metrics()
