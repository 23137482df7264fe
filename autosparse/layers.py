"""The layer table: what discovery found in the model, as plain data.

Everything downstream of discovery (space, footprint, samplers, cost model) reads this table
instead of the model, so those parts stay pure and never import torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .candidate import CHANNEL, DENSE, UNSTRUCTURED, parse_nm


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

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def weight_count(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def row_length(self) -> int:
        """Weights per output channel (the reduction length of one output)."""
        return self.weight_count // self.out_channels

    @property
    def bias_count(self) -> int:
        return self.out_channels if self.has_bias else 0

    def supports(self, pattern: str) -> bool:
        """Whether the pattern can be applied to this layer.

        N:M groups run along the reduction dimension (input channels fastest, as on sparse tensor
        cores), so the reduction length must be a multiple of M; channel pruning needs more than
        one output channel.
        """
        nm = parse_nm(pattern)
        if nm is not None:
            return self.row_length % nm[1] == 0
        if pattern == CHANNEL:
            return self.out_channels > 1
        return pattern in (UNSTRUCTURED, DENSE)


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
        )
