"""The layer table: what discovery found in the model, as plain data.

Everything downstream of discovery (space, footprint, samplers, cost model) reads this table
instead of the model, so those parts stay pure and never import torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from autosparse.space.candidate import CHANNEL, DENSE, UNSTRUCTURED, parse_nm


@dataclass(frozen=True)
class LayerInfo:
    """One searchable layer (Conv1d, Conv2d or Linear with a weight).

    ``weight_shape`` is PyTorch's (out, in/groups, *kernel); ``macs`` are multiply-accumulates per
    input sample measured by a forward pass; ``input_elements``/``output_elements`` are the
    activation sizes per sample (used by the hardware cost model).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    macs: int
    input_elements: int = 0
    output_elements: int = 0
    groups: int = 1
    bias_length: int | None = None  # when the bias is not one per row (transformers' Conv1D)

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def cost_kind(self) -> str:
        """The kind the cost model's efficiencies are keyed by: a depthwise conv (one input
        channel per output, groups == channels) runs a different kernel from a dense Conv2d,
        and transformers' Conv1D is a Linear."""
        if self.kind == "Conv2d" and self.groups > 1 and self.groups == self.out_channels:
            return "DepthwiseConv2d"
        if self.kind == "Conv1D":
            return "Linear"
        return self.kind

    @property
    def in_columns(self) -> int:
        """Input channels (conv, per group) or features (Linear) one output row reads."""
        return self.weight_shape[1] if len(self.weight_shape) > 1 else 1

    @property
    def kernel_elements(self) -> int:
        return math.prod(self.weight_shape[2:])

    @property
    def weight_count(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def row_length(self) -> int:
        """Weights per output channel (the reduction length of one output)."""
        return self.weight_count // self.out_channels

    @property
    def bias_count(self) -> int:
        if not self.has_bias:
            return 0
        return self.out_channels if self.bias_length is None else self.bias_length

    def kept_bias(self, kept_rows: int) -> int:
        """Bias entries left when only ``kept_rows`` rows remain (one per row, or all)."""
        if not self.has_bias:
            return 0
        return kept_rows if self.bias_length is None else self.bias_length

    def supports(self, pattern: str) -> bool:
        """Whether the pattern can be applied to this layer.

        N:M groups run along the reduction dimension (input channels fastest, as on sparse tensor
        cores), so the reduction length must be a multiple of M; channel pruning needs more than
        one output channel.
        """
        nm = parse_nm(pattern)
        if nm is not None:
            return self.kind in NM_KINDS and self.row_length % nm[1] == 0
        if pattern == CHANNEL:
            return self.out_channels > 1
        return pattern in (UNSTRUCTURED, DENSE)


NM_KINDS = ("Conv1d", "Conv2d", "Linear")  # weights stored (out, in, ...): N:M runs along inputs


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, found by the dependency graph at discovery.

    ``producers`` are the layers whose output channels these are (several when a residual add,
    a depthwise conv or attention heads tie them); the first searched one, the *leader*, carries
    the group's channel decision and the others follow it. ``consumers`` lists each layer that
    reads the channels with how many of its input columns one channel feeds (1, or H*W after a
    flatten). ``unit`` channels go together (an attention head's width). ``other_params`` are the
    parameters per channel outside searched layers (batch-norm scale and shift) that go with them.
    ``step`` units are removed at a time (4 for groups of 8 or more channels in multiples of 4:
    consumers keep input counts that N:M patterns and SIMD lanes divide). ``blocked`` says why
    export could not remove them; such a group is never offered.
    """

    name: str
    producers: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]
    channels: int
    unit: int = 1
    other_params: int = 0
    through: tuple[str, ...] = ()
    blocked: str | None = None
    step: int = 1

    @property
    def units(self) -> int:
        return self.channels // self.unit

    def pruned_channels(self, sparsity: float) -> int:
        """Channels a sparsity removes: ``round(s * units)`` whole units rounded to the step,
        at least one step kept."""
        step = self.step
        drop = min(int(round(sparsity * self.units / step)) * step, self.units - step)
        return max(0, drop) * self.unit

    def to_dict(self) -> dict:
        return {**asdict(self), "producers": list(self.producers),
                "consumers": [list(c) for c in self.consumers], "through": list(self.through)}

    @classmethod
    def from_dict(cls, data: dict) -> "ChannelGroup":
        return cls(**{**data, "producers": tuple(data["producers"]),
                      "consumers": tuple((str(n), int(c)) for n, c in data["consumers"]),
                      "through": tuple(data.get("through", ()))})


OP_KINDS = ("add", "mul", "pool", "concat", "transpose", "softmax", "norm", "activation",
            "matmul")


@dataclass(frozen=True)
class OpInfo:
    """An op between weight layers that costs time but has no weights to search: a residual
    add, a pooling, a concat or transpose, attention's softmax and activation-by-activation
    matmul, a layer norm, a non-fused activation (GELU).

    ``elements`` are the activation elements it reads and writes per sample (all tensor inputs
    plus the output); ``after_layer`` is the weight layer that ran last before it (None: before
    the first), whose precision and kept channels the op's activations follow; ``macs`` are
    multiply-accumulates an activation matmul does (0 for the others).
    """

    kind: str
    elements: int
    after_layer: str | None = None
    macs: int = 0

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"op kind {self.kind!r} not allowed; allowed: {', '.join(OP_KINDS)}")


@dataclass(frozen=True)
class LayerTable:
    """All searchable layers of a model plus what the search needs to know about the rest.

    ``other_params`` counts parameters outside the searched layers (batch norm, excluded layers),
    stored at 32 bits. ``global_magnitude`` maps a global sparsity target to the per-layer sparsity
    that one global magnitude threshold gives: the well-known strong baseline the GA and BO start
    from.
    """

    layers: tuple[LayerInfo, ...]
    other_params: int = 0
    input_shape: tuple[int, ...] = ()
    global_magnitude: dict[float, dict[str, float]] = field(default_factory=dict)
    channel_groups: tuple[ChannelGroup, ...] = ()
    graph_error: str | None = None  # why no dependency graph could be built (no channel pruning)
    ops: tuple[OpInfo, ...] = ()  # ops between weight layers, in forward order (cost model)

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __getitem__(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "other_params": self.other_params,
            "input_shape": list(self.input_shape),
            "global_magnitude": {str(k): v for k, v in self.global_magnitude.items()},
            "channel_groups": [g.to_dict() for g in self.channel_groups],
            "graph_error": self.graph_error,
            "ops": [asdict(op) for op in self.ops],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LayerTable":
        layers = tuple(
            LayerInfo(**{**layer, "weight_shape": tuple(layer["weight_shape"])})
            for layer in data["layers"]
        )
        return cls(
            layers=layers,
            other_params=int(data.get("other_params", 0)),
            input_shape=tuple(data.get("input_shape", ())),
            global_magnitude={
                float(k): {n: float(s) for n, s in v.items()}
                for k, v in data.get("global_magnitude", {}).items()
            },
            channel_groups=tuple(ChannelGroup.from_dict(g) for g in data.get("channel_groups", ())),
            graph_error=data.get("graph_error"),
            ops=tuple(OpInfo(**op) for op in data.get("ops", ())),  # absent in older tables
        )
