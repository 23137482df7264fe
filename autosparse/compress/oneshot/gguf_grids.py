"""Quantization grids that are GGUF tensor types, bit for bit, and the bytes llama.cpp reads.

What the search scores must be what the deployed file delivers: the weights a candidate is
evaluated with are exactly the floats llama.cpp dequantizes from the exported GGUF. So each grid
here is one ggml type (``Q8_0``, ``Q6_K``, ``Q5_0``, ``Q4_K``, ``Q4_0``, ``Q3_K``, ``Q2_K``, and
``F16`` for 16 bits): ``fit`` picks the block's stored parameters as llama.cpp's reference
quantizer (``quantize_row_*_ref``, no imatrix) would for those weights, ``quantize_column``
rounds onto the values those parameters can represent and returns them dequantized with
float32 arithmetic identical to ``gguf.quants.dequantize`` (``d * sc`` then ``* q``, then
``- dmin * m``, each rounded), so the scored weights equal the file's bitwise.

Fits. ``Q8_0``, ``Q4_0`` and ``Q5_0`` are the reference quantizers exactly (RTN bytes identical
to ``gguf.quants.quantize``). The K-quants run llama.cpp's reference scale searches
(``make_qx_quants`` for Q6_K, ``make_q3_quants`` for Q3_K, ``make_qkx2_quants`` for Q4_K and Q2_K,
in ``kquants``), then quantize the sub-block scales (and mins) onto their 8/6/4-bit codes times
an fp16 super-scale as the reference does: same parameters, same dequantized weights as a
``-ffp-contract=off`` build of ``ggml-quants.c`` (see ``kquants`` for float32 details). Codes
differ only where every code reads the same: a sub-block whose quantized scale is 0 (or a block
whose fp16 scale underflowed to 0) stores the code of zero here, where llama.cpp leaves
whatever its search chose; the values agree up to the sign of a zero.

Recording the parameters. GPTQ fits a block on weights its error feedback has already moved, so
the parameters cannot be re-derived from the final weights. ``fit`` returns a ``BlockParams``
(tensors only: ``torch.save`` serialises it); keep one per block and
``pack(grid, weight, params)`` turns the quantized weight into GGUF bytes: it finds each value's
code under its block's parameters, checks that the code dequantizes to exactly that float (else
``ValueError``: the weight is not on the grid) and lays codes and parameters out as ggml blocks.
``params`` is a mapping block -> parameters, or a sequence in fit order; a sequence not in block
order (GPTQ's ``act_order`` fits a block when its first column comes up) is matched to the
blocks by which set reproduces them. ``RecordingGrid`` does the keeping for code that only knows
the ``Grid`` protocol (``grid.round_to_nearest``, ``gptq.gptq``); ``quantize_weight_rtn`` is the
vectorised RTN path returning the dequantized weight and its bytes at once.

Bits -> type (``grid_for_bits``): 2 Q2_K, 3 Q3_K, 4 Q4_K, 5 Q5_0, 6 Q6_K, 8 Q8_0, 16 F16: the
K-quants where llama.cpp's mixes use them (their per-sub-block scales fit best at 2-4 and 6
bits), Q8_0 as the one 8-bit type, Q5_0 at 5 bits for its exact zero (Q5_K has mins). Q8_0,
Q6_K, Q5_0, Q4_0 and Q3_K are symmetric (``d * (code - zero)``), so a pruned weight stays
exactly 0 (-0.0 under a negative Q3_K scale). Q4_K and Q2_K subtract a per-sub-block min and
in general have NO exact zero (``grid.exact_zero`` is False): a pruned weight scored as 0 would
not be in the file (``pack`` refuses it). Pass ``exact_zero=True`` for sparse + quantized
layers to get Q4_0 at 4 bits (and a ValueError at 2 bits: no symmetric 2-bit type here).

Stored size: ``bits_per_weight`` is GGUF's, scales included (Q8_0 8.5, Q6_K 6.5625, Q5_0 5.5,
Q4_K and Q4_0 4.5, Q3_K 3.4375, Q2_K 2.625, F16 16). A row (the input dimension, GGUF's ``ne0``)
must be a whole number of blocks: 32 values for the ``_0`` types, 256 for K-quants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from autosparse.compress.oneshot import kquants
from autosparse.compress.oneshot.kquants import first_abs_max, fp16


@dataclass
class BlockParams:
    """One grid block's parameters for each of its rows, as stored and as dequantization uses
    them. ``step``/``shift`` are derived (``d * sc`` and ``dmin * m`` in float32) but kept so
    rounding a column costs one gather."""

    step: Tensor  # [rows, n_sub] float32: a code's multiplier, exactly as dequantization forms it
    shift: Tensor | None  # [rows, n_sub] float32 subtracted after (grids with mins), else None
    d: Tensor  # [rows] float32, fp16-exact: the stored (super-)block scale
    dmin: Tensor | None = None  # [rows] float32, fp16-exact: the stored super-block min scale
    sc: Tensor | None = None  # [rows, n_sub] int64: stored sub-block scale codes
    m: Tensor | None = None  # [rows, n_sub] int64: stored sub-block min codes
    inv: Tensor | None = None  # [rows] float32: the _0 types round with 1/d before d is fp16


# Weights per vectorised fit: the K-quant searches make a few dozen passes over their input, and
# at about 2^18 weights (1 MiB a temporary) those stay in cache; whole layers at once run slower.
_FIT_CHUNK = 1 << 18


def _cat(parts: Sequence[BlockParams]) -> BlockParams:
    """Parameters of consecutive row ranges -> one BlockParams over all their rows."""
    merged = {}
    for field in fields(BlockParams):
        values = [getattr(p, field.name) for p in parts]
        merged[field.name] = None if values[0] is None else torch.cat(values)
    return BlockParams(**merged)


def _half_bytes(t: Tensor) -> np.ndarray:
    """[N] fp16-exact floats -> [N, 2] little-endian half bytes (GGUF is little-endian)."""
    return t.numpy().astype("<f2").view(np.uint8).reshape(-1, 2)


def _u8(t: Tensor) -> np.ndarray:
    return t.numpy().astype(np.uint8)


def _crumbs(codes: Tensor) -> np.ndarray:
    """2-bit fields of Q2_K/Q3_K: byte ``32h + l`` holds values ``128h + 32k + l``, k = 0..3, at
    bits ``2k``."""
    c = (codes & 3).reshape(-1, 2, 4, 32) << (2 * torch.arange(4)).reshape(1, 1, 4, 1)
    return _u8(c.sum(dim=2).reshape(-1, 64))


class GGUFGrid:
    """A ggml block type as a ``Grid``. Subclasses say how ``fit`` chooses parameters, how a
    weight picks its code (``_round``) and how a block is laid out (``encode``)."""

    qtype: GGMLQuantizationType
    sub: int  # columns sharing one step (and shift)
    qmin: int = 0  # the range of stored codes
    qmax: int
    zero: int | None  # the code of 0 for symmetric grids (value = step * (code - zero)); else None

    def __init__(self) -> None:
        self.block, self.type_size = GGML_QUANT_SIZES[self.qtype]
        self.name = self.qtype.name
        self.bits_per_weight = self.type_size * 8 / self.block
        self.exact_zero = self.zero is not None  # can a pruned weight be stored as exactly 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # --- the Grid protocol ----------------------------------------------------------------
    def fit(self, w: Tensor) -> BlockParams:
        """Parameters of one block ``w`` [rows, block] (or of many: rows are independent, so
        ``w.reshape(-1, block)`` fits every block of a weight at once)."""
        if w.ndim != 2 or w.shape[1] != self.block:
            raise ValueError(f"{self.name} fits blocks of [rows, {self.block}], "
                             f"got {tuple(w.shape)}")
        w = w.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError(f"{self.name}: the block has non-finite weights (inf or nan)")
        step = max(1, _FIT_CHUNK // self.block)
        if w.shape[0] <= step:
            return self._fit(w)
        return _cat([self._fit(w[i:i + step]) for i in range(0, w.shape[0], step)])

    def _fit(self, w: Tensor) -> BlockParams:
        raise NotImplementedError

    def quantize_column(self, column: Tensor, params: BlockParams, index: int) -> Tensor:
        x = column.float().reshape(-1, 1)
        return self.values(self._round(x, params, index), params, index)[:, 0]

    # --- codes and values -----------------------------------------------------------------
    def _per_column(self, t: Tensor, start: int, width: int) -> Tensor:
        """A [rows, n_sub] parameter expanded to columns ``start .. start+width`` of the block."""
        if start == 0 and width == self.block:
            return t.repeat_interleave(self.sub, dim=1)
        return t[:, torch.arange(start, start + width) // self.sub]

    def _round(self, x: Tensor, params: BlockParams, start: int) -> Tensor:
        """Codes of ``x`` (columns ``start..`` of a block) the way llama.cpp's reference rounds
        a K-quant once its sub-block scales are fixed: ``nearest((x + shift) / step)``, clamped;
        a zero step keeps the code of zero (any code gives the same value)."""
        step = self._per_column(params.step, start, x.shape[1])
        if params.shift is not None:
            x = x + self._per_column(params.shift, start, x.shape[1])
        live = step != 0
        q = torch.round(x / torch.where(live, step, 1))
        base = 0 if self.zero is None else self.zero
        q = (q + base).clamp(self.qmin, self.qmax)
        return torch.where(live, q, base).long()

    def values(self, codes: Tensor, params: BlockParams, start: int = 0) -> Tensor:
        """What ``gguf.quants.dequantize`` reads for ``codes`` (columns ``start..`` of a block)."""
        step = self._per_column(params.step, start, codes.shape[1])
        if self.zero is not None:
            return step * (codes - self.zero).float()
        return step * codes.float() - self._per_column(params.shift, start, codes.shape[1])

    def codes_of(self, values: Tensor, params: BlockParams) -> tuple[Tensor, Tensor]:
        """The stored codes of whole blocks ``values`` [N, block] under ``params`` (N rows):
        for each value, a code that dequantizes to exactly that float (bitwise, sign of zero
        included), and a mask of the values some code reaches (the others are off the grid)."""
        step = self._per_column(params.step, 0, self.block)
        x = values
        if params.shift is not None:
            x = values + self._per_column(params.shift, 0, self.block)
        base = 0 if self.zero is None else self.zero
        guess = torch.round(x / torch.where(step != 0, step, 1)) + base
        guess = torch.where((step != 0) & guess.isfinite(), guess, base)
        target = values.view(torch.int32)
        found = torch.full_like(guess, self.qmin, dtype=torch.long)
        ok = torch.zeros_like(found, dtype=torch.bool)
        for delta in (0, -1, 1):
            for start in (guess, torch.full_like(guess, base)):
                trial = (start + delta).clamp(self.qmin, self.qmax).long()
                hit = ~ok & (self.values(trial, params).view(torch.int32) == target)
                found = torch.where(hit, trial, found)
                ok |= hit
        return found, ok

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        """[N, block] codes and N-row parameters -> [N, type_size] ggml block bytes."""
        raise NotImplementedError


class _LegacyGrid(GGUFGrid):
    """The ``_0`` types: one fp16 scale per 32 values, ``d = max / -(zero)`` where ``max`` is
    the signed value of largest magnitude (so that value lands on the lowest code), codes picked
    with the float32 ``1/d`` and then read with the fp16 ``d``, as ``quantize_row_q*_0_ref``."""

    sub = 32

    def _fit(self, w: Tensor) -> BlockParams:
        _, vmax = first_abs_max(w)
        d = vmax / -float(self.zero)
        return self._params(d)

    def _params(self, d: Tensor) -> BlockParams:
        inv = torch.where(d != 0, torch.full_like(d, 1.0) / torch.where(d != 0, d, 1), 0)
        d16 = fp16(d)
        return BlockParams(step=d16[:, None], shift=None, d=d16, inv=inv)

    def _round(self, x: Tensor, params: BlockParams, start: int) -> Tensor:
        """``MIN(qmax, (int8_t)(x * id + zero + 0.5))``: truncation after the half shift."""
        q = torch.trunc(x * params.inv[:, None] + (self.zero + 0.5))
        return q.clamp(self.qmin, self.qmax).long()

    def _nibbles(self, codes: Tensor) -> np.ndarray:
        """Byte j = value j (low nibble) and value j + 16 (high nibble)."""
        c = (codes & 15).reshape(-1, 2, 16)
        return _u8(c[:, 0] | (c[:, 1] << 4))


class Q8_0Grid(_LegacyGrid):
    """8 bit: ``d = amax / 127``, ``q = roundf(x / d)`` (half away from zero), 8.5 bits/weight."""

    qtype = GGMLQuantizationType.Q8_0
    qmin, qmax, zero = -128, 127, 0

    def _fit(self, w: Tensor) -> BlockParams:
        return self._params(w.abs().max(dim=1).values / 127)

    def _round(self, x: Tensor, params: BlockParams, start: int) -> Tensor:
        y = x * params.inv[:, None]
        a = y.abs()
        whole = torch.floor(a)
        a = whole + torch.floor(2 * (a - whole))  # exact roundf on |y|
        return (torch.sign(y) * a).clamp(self.qmin, self.qmax).long()

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        signed = codes.numpy().astype(np.int8).view(np.uint8)
        return np.concatenate([_half_bytes(params.d), signed], 1)


class Q4_0Grid(_LegacyGrid):
    """4 bit symmetric, 16 levels ``d * (q - 8)``: the exact-zero 4-bit choice, 4.5 bits/weight."""

    qtype = GGMLQuantizationType.Q4_0
    qmax, zero = 15, 8

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        return np.concatenate([_half_bytes(params.d), self._nibbles(codes)], 1)


class Q5_0Grid(_LegacyGrid):
    """5 bit symmetric, 32 levels ``d * (q - 16)``, 5.5 bits/weight."""

    qtype = GGMLQuantizationType.Q5_0
    qmax, zero = 31, 16

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        high = np.packbits(_u8(codes >> 4), axis=1, bitorder="little")  # uint32 qh, bit j = value j
        return np.concatenate([_half_bytes(params.d), high, self._nibbles(codes)], 1)


class Q6_KGrid(GGUFGrid):
    """6 bit symmetric K-quant: 16 sub-blocks of 16, int8 scales times an fp16 super-scale,
    values ``d * sc * (q - 32)``, 6.5625 bits/weight."""

    qtype = GGMLQuantizationType.Q6_K
    sub, qmax, zero = 16, 63, 32

    def _fit(self, w: Tensor) -> BlockParams:
        d, sc = kquants.fit_q6_k(w)
        return BlockParams(step=d[:, None] * sc.float(), shift=None, d=d, sc=sc)

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        c = codes.reshape(-1, 2, 4, 32)  # value 128h + 32k + l
        low = c & 15
        ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4),
                          low[:, :, 1] | (low[:, :, 3] << 4)], 2)
        qh = ((c >> 4) << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(dim=2)
        scales = params.sc.numpy().astype(np.int8).view(np.uint8)
        return np.concatenate([_u8(ql.reshape(-1, 128)), _u8(qh.reshape(-1, 64)), scales,
                               _half_bytes(params.d)], 1)


class Q3_KGrid(GGUFGrid):
    """3 bit symmetric K-quant: 16 sub-blocks of 16, 6-bit scales times a (signed) fp16
    super-scale, values ``d * (sc - 32) * (q - 4)``, 3.4375 bits/weight."""

    qtype = GGMLQuantizationType.Q3_K
    sub, qmax, zero = 16, 7, 4

    def _fit(self, w: Tensor) -> BlockParams:
        d, sc = kquants.fit_q3_k(w)
        return BlockParams(step=d[:, None] * (sc - 32).float(), shift=None, d=d, sc=sc)

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        high = ((codes >> 2) & 1).reshape(-1, 8, 32) << torch.arange(8).reshape(1, 8, 1)
        sc = params.sc
        low = (sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4)
        top = ((sc >> 4) & 3).reshape(-1, 4, 4) << (2 * torch.arange(4)).reshape(1, 4, 1)
        scales = torch.cat([low, top.sum(dim=1)], 1)  # byte 8+i: scale i + 4k at bits 2k
        return np.concatenate([_u8(high.sum(dim=1)), _crumbs(codes), _u8(scales),
                               _half_bytes(params.d)], 1)


def _with_mins(d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor) -> BlockParams:
    """The parameters of a K-quant with mins (Q4_K, Q2_K): sub-block value ``step * q - shift``
    with ``step = d * sc`` and ``shift = dmin * m``."""
    return BlockParams(step=d[:, None] * sc.float(), shift=dmin[:, None] * m.float(),
                       d=d, dmin=dmin, sc=sc, m=m)


class Q4_KGrid(GGUFGrid):
    """4 bit K-quant with mins: 8 sub-blocks of 32, 6-bit scales and mins times fp16
    super-scales, values ``d * sc * q - dmin * m``, 4.5 bits/weight. No exact zero in general."""

    qtype = GGMLQuantizationType.Q4_K
    sub, qmax, zero = 32, 15, None

    def _fit(self, w: Tensor) -> BlockParams:
        return _with_mins(*kquants.fit_q4_k(w))

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        sc, m = params.sc, params.m
        scales = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], 1)
        c = codes.reshape(-1, 4, 2, 32)  # byte 32k + l: value 64k + l low, 64k + 32 + l high
        qs = c[:, :, 0] | (c[:, :, 1] << 4)
        return np.concatenate([_half_bytes(params.d), _half_bytes(params.dmin), _u8(scales),
                               _u8(qs.reshape(-1, 128))], 1)


class Q2_KGrid(GGUFGrid):
    """2 bit K-quant with mins: 16 sub-blocks of 16, 4-bit scales and mins times fp16
    super-scales, values ``d * sc * q - dmin * m``, 2.625 bits/weight. No exact zero in general."""

    qtype = GGMLQuantizationType.Q2_K
    sub, qmax, zero = 16, 3, None

    def _fit(self, w: Tensor) -> BlockParams:
        return _with_mins(*kquants.fit_q2_k(w))

    def encode(self, codes: Tensor, params: BlockParams) -> np.ndarray:
        return np.concatenate([_u8(params.sc | (params.m << 4)), _crumbs(codes),
                               _half_bytes(params.d), _half_bytes(params.dmin)], 1)


class F16Grid:
    """16 bit: every weight rounded to IEEE half (round to nearest even), as GGUF ``F16``. No
    parameters; ``block`` is only the protocol's minimum (F16 has no blocks)."""

    qtype = GGMLQuantizationType.F16
    name = "F16"
    bits_per_weight = 16.0
    block = 16
    exact_zero = True

    def __repr__(self) -> str:
        return "F16Grid()"

    def fit(self, w: Tensor) -> None:
        return None

    def quantize_column(self, column: Tensor, params: None, index: int) -> Tensor:
        return column.float().half().float()


AnyGGUFGrid = GGUFGrid | F16Grid
GRIDS: dict[str, type[GGUFGrid | F16Grid]] = {
    cls.qtype.name: cls
    for cls in (F16Grid, Q8_0Grid, Q6_KGrid, Q5_0Grid, Q4_KGrid, Q4_0Grid, Q3_KGrid, Q2_KGrid)
}


class RecordingGrid:
    """A GGUF grid that keeps the parameters of every ``fit``, in call order, so a quantizer that
    knows only the ``Grid`` protocol (RTN, GPTQ: one fit per block) leaves behind what ``pack``
    needs; fits out of block order (``act_order``) are matched to their blocks there. Use one
    recorder per weight."""

    def __init__(self, grid: AnyGGUFGrid) -> None:
        self.grid = grid
        self.name, self.block, self.bits_per_weight = grid.name, grid.block, grid.bits_per_weight
        self.exact_zero = grid.exact_zero
        self.params: list[BlockParams | None] = []

    def fit(self, w: Tensor) -> BlockParams | None:
        params = self.grid.fit(w)
        self.params.append(params)
        return params

    def quantize_column(self, column: Tensor, params: BlockParams | None, index: int) -> Tensor:
        return self.grid.quantize_column(column, params, index)

    def pack(self, weight_on_grid: Tensor) -> bytes:
        return pack(self.grid, weight_on_grid, self.params)


def _base(grid: AnyGGUFGrid | RecordingGrid) -> AnyGGUFGrid:
    return grid.grid if isinstance(grid, RecordingGrid) else grid


def ggml_type(grid: AnyGGUFGrid | RecordingGrid) -> GGMLQuantizationType:
    """The GGUF tensor type a grid's weights are written as."""
    return _base(grid).qtype


def stored_bytes(grid: AnyGGUFGrid | RecordingGrid, rows: int, cols: int) -> int:
    """Bytes of a ``[rows, cols]`` weight in the file: ``rows * cols * bits_per_weight / 8``."""
    block, type_size = GGML_QUANT_SIZES[ggml_type(grid)]
    return rows * (cols // block) * type_size


def check_shape(
    grid: AnyGGUFGrid | RecordingGrid, shape: Sequence[int], layer: str = "weight"
) -> None:
    """ValueError unless a ``[rows, cols]`` weight's rows split into whole blocks of the type
    (GGUF quantizes along ``ne0``, the input dimension)."""
    block = GGML_QUANT_SIZES[ggml_type(grid)][0]
    if len(shape) != 2 or shape[1] % block:
        raise ValueError(
            f"{layer} of shape {list(shape)} cannot be stored as {grid.name}: its rows of "
            f"{shape[-1] if shape else 0} input values are not a multiple of the {block}-value "
            f"block; give this layer a type with a smaller block (Q8_0, Q5_0, Q4_0: 32) or F16")


def _stack(params: Sequence[BlockParams]) -> BlockParams:
    """Per-block parameters of one weight -> one BlockParams over ``rows * n_blocks`` rows,
    row-major (row r, block b at ``r * n_blocks + b``), matching ``w.reshape(-1, block)``."""
    merged = {}
    for field in fields(BlockParams):
        parts = [getattr(p, field.name) for p in params]
        if parts[0] is None:
            merged[field.name] = None
        else:
            stacked = torch.stack(parts, dim=1)
            merged[field.name] = stacked.reshape(-1, *stacked.shape[2:])
    return BlockParams(**merged)


def _rows(params: BlockParams, rows: slice) -> BlockParams:
    return BlockParams(**{f.name: None if getattr(params, f.name) is None
                          else getattr(params, f.name)[rows] for f in fields(BlockParams)})


def _on_grid(grid: GGUFGrid, block: Tensor, params: BlockParams) -> bool:
    """Whether every value of ``block`` [rows, block] is reached under ``params`` (a few rows
    first: a wrong parameter set fails there almost always)."""
    head = slice(0, 4)
    if not bool(grid.codes_of(block[head], _rows(params, head))[1].all()):
        return False
    return bool(grid.codes_of(block, params)[1].all())


def _match_blocks(grid: GGUFGrid, w: Tensor, params: list[BlockParams]) -> list[BlockParams]:
    """Each block's parameter set when the fits were not recorded left to right (GPTQ with
    ``act_order`` fits a block when its first column comes up): the call-order guess first, then
    the unused sets, then any. A set that reproduces a block's values exactly is a correct one
    for packing it, even if another fit produced it."""
    chosen: list[BlockParams] = []
    unused = list(range(len(params)))
    for b in range(w.shape[1] // grid.block):
        block = w[:, b * grid.block:(b + 1) * grid.block]
        tries = [b] * (b in unused) + unused + list(range(len(params)))
        k = next((k for k in tries if _on_grid(grid, block, params[k])), None)
        if k is None:
            return []
        chosen.append(params[k])
        unused = [u for u in unused if u != k]
    return chosen


def pack(grid: AnyGGUFGrid | RecordingGrid, weight_on_grid: Tensor,
         params: Sequence[BlockParams | None] | Mapping[int, BlockParams]) -> bytes:
    """GGUF tensor data (rows of ggml blocks, row-major) for a weight already on ``grid``.

    ``params``: the ``fit`` result of each block, as a mapping block index -> parameters, or as
    a sequence of one set per block in fit order (left to right; another order, as GPTQ's
    ``act_order`` gives, is recovered by matching sets to blocks). Ignored for F16. The bytes
    dequantize to ``weight_on_grid`` exactly; a value that no set puts on the grid raises
    ValueError."""
    grid = _base(grid)
    w = weight_on_grid.detach().float().contiguous()
    check_shape(grid, w.shape)
    rows, cols = w.shape
    if isinstance(grid, F16Grid):
        half = w.half()
        if not torch.equal(half.float().view(torch.int32), w.view(torch.int32)):
            raise ValueError("weight is not on the F16 grid: some values are not fp16-exact")
        return half.numpy().astype("<f2").tobytes()
    n_blocks = cols // grid.block
    if isinstance(params, Mapping):
        missing = sorted(set(range(n_blocks)) - set(params))
        if missing:
            raise ValueError(f"no {grid.name} parameters for blocks {missing[:8]} of {n_blocks}")
        ordered = [params[b] for b in range(n_blocks)]
    else:
        ordered = list(params)
        if len(ordered) != n_blocks:
            raise ValueError(f"{grid.name} weight of shape {[rows, cols]} has {n_blocks} blocks "
                             f"per row but {len(ordered)} recorded parameter sets (one fit per "
                             f"block expected)")
    blocks = w.reshape(-1, grid.block)
    stacked = _stack(ordered)
    codes, ok = grid.codes_of(blocks, stacked)
    if not bool(ok.all()) and not isinstance(params, Mapping):
        matched = _match_blocks(grid, w, ordered)
        if matched:
            stacked = _stack(matched)
            codes, ok = grid.codes_of(blocks, stacked)
    if not bool(ok.all()):
        index = int((~ok).flatten().nonzero()[0])
        row, col = divmod(index, cols)
        value = w[row, col].item()
        hint = (f" ({grid.name} has no exact zero: a pruned layer needs a symmetric type, "
                "grid_for_bits(bits, exact_zero=True))" if value == 0 and not grid.exact_zero else "")
        raise ValueError(f"weight value {value!r} at [{row}, {col}] is not on the {grid.name} grid "
                         f"of its block's recorded parameters{hint}")
    return grid.encode(codes, stacked).tobytes()


def quantize_weight_rtn(grid: AnyGGUFGrid | RecordingGrid, weight: Tensor) -> tuple[Tensor, bytes]:
    """Round-to-nearest of a whole ``[rows, cols]`` weight, all blocks at once: the dequantized
    weight (bitwise equal to ``grid.round_to_nearest``) and its GGUF tensor bytes."""
    grid = _base(grid)
    w = weight.detach().float().contiguous()
    check_shape(grid, w.shape)
    if isinstance(grid, F16Grid):
        deq = w.half().float()
        return deq, pack(grid, deq, [])
    blocks = w.reshape(-1, grid.block)
    params = grid.fit(blocks)
    codes = grid._round(blocks, params, 0)
    deq = grid.values(codes, params).reshape(w.shape)
    return deq, grid.encode(codes, params).tobytes()


_BY_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_0", 6: "Q6_K", 8: "Q8_0", 16: "F16"}


def grid_for_bits(bits: int, *, exact_zero: bool = False) -> AnyGGUFGrid:
    """The GGUF grid for a searched bit-width (see the module docstring for the mapping).
    ``exact_zero``: the layer is also sparse, so 0 must be representable: 4 -> Q4_0 instead of
    Q4_K, and 2 bits is refused (Q2_K has mins and no symmetric 2-bit type is offered)."""
    if bits not in _BY_BITS:
        raise ValueError(f"no GGUF grid for {bits} bits; choose one of {sorted(_BY_BITS)}")
    name = _BY_BITS[bits]
    if exact_zero and bits == 4:
        name = "Q4_0"
    elif exact_zero and bits == 2:
        raise ValueError("2-bit GGUF (Q2_K) subtracts a per-sub-block min and has no exact zero; "
                         "a sparse layer needs 3 bits (Q3_K) or more")
    return GRIDS[name]()
