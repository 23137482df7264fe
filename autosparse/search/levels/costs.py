"""Per-layer, per-level costs for the two usual budgets, and the budget from an average.

Why sums: every search here constrains the SUM of per-layer costs, which holds for both budgets
a user states as an average over the model's searched weights::

    average bits per weight <= b   <=>   sum_l n_l * bpw(level_l)      <= b * sum_l n_l
    average sparsity        >= s   <=>   sum_l n_l * (1 - sparsity_l)  <= (1 - s) * sum_l n_l

(the sparsity budget is written as kept weights, so both are "total <= budget").

``nominal_bits_per_weight`` counts what a stored level holds per original weight: the kept values
at their bits (``dense_bits`` when not quantized), plus the sparsity index: one mask bit per
weight for unstructured sparsity, ``ceil(log2 M)`` bits per kept value for N:M (as
``compress.footprint`` does). Block scales (a GGUF Q4_K stores 4.5 bits per weight, not 4) are a
property of the grid, not of the level: pass ``bits_per_weight`` from the grid to count them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from autosparse.compress.oneshot.levels import Level

DENSE_BITS = 16  # a language model's dense weights: fp16 / bf16
UNSTRUCTURED = "unstructured"


class Budget(NamedTuple):
    """``cost[layer][i]``: level i's cost; ``budget``: the most the summed cost may be."""

    cost: dict[str, list[float]]
    budget: float


def nominal_bits_per_weight(level: Level, dense_bits: int = DENSE_BITS) -> float:
    """Stored bits per original weight of ``level`` (module docstring)."""
    bits = level.bits if level.bits is not None else dense_bits
    kept = 1.0 - level.sparsity
    if level.sparsity <= 0:
        return float(bits)
    if level.pattern == UNSTRUCTURED:
        return kept * bits + 1.0
    m = int(level.pattern.split(":")[1])
    return kept * (bits + math.ceil(math.log2(m)))


def _check_sizes(options: Mapping[str, Sequence[Level]], sizes: Mapping[str, float]) -> None:
    missing = [name for name in options if name not in sizes]
    if missing:
        raise ValueError(f"sizes has no weight count for layers {missing}")
    bad = {name: sizes[name] for name in options
           if isinstance(sizes[name], bool) or not isinstance(sizes[name], (int, float))
           or not sizes[name] > 0}
    if bad:
        raise ValueError(f"sizes must be positive weight counts, got {bad}")


def size_costs(options: Mapping[str, Sequence[Level]], sizes: Mapping[str, float], *,
               bits_per_weight: Callable[[Level], float] = nominal_bits_per_weight
               ) -> dict[str, list[float]]:
    """Stored bits of each layer at each level: ``n_l * bits_per_weight(level)``."""
    _check_sizes(options, sizes)
    return {name: [float(sizes[name]) * float(bits_per_weight(level)) for level in levels]
            for name, levels in options.items()}


def kept_costs(options: Mapping[str, Sequence[Level]], sizes: Mapping[str, float]
               ) -> dict[str, list[float]]:
    """Kept weights of each layer at each level: ``n_l * (1 - sparsity)``."""
    _check_sizes(options, sizes)
    return {name: [float(sizes[name]) * (1.0 - level.sparsity) for level in levels]
            for name, levels in options.items()}


def budget_from_average(options: Mapping[str, Sequence[Level]], sizes: Mapping[str, float],
                        average_bits: float | None = None,
                        average_sparsity: float | None = None, *,
                        bits_per_weight: Callable[[Level], float] = nominal_bits_per_weight
                        ) -> Budget:
    """Costs and budget for "at most ``average_bits`` per weight" (stored bits, see
    :func:`size_costs`) or "at least ``average_sparsity``" (kept weights): exactly one of them.
    Averages weigh each layer by its weight count ``sizes[layer]``."""
    if (average_bits is None) == (average_sparsity is None):
        raise ValueError("give exactly one of average_bits and average_sparsity")
    _check_sizes(options, sizes)
    total = float(sum(sizes[name] for name in options))
    if average_bits is not None:
        if isinstance(average_bits, bool) or not isinstance(average_bits, (int, float)) \
                or not average_bits > 0:
            raise ValueError(f"average_bits must be a positive number, got {average_bits!r}")
        return Budget(size_costs(options, sizes, bits_per_weight=bits_per_weight),
                      float(average_bits) * total)
    assert average_sparsity is not None
    if isinstance(average_sparsity, bool) or not isinstance(average_sparsity, (int, float)) \
            or not 0.0 <= average_sparsity < 1.0:
        raise ValueError(f"average_sparsity must be a number in [0, 1), got {average_sparsity!r}")
    return Budget(kept_costs(options, sizes), (1.0 - float(average_sparsity)) * total)


def average_of(cost_total: float, sizes: Mapping[str, float], layers: Sequence[str],
               kind: str) -> float:
    """A total back to its average: bits per weight (``kind="bits"``) or sparsity
    (``kind="sparsity"``, from a kept-weights total)."""
    n = float(sum(sizes[name] for name in layers))
    if kind == "bits":
        return cost_total / n
    if kind == "sparsity":
        return 1.0 - cost_total / n
    raise ValueError(f"kind must be 'bits' or 'sparsity', got {kind!r}")
