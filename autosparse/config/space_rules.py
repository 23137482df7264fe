"""The ``space`` section: which layers are searched and what each may become (sparsities,
patterns, bit-widths, criteria), as a default choice set plus per-layer rules.

Split out of ``schema``: the space rules are the one section with their own vocabulary checks
(``choices``), and ``space.search_space`` reads them without the rest of the config.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from pydantic import Field, field_validator

from autosparse.config.choices import CRITERIA, is_valid_bits, is_valid_pattern, parse_nm
from autosparse.config.validation import Strict


MAX_RANGE_VALUES = 1_000  # a range of sparsities; each is a choice of every layer


class SparsityRange(Strict):
    low: float = Field(ge=0, lt=1)
    high: float = Field(ge=0, lt=1)
    step: float = Field(gt=0, lt=1)

    def values(self) -> list[float]:
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        count = int(round((self.high - self.low) / self.step)) + 1
        if count > MAX_RANGE_VALUES or self.step < 1e-6:
            raise ValueError(f"step {self.step:g} from {self.low:g} to {self.high:g} gives "
                             f"{count:,} sparsities; allowed: at most {MAX_RANGE_VALUES:,}, "
                             "with a step of at least 0.000001")
        return [round(self.low + i * self.step, 6) for i in range(count)]


def _check_each(values: list | None, allowed: Callable[[Any], bool],
                message: Callable[[list], str]) -> None:
    """Reject an empty list, or name the values that are not allowed."""
    if values is not None:
        bad = [v for v in values if not allowed(v)]
        if bad or not values:
            raise ValueError(message(bad or values))


def _refuse_twice(values: list | None, same: Callable[[Any], Any] = lambda v: v) -> None:
    """Name a choice listed twice (``same`` maps equal choices to one key, 0.5 and 0.50):
    it would be the same candidate twice, weighted double in a random draw and shown twice on
    the front."""
    seen: dict[Any, Any] = {}
    for value in values or []:
        key = same(value)
        if key in seen:
            shown = repr(value) if value == seen[key] else f"{seen[key]!r} and {value!r}"
            raise ValueError(f"{shown} listed twice; give each choice once (a duplicate is the "
                             "same candidate twice)")
        seen[key] = value


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
        _refuse_twice(values, lambda v: round(float(v), 6))
        return value

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, value):
        _check_each(value, lambda p: is_valid_pattern(str(p)),
                    lambda shown: f"patterns {shown} not allowed; allowed: unstructured, channel, "
                                  "dense, or N:M with N < M (e.g. '2:4')")
        _refuse_twice(value, lambda p: parse_nm(str(p)) or str(p))
        return value

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value):
        _check_each(value, is_valid_bits,
                    lambda shown: f"bits {shown} not allowed; allowed: 2 to 16, or 32 (float)")
        _refuse_twice(value)
        return value

    @field_validator("criterion")
    @classmethod
    def _check_criterion(cls, value):
        _check_each(value, lambda c: c in CRITERIA,
                    lambda shown: f"criterion {shown} not allowed; allowed: {', '.join(CRITERIA)}")
        _refuse_twice(value)
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


ONESHOT_BITS = (2, 3, 4, 5, 6, 8, 16, 32)  # each a GGUF type (Q2_K ... Q8_0, F16, F32)


def check_oneshot_space(space: SpaceConfig) -> None:
    """The choices a level database can hold and a GGUF file can store: no channel removal
    (one-shot levels prune weights, not channels), bits with a GGUF type, and no sparse 2-bit
    levels (Q2_K stores a per-block minimum, so a pruned weight would not read back as 0)."""
    sets = [("space.default", space.default)]
    sets += [(f"space.rules[{i}]", rule) for i, rule in enumerate(space.rules)]
    for where, choice_set in sets:
        patterns = choice_set.patterns or space.default.patterns or []
        bits = choice_set.bits or space.default.bits or []
        sparsities = choice_set.sparsity_values() or space.default.sparsity_values() or [0.0]
        if "channel" in patterns:
            raise ValueError(f"{where}.patterns: 'channel' removes whole channels, which oneshot "
                             "levels do not do; allowed with oneshot: unstructured, dense, N:M")
        bad = [b for b in bits if b not in ONESHOT_BITS]
        if bad:
            raise ValueError(f"{where}.bits {bad}: oneshot stores each level as a GGUF type; "
                             f"allowed: {', '.join(map(str, ONESHOT_BITS))}")
        sparse = any(s > 0 for s in sparsities) or any(":" in str(p) for p in patterns)
        if 2 in bits and sparse:
            raise ValueError(f"{where}: bits 2 with sparsity: Q2_K stores a minimum per block, so "
                             "a pruned weight cannot be stored as 0; give sparse layers bits >= 3 "
                             "(a rule of their own) or drop 2")


INT8_BITS = 8  # deploy: onnx-int8 stores every Conv/Gemm/MatMul weight as int8


def int8_space(space: SpaceConfig) -> SpaceConfig:
    """The space of ``deploy: onnx-int8``: onnxruntime's static quantizer stores every weight as
    int8, so 8 is the only width the file can hold (another width is refused, an unset one
    becomes 8), and only channel removal makes the file smaller or faster, so the default
    patterns become ``[channel, dense]`` (dense for layers whose channels cannot go, such as
    the output layer). Unstructured or N:M sparsity given explicitly stays allowed
    (the zeros are stored as int8 zeros: no size gain, and the search scores exactly that)."""
    given = space.default if "default" in space.model_fields_set else None
    sets = [("space.default", given)] if given is not None else []
    sets += [(f"space.rules[{i}]", rule) for i, rule in enumerate(space.rules)]
    for where, choice_set in sets:
        if choice_set.bits is not None and list(choice_set.bits) != [INT8_BITS]:
            raise ValueError(
                f"{where}.bits {list(choice_set.bits)}: deploy 'onnx-int8' stores every weight "
                "as int8 (onnxruntime's static quantizer), so bits can only be [8]; remove "
                "bits, or deploy to 'onnx' or 'packed', which store any width")
    default = (given or DEFAULT_CHOICES).model_copy(update={
        "bits": [INT8_BITS],
        "patterns": (given.patterns if given is not None and given.patterns is not None
                     else ["channel", "dense"])})
    return space.model_copy(update={"default": default})
