"""Candidates are data: a per-layer choice of (pattern, sparsity, bits, criterion).

A candidate is plain, hashable and canonical, so that two spellings of the same compression
(``unstructured`` at sparsity 0 and ``channel`` at sparsity 0 are both just dense) hash alike
and are evaluated once. It round-trips through JSON and through Optuna params (see ``space``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator, Mapping

from autosparse.config.choices import (  # noqa: F401 (the vocabulary, re-exported beside Candidate)
    CHANNEL,
    CRITERIA,
    DENSE,
    FLOAT_BITS,
    UNSTRUCTURED,
    is_valid_bits,
    is_valid_pattern,
    parse_nm,
)


@dataclass(frozen=True, order=True)
class LayerChoice:
    """How one layer is compressed. Build with :meth:`make` to get the canonical form."""

    pattern: str
    sparsity: float
    bits: int
    criterion: str = "magnitude"

    @classmethod
    def make(
        cls, pattern: str, sparsity: float, bits: int, criterion: str = "magnitude"
    ) -> "LayerChoice":
        """Validate and canonicalise: N:M fixes its own sparsity; zero sparsity is dense."""
        if not is_valid_pattern(pattern):
            raise ValueError(
                f"pattern {pattern!r} is not one of unstructured, channel, dense or N:M (e.g. 2:4)"
            )
        if not is_valid_bits(int(bits)):
            raise ValueError(f"bits {bits!r} must be an integer from 2 to 16, or 32 (float)")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
        nm = parse_nm(pattern)
        if nm is not None:
            sparsity = 1.0 - nm[0] / nm[1]
        sparsity = round(float(sparsity), 6)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity {sparsity!r} must be in [0, 1)")
        if sparsity == 0.0 or pattern == DENSE:
            return cls(DENSE, 0.0, int(bits), "magnitude")
        return cls(pattern, sparsity, int(bits), criterion)

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "sparsity": self.sparsity,
            "bits": self.bits,
            "criterion": self.criterion,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "LayerChoice":
        return cls.make(
            data["pattern"], data["sparsity"], data["bits"], data.get("criterion", "magnitude")
        )

    def describe(self) -> str:
        """Short human form, e.g. ``2:4/int8`` or ``unstructured 75%/int4``."""
        bits = "fp32" if self.bits == FLOAT_BITS else f"int{self.bits}"
        if self.pattern == DENSE:
            return f"dense/{bits}"
        if parse_nm(self.pattern):
            return f"{self.pattern}/{bits}"
        return f"{self.pattern} {self.sparsity:.0%}/{bits}"


DENSE_FP32 = LayerChoice(DENSE, 0.0, FLOAT_BITS)


class Candidate(Mapping[str, LayerChoice]):
    """An immutable mapping ``layer name -> LayerChoice``; layers not listed stay dense fp32."""

    __slots__ = ("_choices", "_hash")

    def __init__(self, choices: Mapping[str, LayerChoice]):
        self._choices: dict[str, LayerChoice] = dict(sorted(choices.items()))
        self._hash: str | None = None

    def __getitem__(self, name: str) -> LayerChoice:
        return self._choices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._choices)

    def __len__(self) -> int:
        return len(self._choices)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self._choices == other._choices

    def __repr__(self) -> str:
        return f"Candidate({self._choices!r})"

    def get_choice(self, name: str) -> LayerChoice:
        """The choice for a layer, dense fp32 when the candidate does not list it."""
        return self._choices.get(name, DENSE_FP32)

    @property
    def key(self) -> str:
        """Stable content hash: equal candidates get equal keys across processes and runs."""
        if self._hash is None:
            self._hash = hashlib.sha1(self.to_json().encode()).hexdigest()[:16]
        return self._hash

    def to_json(self) -> str:
        return json.dumps({k: v.to_dict() for k, v in self._choices.items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Candidate":
        return cls({k: LayerChoice.from_dict(v) for k, v in json.loads(text).items()})
