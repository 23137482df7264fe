"""A compression level of one layer, and the dispatch from a level to a one-shot compressor.

The level database compresses every layer once per level, on the dense model's calibration
statistics, and the search then mixes levels across layers; a ``Level`` names one entry and its
``key`` names the stored weights (stable across runs, safe in a file name).

``method`` names the algorithm of each half, ``"<sparsity method>+<bits method>"``:
sparsity by ``magnitude``, ``wanda`` or ``sparsegpt``; bits by ``rtn`` or ``gptq``. Only the
halves that apply are kept (``Level(bits=4)`` has method ``"gptq"``), so equal levels compare
equal and share one key. Sparsity and bits together:

* ``sparsegpt+gptq``: SparseGPT's joint pass (mask chosen and kept weights rounded in one OBS
  sweep);
* ``sparsegpt+rtn``: SparseGPT, then round-to-nearest of what it kept;
* ``magnitude|wanda + gptq``: the mask first, then GPTQ with the mask (pruned weights exact 0,
  their error compensated with the rounding error);
* ``magnitude|wanda + rtn``: the mask, then round-to-nearest of the masked weights.

Pruned weights stay exactly 0 after rounding: they are re-zeroed after the grid, because a grid
with an offset (``s * (q - z)``, or GGUF's ``d * q - m``) need not hold an exact 0 - the stored
format then needs the sparsity mask beside the codes, which is what the export writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import torch

from autosparse.compress.oneshot.calibration import LayerStats
from autosparse.compress.oneshot.gptq import gptq
from autosparse.compress.oneshot.grid import Grid, round_to_nearest
from autosparse.compress.oneshot.magnitude import (
    UNSTRUCTURED,
    check_sparsity,
    magnitude_mask,
)
from autosparse.compress.oneshot.sparsegpt import sparsegpt
from autosparse.compress.oneshot.wanda import wanda_mask

SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt")
BITS_METHODS = ("rtn", "gptq")
DEFAULT_METHOD = "sparsegpt+gptq"
MAX_BITS = 16
DENSE_KEY = "dense"

_KEY = re.compile(
    r"^(?:s(?P<s>[0-9]+\.[0-9]+)-(?P<pattern>unstructured|[0-9]+of[0-9]+)-(?P<sm>[a-z]+))?"
    r"(?:\+?b(?P<bits>[0-9]+)-(?P<bm>[a-z]+))?$"
)


def _format_sparsity(sparsity: float) -> str:
    """Positional, at least two decimals, exact: ``0.5`` -> ``0.50``, ``1e-05`` -> ``0.00001``."""
    text = format(Decimal(repr(float(sparsity))), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True)
class Level:
    """One compression level of a layer: ``sparsity`` with ``pattern``, ``bits``, and ``method``.

    ``pattern`` is ``"unstructured"`` or ``"N:M"`` (N kept of every M along the input; its
    sparsity must then be ``1 - N/M``). ``bits`` ``None`` = not quantized (the dense dtype).
    """

    sparsity: float = 0.0
    pattern: str = UNSTRUCTURED
    bits: int | None = None
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        nm = check_sparsity(self.sparsity, self.pattern)
        # N:M fixes the sparsity: store the one float, so the key has one spelling
        exact = float(self.sparsity) if nm is None else 1.0 - nm[0] / nm[1]
        object.__setattr__(self, "sparsity", exact)
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int)
            or not 1 <= self.bits <= MAX_BITS
        ):
            raise ValueError(f"bits must be None or an integer 1..{MAX_BITS}, got {self.bits!r}")
        if not isinstance(self.method, str):
            raise ValueError(  # noqa: TRY004 - every bad argument is a ValueError here
                f"method must be a string such as {DEFAULT_METHOD!r}, got {self.method!r}")
        parts = [p for p in self.method.split("+") if p] if self.method != "none" else []
        sparse = [p for p in parts if p in SPARSITY_METHODS]
        bits = [p for p in parts if p in BITS_METHODS]
        unknown = [p for p in parts if p not in SPARSITY_METHODS + BITS_METHODS]
        if unknown or len(sparse) > 1 or len(bits) > 1:
            raise ValueError(
                f"method must be '<sparsity method>+<bits method>' with at most one of each, "
                f"sparsity methods {SPARSITY_METHODS}, bits methods {BITS_METHODS}; got "
                f"{self.method!r}")
        if self.sparsity > 0 and not sparse:
            raise ValueError(f"method {self.method!r} names no sparsity method for sparsity "
                             f"{self.sparsity}; add one of {SPARSITY_METHODS}")
        if self.bits is not None and not bits:
            raise ValueError(f"method {self.method!r} names no bits method for bits={self.bits}; "
                             f"add one of {BITS_METHODS}")
        used = (sparse if self.sparsity > 0 else []) + (bits if self.bits is not None else [])
        object.__setattr__(self, "method", "+".join(used) or "none")

    @property
    def is_dense(self) -> bool:
        return self.sparsity == 0 and self.bits is None

    @property
    def sparsity_method(self) -> str | None:
        return self.method.split("+")[0] if self.sparsity > 0 else None

    @property
    def bits_method(self) -> str | None:
        return self.method.split("+")[-1] if self.bits is not None else None

    @property
    def key(self) -> str:
        """``s0.50-unstructured-sparsegpt+b4-gptq``, ``s0.50-2of4-wanda``, ``b3-rtn``, ``dense``:
        only ``[a-z0-9.+-]``, and ``Level.from_key(level.key) == level``."""
        parts = []
        if self.sparsity > 0:
            pattern = self.pattern.replace(":", "of")
            parts.append(f"s{_format_sparsity(self.sparsity)}-{pattern}-{self.sparsity_method}")
        if self.bits is not None:
            parts.append(f"b{self.bits}-{self.bits_method}")
        return "+".join(parts) or DENSE_KEY

    @classmethod
    def from_key(cls, key: str) -> Level:
        """The level a ``key`` names (the inverse of ``Level.key``)."""
        if key == DENSE_KEY:
            return cls()
        match = _KEY.match(key) if isinstance(key, str) else None
        if match is None or not key or key.startswith("+"):
            raise ValueError(f"key {key!r} is not a level key such as "
                             f"'s0.50-unstructured-sparsegpt+b4-gptq', 'b4-gptq' or 'dense'")
        sparsity = float(match["s"]) if match["s"] else 0.0
        pattern = match["pattern"].replace("of", ":") if match["pattern"] else UNSTRUCTURED
        bits = int(match["bits"]) if match["bits"] else None
        method = "+".join(m for m in (match["sm"], match["bm"]) if m)
        level = cls(sparsity=sparsity, pattern=pattern, bits=bits, method=method)
        if level.key != key:
            raise ValueError(f"key {key!r} is not in canonical form (expected {level.key!r})")
        return level


def compress_weight(
    weight: torch.Tensor,
    stats: LayerStats | None,
    level: Level,
    grid_for_bits: Callable[[int], Grid] | None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """``weight`` ``[out, in]`` compressed to ``level``: float32, dense-shaped, on its device,
    exact zeros where pruned and grid values (dequantized) elsewhere when ``level.bits`` is set.

    ``stats`` (the layer's dense-input ``LayerStats``) is needed by ``wanda``, ``sparsegpt`` and
    ``gptq``; ``grid_for_bits(bits)`` picks the grid family (GGUF grids in the pipeline,
    ``UniformGrid`` in tests) and is needed when ``level.bits`` is set.
    """
    if not isinstance(level, Level):
        raise ValueError(  # noqa: TRY004 - every bad argument is a ValueError here
            f"level must be a Level, got {type(level).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    sm, bm = level.sparsity_method, level.bits_method
    needs_stats = sm in ("wanda", "sparsegpt") or bm == "gptq"
    if needs_stats:
        if stats is None:
            raise ValueError(f"stats: level {level.key!r} needs the layer's calibration "
                             f"statistics (LayerStats), got None")
        if stats.in_features != weight.shape[1]:
            raise ValueError(f"stats: collected for {stats.in_features} input features, the "
                             f"weight has {weight.shape[1]}")
    grid = None
    if level.bits is not None:
        if grid_for_bits is None:
            raise ValueError(f"grid_for_bits: level {level.key!r} is quantized and needs a "
                             f"callable bits -> Grid, got None")
        grid = grid_for_bits(level.bits)
    w = weight.detach().float()

    if sm is None and bm is None:
        return w.clone()
    if sm == "sparsegpt":
        assert stats is not None
        joint = grid if bm == "gptq" else None
        pruned = sparsegpt(w, stats.hessian, level.sparsity, level.pattern, grid=joint,
                           blocksize=blocksize, percdamp=percdamp)
        if bm != "rtn":
            return pruned
        assert grid is not None
        return _rtn_masked(pruned, pruned != 0, grid)
    keep = None
    if sm == "magnitude":
        keep = magnitude_mask(w, level.sparsity, level.pattern)
    elif sm == "wanda":
        assert stats is not None
        keep = wanda_mask(w, stats.input_norm, level.sparsity, level.pattern)
    if bm is None:
        assert keep is not None
        return torch.where(keep, w, 0.0)
    assert grid is not None
    if bm == "gptq":
        assert stats is not None
        return gptq(w, stats.hessian, grid, blocksize=blocksize, percdamp=percdamp,
                    act_order=act_order, mask=keep)
    if keep is None:
        return round_to_nearest(w, grid)
    return _rtn_masked(w, keep, grid)


def _rtn_masked(w: torch.Tensor, keep: torch.Tensor, grid: Grid) -> torch.Tensor:
    """RTN of the kept weights: fitted with the pruned ones at 0, re-zeroed after rounding
    (a pruned weight that rounded to the grid's own 0 keeps it, sign included: see
    ``grid.grid_zero``)."""
    rounded = round_to_nearest(torch.where(keep, w, 0.0), grid)
    return torch.where(keep | (rounded == 0), rounded, 0.0)
