"""Bit-level encoding of one searched layer for packed checkpoints (see ``packed.py``).

A layer's bitstream holds, LSB-first: its index (which weights of the stored tensor are kept),
the kept values as offset-binary integer codes (or float32), one float32 scale per row when
quantized, and the bias. Every part has exactly the size ``footprint.layer_footprint`` counts,
so the file is the size the search optimised. Kept apart from the file format so each stays
small: this module knows tensors and bits, ``packed.py`` knows files and models.

Layer rule: torch and numpy only, never optuna or mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from autosparse.compress.apply import qmax_for_bits
from autosparse.compress.footprint import _bits_for, cheapest_storage
from autosparse.compress.storage import stored_zeros
from autosparse.space.candidate import (
    CHANNEL,
    DENSE,
    FLOAT_BITS,
    UNSTRUCTURED,
    LayerChoice,
    parse_nm,
)

PARTS = ("index", "values", "scales", "bias")
_MAX_ULP_STEPS = 4


class PackedFormatError(ValueError):
    """The file is not a packed checkpoint this version reads, or does not fit the skeleton."""


@dataclass(frozen=True)
class LayerBits:
    """Bits one searched layer stores, by part, next to what footprint.py predicts."""

    name: str
    pattern: str
    bits: int
    index_format: str  # none, bitmask, csr, nm, group (a channel leader's kept channels)
    values: int
    index: int
    scales: int
    bias: int
    predicted: int
    exact: bool  # every stored weight reproduces the model's weight bit for bit

    @property
    def total(self) -> int:
        return self.values + self.index + self.scales + self.bias

    @property
    def padded_bytes(self) -> int:
        return (self.total + 7) // 8


# --------------------------------------------------------------------------------------------
# bit streams


def _uint_bits(values: np.ndarray, width: int) -> np.ndarray:
    """LSB-first bits (uint8 0/1) of non-negative integers, ``width`` bits each."""
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    out = np.empty((v.size, width), dtype=np.uint8)
    for j in range(width):
        out[:, j] = (v >> np.uint64(j)) & np.uint64(1)
    return out.reshape(-1)


def _float_bits(values: np.ndarray) -> np.ndarray:
    return _uint_bits(np.ascontiguousarray(values, dtype="<f4").view("<u4"), 32)


class _BitReader:
    def __init__(self, data: bytes, nbits: int, where: str):
        self.bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:nbits]
        self.pos = 0
        self.where = where

    def uints(self, count: int, width: int) -> np.ndarray:
        end = self.pos + count * width
        if end > self.bits.size:
            raise PackedFormatError(f"{self.where}: bitstream ends early (corrupt file)")
        chunk = self.bits[self.pos:end].reshape(count, width).astype(np.uint64)
        self.pos = end
        out = np.zeros(count, dtype=np.uint64)
        for j in range(width):
            out |= chunk[:, j] << np.uint64(j)
        return out

    def floats(self, count: int) -> np.ndarray:
        return self.uints(count, 32).astype("<u4").view("<f4")

    def bool_mask(self, count: int) -> np.ndarray:
        return self.uints(count, 1).astype(bool)


# --------------------------------------------------------------------------------------------
# encoding


def _nm_perm(ndim: int) -> tuple[int, ...]:
    """(O, I, *k) -> (O, *k, I): input channels fastest, as compress.compute_mask."""
    return (0, *range(2, ndim), 1)


def _inverse(perm: tuple[int, ...]) -> list[int]:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return inverse


def _kept_count(choice: LayerChoice, n: int) -> int:
    """Kept weights of the stored (shrunk) tensor as footprint.py counts them. A ``channel``
    leader's removed channels are gone from the tensor already: what is left is stored dense."""
    if choice.pattern == UNSTRUCTURED:
        return n - round(choice.sparsity * n)
    nm = parse_nm(choice.pattern)
    if nm is not None:
        return n * nm[0] // nm[1]
    return n


def _keep_first(needed: Tensor, count: int) -> Tensor:
    """A keep-mask of exactly ``count`` entries: every needed (nonzero) one, then the earliest
    others (weights that were kept but quantized to zero are indistinguishable from pruned)."""
    order = torch.argsort(needed.to(torch.int8), descending=True, stable=True)[:count]
    keep = torch.zeros(needed.numel(), dtype=torch.bool)
    keep[order] = True
    return keep


def _layer_mask(name: str, weight: Tensor, bias: Tensor | None, choice: LayerChoice,
                stored: Tensor | None) -> Tensor:
    """The keep-mask (O, ...) of exactly the size the formula counts.

    From the parametrization when the model still has it, otherwise inferred from the zeros of
    the baked weights: every nonzero weight is kept, and zeros (pruned, or quantized to zero)
    fill up to the count the pattern keeps, the earliest first. ``dense`` and ``channel`` keep
    the whole stored tensor (a channel leader's removed rows are no longer in it).
    """
    rows, n = weight.shape[0], weight.numel()
    pattern = choice.pattern
    expected = _kept_count(choice, n)
    if pattern in (DENSE, CHANNEL):
        return torch.ones_like(weight, dtype=torch.bool)
    nonzero = weight != 0
    if stored is not None:
        mask = stored.to(torch.bool).expand_as(weight).clone()
        if int(mask.sum()) != expected:
            raise ValueError(
                f"layer {name!r}: its mask keeps {int(mask.sum())} of {n} weights but the "
                f"candidate's {choice.describe()} keeps {expected}; is this the candidate the "
                "model was compressed with?"
            )
        if bool((nonzero & ~mask).any()):
            raise ValueError(f"layer {name!r}: nonzero weights outside its mask")
        return mask
    if pattern == UNSTRUCTURED:
        flat = nonzero.reshape(-1)
        if int(flat.sum()) > expected:
            raise ValueError(
                f"layer {name!r}: {int(flat.sum())} nonzero weights, but {choice.describe()} keeps "
                f"only {expected} of {n}; is this the compressed model and its candidate?"
            )
        return _keep_first(flat, expected).reshape(weight.shape)
    nm = parse_nm(pattern)
    if nm is None:
        raise ValueError(f"layer {name!r}: unknown pattern {pattern!r}")
    keep, group = nm
    if (n // rows) % group:
        raise ValueError(f"layer {name!r}: {pattern} needs the row length ({n // rows}) to be a "
                         f"multiple of {group}")
    perm = _nm_perm(weight.dim())
    permuted = nonzero.permute(perm)
    groups = permuted.reshape(rows, -1, group)
    worst = int(groups.sum(dim=-1).max())
    if worst > keep:
        raise ValueError(
            f"layer {name!r}: a group of {group} has {worst} nonzero weights, more than the "
            f"{keep} that {pattern} keeps"
        )
    order = torch.argsort(groups.to(torch.int8), dim=-1, descending=True, stable=True)[..., :keep]
    mask = torch.zeros_like(groups).scatter_(-1, order, True)
    return mask.reshape(permuted.shape).permute(_inverse(perm)).contiguous()


def _row_scales(rows_w: Tensor, qmax: int) -> tuple[Tensor, Tensor, bool]:
    """Per-row scale and integer codes with ``codes * scale`` equal to ``rows_w`` (O, R).

    ``max|w_row| / qmax`` as compress.py computes it, then a few ulps either way for rows whose
    weights it does not reproduce exactly. Returns (scale (O,), codes (O, R), exact).
    """
    amax = rows_w.abs().amax(dim=1)
    base = (amax / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    scale = base.clone()
    codes = torch.round(rows_w / scale[:, None])
    ok = (codes * scale[:, None] == rows_w).all(dim=1)
    for steps in range(1, _MAX_ULP_STEPS + 1):
        if bool(ok.all()):
            break
        for direction in (float("inf"), 0.0):
            bad = ~ok
            if not bool(bad.any()):
                break
            s = base[bad]
            for _ in range(steps):
                s = torch.nextafter(s, torch.full_like(s, direction))
            s = s.clamp_min(torch.finfo(torch.float32).tiny)
            c = torch.round(rows_w[bad] / s[:, None])
            good = (c * s[:, None] == rows_w[bad]).all(dim=1) & (c.abs() <= qmax).all(dim=1)
            idx = bad.nonzero().squeeze(1)[good]
            scale[idx] = s[good]
            codes[idx] = c[good]
            ok[idx] = True
    codes = codes.clamp_(-qmax, qmax)
    exact = bool(ok.all())
    if not exact:
        error = (codes * scale[:, None] - rows_w).abs().amax(dim=1)
        limit = 4 * torch.finfo(torch.float32).eps * amax + torch.finfo(torch.float32).tiny
        if bool((error > limit).any()):
            row = int(((error > limit).nonzero())[0])
            raise ValueError(
                f"row {row}: weights are not on a symmetric grid of levels -{qmax}..{qmax} "
                f"(max deviation {float(error[row]):.3g}); pass the compressed model, not the "
                "dense one"
            )
    return scale, codes, exact


def relative_codes(nonzero: np.ndarray, width: int) -> np.ndarray:
    """A w-bit relative index of the nonzero positions (row-major): code c >= 1 is a value c
    positions after the previous one (the first counted from -1); code 0 is a filler that only
    advances 2^w - 1 positions, for longer gaps. Fillers store no value."""
    step = 2 ** width - 1
    positions = np.flatnonzero(nonzero.reshape(-1))
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // step
    codes = []
    for gap, skip in zip(gaps.tolist(), fillers.tolist()):
        codes.extend([0] * skip)
        codes.append(gap - skip * step)
    return np.asarray(codes, dtype=np.int64)


def _storage_index(storage: str, nonzero: Tensor) -> tuple[str, np.ndarray, Tensor]:
    """(format, index bits, mask of the stored values) for a dense-layout (non-N:M) layer."""
    rows = nonzero.shape[0]
    row_len = nonzero.numel() // rows
    if storage == "dense":
        return "none", np.zeros(0, dtype=np.uint8), torch.ones_like(nonzero)
    flat = nonzero.reshape(rows, row_len)
    if storage == "bitmask":
        return "bitmask", _uint_bits(flat.reshape(-1).numpy(), 1), nonzero
    if storage == "csr":
        counts, cols = flat.sum(dim=1).numpy(), flat.nonzero()[:, 1].numpy()
        return "csr", np.concatenate([_uint_bits(counts, _bits_for(row_len + 1)),
                                      _uint_bits(cols, _bits_for(row_len))]), nonzero
    width = int(storage.removeprefix("relative"))
    return storage, _uint_bits(relative_codes(nonzero.numpy(), width), width), nonzero


def _index(choice: LayerChoice, mask: Tensor, stored: Tensor, group_mask: Tensor | None
           ) -> tuple[str, np.ndarray, Tensor, tuple[int, ...] | None]:
    """(format, index bits, mask in value order, permutation to value order) for one layer.

    ``stored`` holds the values as they will be written (codes or floats): outside N:M, only
    its nonzeros need storing, in the cheapest format the size formula picks for them. A
    channel leader's group bitmask (one bit per channel) comes first in its index.
    """
    prefix = (np.zeros(0, dtype=np.uint8) if group_mask is None
              else _uint_bits(group_mask.to(torch.uint8).numpy(), 1))
    nm = parse_nm(choice.pattern)
    if nm is None:
        nonzero = (stored != 0) & mask
        storage, _, _ = cheapest_storage(mask.numel(), mask.shape[0], choice.bits,
                                         stored_zeros(nonzero))
        fmt, bits, value_mask = _storage_index(storage, nonzero)
        return fmt, np.concatenate([prefix, bits]), value_mask, None
    rows = mask.shape[0]
    perm = _nm_perm(mask.dim())
    ordered = mask.permute(perm).reshape(rows, -1, nm[1])
    return "nm", _uint_bits(ordered.nonzero()[:, 2].numpy(), _bits_for(nm[1])), ordered, perm


def _quantized(name: str, choice: LayerChoice, masked: Tensor) -> tuple[Tensor | None,
                                                                       Tensor | None, bool]:
    """(per-row scales, integer codes shaped like ``masked``, exact) or Nones at 32 bits."""
    if choice.bits >= FLOAT_BITS:
        return None, None, True
    rows = masked.shape[0]
    try:
        scale, codes, exact = _row_scales(masked.reshape(rows, -1), qmax_for_bits(choice.bits))
    except ValueError as err:
        raise ValueError(f"layer {name!r} ({choice.describe()}): {err}") from None
    return scale, codes.reshape(masked.shape), exact


def _pack_layer(name: str, weight: Tensor, bias: Tensor | None, choice: LayerChoice,
                stored_mask: Tensor | None, group_mask: Tensor | None = None
                ) -> tuple[np.ndarray, dict, LayerBits]:
    """One layer's bitstream (index, values, scales, bias), its header entry and bit counts.

    ``weight`` is the stored tensor: for a shrunk model, what the channel groups left; every row
    of it is kept (removed rows are gone), so scales and biases are one per row.
    """
    weight = weight.detach().to("cpu", torch.float32)
    bias = None if bias is None else bias.detach().to("cpu", torch.float32)
    mask = _layer_mask(name, weight, bias, choice, stored_mask)
    masked = torch.where(mask, weight, torch.zeros_like(weight))
    scale, codes, exact = _quantized(name, choice, masked)
    try:
        index_format, index_bits, order_mask, perm = _index(
            choice, mask, masked if codes is None else codes, group_mask)
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None

    def kept_of(t: Tensor) -> np.ndarray:
        if perm is not None:
            t = t.permute(perm).reshape(order_mask.shape)
        return t[order_mask].numpy()

    parts = {"index": index_bits, "scales": np.zeros(0, dtype=np.uint8),
             "bias": np.zeros(0, dtype=np.uint8) if bias is None else _float_bits(bias.numpy())}
    if codes is not None:
        qmax = qmax_for_bits(choice.bits)
        parts["values"] = _uint_bits(kept_of(codes).astype(np.int64) + qmax, choice.bits)
        parts["scales"] = _float_bits(scale.numpy())
    else:
        parts["values"] = _float_bits(kept_of(masked))
    sizes = {p: int(parts[p].size) for p in PARTS}
    entry = {"name": name, "shape": list(weight.shape), "pattern": choice.pattern,
             "sparsity": choice.sparsity, "bits": choice.bits, "index": index_format,
             "group_bits": 0 if group_mask is None else int(group_mask.numel()),
             "kept": int(order_mask.sum()), "bias": 0 if bias is None else int(bias.numel()),
             "parts": [sizes[p] for p in PARTS]}
    layer_bits = LayerBits(name=name, pattern=choice.pattern, bits=choice.bits,
                           index_format=index_format, values=sizes["values"],
                           index=sizes["index"], scales=sizes["scales"], bias=sizes["bias"],
                           predicted=0, exact=exact)
    stream = np.concatenate([parts[p] for p in PARTS])
    return np.packbits(stream, bitorder="little"), entry, layer_bits


def _reader(entry: dict, payload: bytes) -> _BitReader:
    """A reader over one layer's bitstream (its parts' bits, without the byte padding)."""
    start = int(entry["offset"])
    return _BitReader(payload[start:start + int(entry["nbytes"])], sum(entry["parts"]),
                      f"layer {entry['name']!r}")


def group_bitmask(entry: dict, payload: bytes) -> Tensor:
    """The kept-channel bitmask a channel leader stores at the start of its index part."""
    return torch.from_numpy(_reader(entry, payload).bool_mask(int(entry["group_bits"])).copy())


def _csr_mask(reader: _BitReader, shape: tuple[int, ...], kept: int) -> Tensor:
    rows = shape[0]
    row_len = int(np.prod(shape)) // rows
    counts = reader.uints(rows, _bits_for(row_len + 1)).astype(np.int64)
    if int(counts.sum()) != kept:
        raise PackedFormatError(f"{reader.where}: row counts add up to {int(counts.sum())}, "
                                f"not {kept} (corrupt file)")
    cols = reader.uints(kept, _bits_for(row_len)).astype(np.int64)
    if kept and int(cols.max()) >= row_len:
        raise PackedFormatError(f"{reader.where}: column index out of range (corrupt file)")
    flat = torch.zeros(rows, row_len, dtype=torch.bool)
    flat[torch.from_numpy(np.repeat(np.arange(rows), counts)), torch.from_numpy(cols)] = True
    return flat.reshape(shape)


def _nm_mask(reader: _BitReader, shape: tuple[int, ...], kept: int, pattern: str) -> Tensor:
    """The kept mask in value order: (O, *k, I) viewed, as the values were written."""
    nm = parse_nm(pattern)
    if nm is None:
        raise PackedFormatError(f"{reader.where}: index 'nm' with pattern {pattern!r}")
    keep, group = nm
    n = int(np.prod(shape))
    permuted_shape = tuple(shape[p] for p in _nm_perm(len(shape)))
    positions = torch.from_numpy(reader.uints(kept, _bits_for(group)).astype(np.int64))
    groups = torch.zeros(n // group, group, dtype=torch.bool)
    group_ids = torch.arange(n // group).repeat_interleave(keep)
    if group_ids.numel() != kept or (kept and int(positions.max()) >= group):
        raise PackedFormatError(f"{reader.where}: N:M index does not fit (corrupt file)")
    groups[group_ids, positions] = True
    return groups.reshape(permuted_shape)


def _relative_mask(reader: _BitReader, shape: tuple[int, ...], kept: int, width: int,
                   index_bits: int) -> Tensor:
    entries = index_bits // width
    codes = reader.uints(entries, width).astype(np.int64)
    step = 2 ** width - 1
    advance = np.where(codes == 0, step, codes)
    positions = np.cumsum(advance) - 1
    positions = positions[codes != 0]
    n = int(np.prod(shape))
    if positions.size != kept or (kept and int(positions[-1]) >= n):
        raise PackedFormatError(f"{reader.where}: relative index does not fit (corrupt file)")
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.from_numpy(positions)] = True
    return flat.reshape(shape)


def _read_mask(reader: _BitReader, entry: dict, shape: tuple[int, ...]) -> Tensor:
    fmt, kept = entry["index"], int(entry["kept"])
    group_bits = int(entry.get("group_bits", 0))
    reader.uints(group_bits, 1)  # a leader's group bitmask: read by load_packed
    if fmt == "group":  # format version 2.0: the group's bitmask, then a dense tensor
        return torch.ones(shape, dtype=torch.bool)
    if fmt.startswith("relative"):
        return _relative_mask(reader, shape, kept, int(fmt.removeprefix("relative")),
                              int(entry["parts"][0]) - group_bits)
    if fmt == "none":
        return torch.ones(shape, dtype=torch.bool)
    if fmt == "bitmask":
        return torch.from_numpy(reader.bool_mask(int(np.prod(shape)))).reshape(shape)
    if fmt == "csr":
        return _csr_mask(reader, shape, kept)
    if fmt == "nm":
        return _nm_mask(reader, shape, kept, entry["pattern"])
    raise PackedFormatError(f"{reader.where}: unknown index format {fmt!r}")


def _unpack_layer(entry: dict, payload: bytes) -> tuple[Tensor, Tensor | None]:
    """The stored weight (pruned entries as zeros, quantized ones as ``code * scale``) and bias."""
    shape = tuple(entry["shape"])
    rows, bits, kept = shape[0], int(entry["bits"]), int(entry["kept"])
    reader = _reader(entry, payload)
    mask = _read_mask(reader, entry, shape)
    if int(mask.sum()) != kept:
        raise PackedFormatError(f"{reader.where}: index keeps {int(mask.sum())} weights, header "
                                f"says {kept} (corrupt file)")
    if bits < FLOAT_BITS:
        codes = torch.from_numpy(reader.uints(kept, bits).astype(np.int64) - qmax_for_bits(bits))
        scale = torch.from_numpy(reader.floats(rows).copy())
        row_of = mask.nonzero()[:, 0]  # the N:M layout (O, *k, I) keeps rows first too
        values = codes.to(torch.float32) * scale[row_of]
    else:
        values = torch.from_numpy(reader.floats(kept).copy())
    weight = torch.zeros(mask.shape, dtype=torch.float32)
    weight[mask] = values
    if entry["index"] == "nm":
        weight = weight.permute(_inverse(_nm_perm(len(shape)))).contiguous()
    # one bias per row, or (transformers' Conv1D) per output column; older files say true
    length = rows if entry["bias"] is True else int(entry["bias"])
    bias = torch.from_numpy(reader.floats(length).copy()) if entry["bias"] else None
    return weight, bias
