"""The ``space`` section: which layers are searched and what each may become (sparsities,
patterns, bit-widths, criteria), as a default choice set plus per-layer rules.

Split out of ``schema``: the space rules are the one section with their own vocabulary checks
(``choices``), and ``space.search_space`` reads them without the rest of the config.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from pydantic import Field, field_validator

from autosparse.config.choices import CRITERIA, is_valid_bits, is_valid_pattern
from autosparse.config.validation import Strict


class SparsityRange(Strict):
    low: float = Field(ge=0, lt=1)
    high: float = Field(ge=0, lt=1)
    step: float = Field(gt=0, lt=1)

    def values(self) -> list[float]:
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        count = int(round((self.high - self.low) / self.step)) + 1
        return [round(self.low + i * self.step, 6) for i in range(count)]


def _check_each(values: list | None, allowed: Callable[[Any], bool],
                message: Callable[[list], str]) -> None:
    """Reject an empty list, or name the values that are not allowed."""
    if values is not None:
        bad = [v for v in values if not allowed(v)]
        if bad or not values:
            raise ValueError(message(bad or values))


class ChoiceSet(Strict):
    """Allowed choices for the layers a rule matches. Unset fields inherit from ``space.default``."""

    sparsity: list[float] | SparsityRange | None = None
    patterns: list[str] | None = None
    bits: list[int] | None = None
    criterion: list[str] | None = None

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value):
        values = value.values() if isinstance(value, SparsityRange) else value
        _check_each(values, lambda v: 0 <= v < 1,
                    lambda shown: f"sparsity values {shown} must be in [0, 1) and non-empty")
        return value

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, value):
        _check_each(value, lambda p: is_valid_pattern(str(p)),
                    lambda shown: f"patterns {shown} not allowed; allowed: unstructured, channel, "
                                  "dense, or N:M with N < M (e.g. '2:4')")
        return value

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value):
        _check_each(value, is_valid_bits,
                    lambda shown: f"bits {shown} not allowed; allowed: 2 to 16, or 32 (float)")
        return value

    @field_validator("criterion")
    @classmethod
    def _check_criterion(cls, value):
        _check_each(value, lambda c: c in CRITERIA,
                    lambda shown: f"criterion {shown} not allowed; allowed: {', '.join(CRITERIA)}")
        return value

    def sparsity_values(self) -> list[float] | None:
        if isinstance(self.sparsity, SparsityRange):
            return self.sparsity.values()
        return None if self.sparsity is None else [float(v) for v in self.sparsity]


class LayerRule(ChoiceSet):
    """Choices for the layers whose names match ``layers`` (exact names or full-match regexes)."""

    layers: list[str]
    tie: bool = Field(False, description="all matched layers share one decision")
    name: str | None = Field(None, description="name of the tied group (defaults to rule index)")

    @field_validator("layers")
    @classmethod
    def _check_regex(cls, value):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"layer pattern {pattern!r} is not a valid regex: {err}") from None
        return value


DEFAULT_CHOICES = ChoiceSet(
    sparsity=[0.0, 0.25, 0.5, 0.75, 0.9],
    patterns=["unstructured", "channel", "2:4"],
    bits=[4, 8, 32],
    criterion=["magnitude"],
)


class SpaceConfig(Strict):
    """Which layers are searched and what each may become. First matching rule wins."""

    include: list[str] | None = Field(None, description="only these layers (names/regexes)")
    exclude: list[str] = Field(default_factory=list, description="kept dense fp32")
    default: ChoiceSet = DEFAULT_CHOICES
    rules: list[LayerRule] = Field(default_factory=list)
