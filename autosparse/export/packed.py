"""Packed checkpoints: a file that stores exactly the bits the README's size formula counts.

``save_packed(model, candidate, path)`` writes a compressed model (parametrized by
``compress_model`` or baked) so that its payload equals ``footprint.model_footprint``'s total bits,
plus at most 7 bits of padding per searched layer, a fixed header and the buffers (batch-norm
running statistics; the formula counts parameters only, so they sit in their own section).
``load_packed(path, skeleton)`` fills a plain dense-shaped model of the same architecture.

File layout (little-endian)::

    b"ASPK" | uint16 version | uint32 header length | uint32 header CRC-32 | header (compact
    UTF-8 JSON) | payload

The payload is one contiguous block: one bitstream per searched layer (in discovery order, each
padded to a whole byte), then every other parameter as raw float32, then the buffers. The header
names every layer and tensor with its shape, format, offset and byte count, plus a CRC-32 of the
payload. A searched layer's bitstream holds, LSB-first, in this order:

- index: ``dense``: nothing. ``unstructured``: a bitmask of all ``n`` weights, or, when
  ``k*ceil(log2 R) + O*ceil(log2(R+1))`` bits are fewer, per row the count of kept weights
  (``ceil(log2(R+1))`` bits each, all rows first) followed by each kept weight's column
  (``ceil(log2 R)`` bits each). ``N:M``: for each kept weight its position in its group
  (``ceil(log2 M)`` bits); groups run along the reduction dimension with input channels fastest,
  exactly as ``compress.compute_mask`` builds them (conv ``(O, I, *k)`` viewed as ``(O, *k, I)``).
  ``channel``: an ``O``-bit bitmask of kept output channels.
- values: the kept weights in row-major order (for N:M in the group order above), as ``b``-bit
  offset-binary integer codes ``code + qmax`` (``qmax = 2^(b-1) - 1``), or raw float32 at 32 bits.
- scales: float32 per kept row when ``b < 32`` (``weight = code * scale``, as ``fake_quant``).
- bias: float32 per kept row (channel) or per row.

(``ceil(log2 x)`` is at least 1, as in footprint.py.) Integer codes are recovered from the
effective weights: a row's scale is ``max|w_row| / qmax`` (its largest weight sits at level
``qmax``), nudged by a few float32 ulps when needed so that ``code * scale`` reproduces every stored
weight bit for bit.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..candidate import CHANNEL, DENSE, FLOAT_BITS, UNSTRUCTURED, Candidate, LayerChoice, parse_nm
from ..compress import qmax_for_bits, weight_mask
from ..discovery import count_other_params, find_layers, layer_kind
from ..footprint import _bits_for, model_footprint
from ..layers import LayerInfo, LayerTable

__all__ = [
    "MAGIC",
    "VERSION",
    "PackedFormatError",
    "LayerBits",
    "PackedInfo",
    "save_packed",
    "load_packed",
    "read_header",
]

MAGIC = b"ASPK"
VERSION = 1
_PREFIX = struct.Struct("<4sHII")  # magic, version, header length, header CRC-32
_PARTS = ("index", "values", "scales", "bias")
_MAX_ULP_STEPS = 4


class PackedFormatError(ValueError):
    """The file is not a packed checkpoint this version reads, or does not fit the skeleton."""


@dataclass(frozen=True)
class LayerBits:
    """Bits one searched layer stores, by part, next to what footprint.py predicts."""

    name: str
    pattern: str
    bits: int
    index_format: str  # none, bitmask, csr, nm, rows
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


@dataclass(frozen=True)
class PackedInfo:
    """What ``save_packed`` wrote: byte counts by section and bits by layer and part.

    ``payload_bytes`` is what the size formula counts (searched layers, padded to a byte each, plus
    the other parameters at fp32); ``buffer_bytes`` (batch-norm statistics) and ``header_bytes``
    are extra. ``file_bytes = header_bytes + payload_bytes + buffer_bytes``.
    """

    path: Path
    file_bytes: int
    header_bytes: int
    payload_bytes: int
    buffer_bytes: int
    layers: dict[str, LayerBits]
    other_param_bits: int
    predicted_bits: int
    predicted_other_bits: int

    @property
    def payload_bits(self) -> int:
        """Exact stored bits of the counted payload (before the per-layer byte padding)."""
        return sum(layer.total for layer in self.layers.values()) + self.other_param_bits

    @property
    def predicted_kb(self) -> float:
        return self.predicted_bits / 8 / 1000

    @property
    def payload_kb(self) -> float:
        return self.payload_bytes / 1000

    @property
    def file_kb(self) -> float:
        return self.file_bytes / 1000

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.file_bytes} bytes = header {self.header_bytes} + payload "
            f"{self.payload_bytes} + buffers {self.buffer_bytes}; predicted "
            f"{self.predicted_bits / 8:.1f} bytes ({self.predicted_kb:.3f} kB)"
        ]
        for layer in self.layers.values():
            lines.append(
                f"  {layer.name}: {layer.pattern}/{layer.bits}b index={layer.index_format} "
                f"values={layer.values} index={layer.index} scales={layer.scales} "
                f"bias={layer.bias} total={layer.total} predicted={layer.predicted}"
            )
        lines.append(f"  other params: {self.other_param_bits} bits "
                     f"(predicted {self.predicted_other_bits})")
        return "\n".join(lines)


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
# saving


def _nm_perm(ndim: int) -> tuple[int, ...]:
    """(O, I, *k) -> (O, *k, I): input channels fastest, as compress.compute_mask."""
    return (0, *range(2, ndim), 1)


def _inverse(perm: tuple[int, ...]) -> list[int]:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return inverse


def _kept_count(choice: LayerChoice, n: int, rows: int) -> int:
    """Kept weights as footprint.py counts them (channel: kept rows x row length)."""
    if choice.pattern == UNSTRUCTURED:
        return n - round(choice.sparsity * n)
    if choice.pattern == CHANNEL:
        return max(1, rows - round(choice.sparsity * rows)) * (n // rows)
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
    fill up to the count the pattern keeps, the earliest first.
    """
    rows, n = weight.shape[0], weight.numel()
    pattern = choice.pattern
    expected = _kept_count(choice, n, rows)
    if pattern == DENSE:
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
    if pattern == CHANNEL:
        needed = nonzero.reshape(rows, -1).any(dim=1)
        if bias is not None:
            needed |= bias != 0
        kept_rows = expected // (n // rows)
        if int(needed.sum()) > kept_rows:
            raise ValueError(
                f"layer {name!r}: {int(needed.sum())} output channels have nonzero weights or "
                f"bias, but {choice.describe()} keeps only {kept_rows} of {rows}"
            )
        keep = _keep_first(needed, kept_rows)
        return keep.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()
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


def _pack_layer(name: str, weight: Tensor, bias: Tensor | None, choice: LayerChoice,
                stored_mask: Tensor | None) -> tuple[np.ndarray, dict, LayerBits]:
    weight = weight.detach().to("cpu", torch.float32)
    bias = None if bias is None else bias.detach().to("cpu", torch.float32)
    rows, n = weight.shape[0], weight.numel()
    row_len = n // rows
    bits = choice.bits
    pattern = choice.pattern
    mask = _layer_mask(name, weight, bias, choice, stored_mask)
    masked = torch.where(mask, weight, torch.zeros_like(weight))

    exact = True
    scale = codes = None
    if bits < FLOAT_BITS:
        qmax = qmax_for_bits(bits)
        try:
            scale, codes, exact = _row_scales(masked.reshape(rows, row_len), qmax)
        except ValueError as err:
            raise ValueError(f"layer {name!r} ({choice.describe()}): {err}") from None
        codes = codes.reshape(weight.shape)

    nm = parse_nm(pattern)
    parts: dict[str, np.ndarray] = {}
    kept_rows_mask = torch.ones(rows, dtype=torch.bool)
    if pattern == DENSE:
        index_format, order_mask, order_perm = "none", mask, None
        parts["index"] = np.zeros(0, dtype=np.uint8)
    elif pattern == UNSTRUCTURED:
        flat = mask.reshape(rows, row_len)
        kept = int(flat.sum())
        csr = kept * _bits_for(row_len) + rows * _bits_for(row_len + 1)
        if n <= csr:
            index_format = "bitmask"
            parts["index"] = _uint_bits(flat.reshape(-1).numpy(), 1)
        else:
            index_format = "csr"
            counts = flat.sum(dim=1).numpy()
            cols = flat.nonzero()[:, 1].numpy()
            parts["index"] = np.concatenate([
                _uint_bits(counts, _bits_for(row_len + 1)),
                _uint_bits(cols, _bits_for(row_len)),
            ])
        order_mask, order_perm = mask, None
    elif pattern == CHANNEL:
        index_format = "rows"
        kept_rows_mask = mask.reshape(rows, row_len)[:, 0].clone()
        parts["index"] = _uint_bits(kept_rows_mask.numpy(), 1)
        order_mask, order_perm = mask, None
    elif nm is not None:
        index_format = "nm"
        order_perm = _nm_perm(weight.dim())
        group = nm[1]
        order_mask = mask.permute(order_perm).reshape(rows, -1, group)
        positions = order_mask.nonzero()[:, 2].numpy()
        parts["index"] = _uint_bits(positions, _bits_for(group))
    else:
        raise ValueError(f"layer {name!r}: unknown pattern {pattern!r}")

    def kept_of(t: Tensor) -> np.ndarray:
        if order_perm is not None:
            t = t.permute(order_perm).reshape(order_mask.shape)
        return t[order_mask].numpy()

    if bits < FLOAT_BITS:
        qmax = qmax_for_bits(bits)
        parts["values"] = _uint_bits((kept_of(codes).astype(np.int64) + qmax), bits)
        parts["scales"] = _float_bits(scale[kept_rows_mask].numpy())
    else:
        parts["values"] = _float_bits(kept_of(masked))
        parts["scales"] = np.zeros(0, dtype=np.uint8)
    if bias is not None:
        if pattern == CHANNEL and bool((bias[~kept_rows_mask] != 0).any()):
            raise ValueError(f"layer {name!r}: pruned output channels have a nonzero bias")
        parts["bias"] = _float_bits(bias[kept_rows_mask].numpy())
    else:
        parts["bias"] = np.zeros(0, dtype=np.uint8)

    stream = np.concatenate([parts[p] for p in _PARTS])
    sizes = {p: int(parts[p].size) for p in _PARTS}
    entry = {
        "name": name,
        "shape": list(weight.shape),
        "pattern": pattern,
        "sparsity": choice.sparsity,
        "bits": bits,
        "index": index_format,
        "kept": int(mask.sum()),
        "kept_rows": int(kept_rows_mask.sum()),
        "bias": bias is not None,
        "parts": [sizes[p] for p in _PARTS],
    }
    layer_bits = LayerBits(
        name=name, pattern=pattern, bits=bits, index_format=index_format,
        values=sizes["values"], index=sizes["index"], scales=sizes["scales"], bias=sizes["bias"],
        predicted=0, exact=exact,
    )
    return np.packbits(stream, bitorder="little"), entry, layer_bits


def _raw(tensor: Tensor) -> tuple[bytes, str]:
    t = tensor.detach().cpu()
    if t.is_floating_point():
        array = t.to(torch.float32).numpy().astype("<f4")
    else:
        array = t.numpy()
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes(), array.dtype.str


def _table_for(model: nn.Module, layers: dict[str, nn.Module]) -> LayerTable:
    """A layer table without the forward pass (sizes need shapes only)."""
    infos = tuple(
        LayerInfo(name=name, kind=layer_kind(module),
                  weight_shape=tuple(int(d) for d in module.weight.shape),
                  has_bias=getattr(module, "bias", None) is not None, macs=0)
        for name, module in layers.items()
    )
    return LayerTable(layers=infos, other_params=count_other_params(model, layers))


def save_packed(model: nn.Module, candidate: Candidate, path: str | PathLike,
                table: LayerTable | None = None) -> PackedInfo:
    """Write the compressed ``model`` (parametrized or baked) as a packed checkpoint.

    Every Conv1d/Conv2d/Linear is a searched layer stored as ``candidate.get_choice(name)`` says
    (layers the candidate omits are dense fp32, as in footprint.py); every other parameter is
    raw float32 and every buffer raw (floats as float32). ``table`` (from ``discover_layers`` on
    the dense model) gives the predicted size; without it one is built from the model's shapes.
    """
    path = Path(path)
    layers = find_layers(model)
    unknown = sorted(set(candidate) - set(layers))
    if unknown:
        raise ValueError(f"candidate names {unknown} are not layers of the model "
                         f"({', '.join(layers)})")
    if table is None:
        table = _table_for(model, layers)
    else:
        shapes = {name: tuple(module.weight.shape) for name, module in layers.items()}
        listed = {layer.name: tuple(layer.weight_shape) for layer in table.layers}
        if shapes != listed:
            raise ValueError(f"the layer table {listed} does not describe this model {shapes}")
    footprint = {fp.name: fp for fp in model_footprint(table, candidate).layers}

    blobs: list[bytes] = []
    offset = 0
    header_layers: list[dict] = []
    layer_bits: dict[str, LayerBits] = {}
    layer_tensors: dict[tuple, str] = {}
    with torch.no_grad():
        for name, module in layers.items():
            choice = candidate.get_choice(name)
            weight = module.weight
            bias = getattr(module, "bias", None)
            stored = weight_mask(model, name)
            packed, entry, bits = _pack_layer(name, weight, bias, choice, stored)
            data = packed.tobytes()
            entry.update(offset=offset, nbytes=len(data))
            header_layers.append(entry)
            layer_bits[name] = replace(bits, predicted=footprint[name].total_bits)
            blobs.append(data)
            offset += len(data)
            if not parametrize.is_parametrized(module, "weight"):
                layer_tensors[_tensor_key(module.weight)] = f"{name}.weight"

    skip = set()
    for name in layers:
        skip |= {f"{name}.weight", f"{name}.bias"}
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors: list[dict] = []
    seen: dict[tuple, str] = dict(layer_tensors)
    sections = {"param": [], "buffer": []}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in skip or any(key.startswith(f"{name}.parametrizations.") for name in layers):
            continue
        if ".parametrizations." in key:
            raise ValueError(f"{key!r} is parametrized outside the searched layers; bake the "
                             "model (compress.bake) before saving")
        sections["param" if key in param_names else "buffer"].append((key, value))
    other_bits = 0
    payload_bytes = 0
    for role in ("param", "buffer"):
        if role == "buffer":
            payload_bytes = offset
        for key, value in sections[role]:
            tkey = _tensor_key(value)
            if tkey in seen:
                tensors.append({"name": key, "alias_of": seen[tkey]})
                continue
            seen[tkey] = key
            data, dtype = _raw(value)
            tensors.append({"name": key, "role": role, "dtype": dtype,
                            "shape": list(value.shape), "offset": offset, "nbytes": len(data)})
            if role == "param":
                other_bits += 8 * len(data)
            blobs.append(data)
            offset += len(data)

    payload = b"".join(blobs)
    header = {
        "format": "autosparse-packed",
        "layers": header_layers,
        "tensors": tensors,
        "payload_bytes": len(payload),
        "crc32": zlib.crc32(payload),
    }
    header_json = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header_json), zlib.crc32(header_json))
    path.write_bytes(prefix + header_json + payload)
    predicted_other = table.other_params * 32
    return PackedInfo(
        path=path,
        file_bytes=len(prefix) + len(header_json) + len(payload),
        header_bytes=len(prefix) + len(header_json),
        payload_bytes=payload_bytes,
        buffer_bytes=len(payload) - payload_bytes,
        layers=layer_bits,
        other_param_bits=other_bits,
        predicted_bits=sum(fp.total_bits for fp in footprint.values()) + predicted_other,
        predicted_other_bits=predicted_other,
    )


def _tensor_key(t: Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device.type)


# --------------------------------------------------------------------------------------------
# loading


def read_header(path: str | PathLike) -> tuple[dict, bytes]:
    """The header dict and the verified payload of a packed checkpoint."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise PackedFormatError(
            f"{path} is not an autosparse packed checkpoint (expected magic {MAGIC!r}, "
            f"found {data[:4]!r})"
        )
    if len(data) < len(MAGIC) + 2:
        raise PackedFormatError(f"{path}: file ends inside its prefix (truncated)")
    version = struct.unpack_from("<H", data, len(MAGIC))[0]
    if version != VERSION:
        raise PackedFormatError(
            f"{path} is packed format version {version}; this autosparse reads version {VERSION}"
        )
    if len(data) < _PREFIX.size:
        raise PackedFormatError(f"{path}: file ends inside its prefix (truncated)")
    _, _, header_len, header_crc = _PREFIX.unpack_from(data)
    start = _PREFIX.size + header_len
    raw_header = data[_PREFIX.size:start]
    if len(raw_header) != header_len or zlib.crc32(raw_header) != header_crc:
        raise PackedFormatError(f"{path}: corrupt header (checksum mismatch or truncated)")
    try:
        header = json.loads(raw_header.decode())
        if header.get("format") != "autosparse-packed":
            raise ValueError(f"format {header.get('format')!r}")
        expected = int(header["payload_bytes"])
        crc = int(header["crc32"])
        header["layers"], header["tensors"]  # noqa: B018 - required keys
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise PackedFormatError(f"{path}: corrupt header ({err})") from None
    payload = data[start:]
    if len(payload) != expected:
        raise PackedFormatError(
            f"{path}: payload is {len(payload)} bytes, the header says {expected} "
            "(truncated or corrupt file)"
        )
    if zlib.crc32(payload) != crc:
        raise PackedFormatError(f"{path}: payload checksum mismatch (corrupt file)")
    return header, payload


def _unpack_layer(entry: dict, payload: bytes) -> tuple[Tensor, Tensor | None]:
    name = entry["name"]
    shape = tuple(entry["shape"])
    pattern, bits = entry["pattern"], int(entry["bits"])
    rows = shape[0]
    n = int(np.prod(shape))
    row_len = n // rows
    kept, kept_rows = int(entry["kept"]), int(entry["kept_rows"])
    sizes = dict(zip(_PARTS, entry["parts"]))
    where = f"layer {name!r}"
    start = int(entry["offset"])
    reader = _BitReader(payload[start:start + int(entry["nbytes"])], sum(sizes.values()), where)

    fmt = entry["index"]
    perm = None
    keep_rows = torch.ones(rows, dtype=torch.bool)
    if fmt == "none":
        mask = torch.ones(shape, dtype=torch.bool)
    elif fmt == "bitmask":
        mask = torch.from_numpy(reader.bool_mask(n)).reshape(shape)
    elif fmt == "csr":
        counts = reader.uints(rows, _bits_for(row_len + 1)).astype(np.int64)
        if int(counts.sum()) != kept:
            raise PackedFormatError(f"{where}: row counts add up to {int(counts.sum())}, "
                                    f"not {kept} (corrupt file)")
        cols = reader.uints(kept, _bits_for(row_len)).astype(np.int64)
        if kept and int(cols.max()) >= row_len:
            raise PackedFormatError(f"{where}: column index out of range (corrupt file)")
        flat = torch.zeros(rows, row_len, dtype=torch.bool)
        flat[torch.from_numpy(np.repeat(np.arange(rows), counts)), torch.from_numpy(cols)] = True
        mask = flat.reshape(shape)
    elif fmt == "rows":
        keep_rows = torch.from_numpy(reader.bool_mask(rows))
        mask = keep_rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    elif fmt == "nm":
        nm = parse_nm(pattern)
        if nm is None:
            raise PackedFormatError(f"{where}: index 'nm' with pattern {pattern!r}")
        keep, group = nm
        perm = _nm_perm(len(shape))
        permuted_shape = tuple(shape[p] for p in perm)
        positions = torch.from_numpy(reader.uints(kept, _bits_for(group)).astype(np.int64))
        groups = torch.zeros(n // group, group, dtype=torch.bool)
        group_ids = torch.arange(n // group).repeat_interleave(keep)
        if group_ids.numel() != kept or (kept and int(positions.max()) >= group):
            raise PackedFormatError(f"{where}: N:M index does not fit (corrupt file)")
        groups[group_ids, positions] = True
        mask = groups.reshape(permuted_shape)
    else:
        raise PackedFormatError(f"{where}: unknown index format {fmt!r}")
    if int(mask.sum()) != kept:
        raise PackedFormatError(f"{where}: index keeps {int(mask.sum())} weights, header says "
                                f"{kept} (corrupt file)")

    if bits < FLOAT_BITS:
        qmax = qmax_for_bits(bits)
        codes = torch.from_numpy(reader.uints(kept, bits).astype(np.int64) - qmax)
        scale_kept = torch.from_numpy(reader.floats(kept_rows).copy())
        scale = torch.zeros(rows, dtype=torch.float32)
        scale[keep_rows] = scale_kept
        row_of = mask.nonzero()[:, 0]  # the N:M layout (O, *k, I) keeps rows first too
        values = codes.to(torch.float32) * scale[row_of]
    else:
        values = torch.from_numpy(reader.floats(kept).copy())
    weight = torch.zeros(mask.shape, dtype=torch.float32)
    weight[mask] = values
    if perm is not None:
        weight = weight.permute(_inverse(perm)).contiguous()
    bias = None
    if entry["bias"]:
        bias = torch.zeros(rows, dtype=torch.float32)
        bias[keep_rows] = torch.from_numpy(reader.floats(kept_rows).copy())
    return weight, bias


def load_packed(path: str | PathLike, skeleton: nn.Module) -> nn.Module:
    """Fill ``skeleton`` (a plain model of the same dense-shaped architecture) from ``path``.

    Returns ``skeleton`` itself with the stored weights (pruned weights as zeros, quantized ones
    as ``code * scale``): an ordinary module whose outputs equal the compressed model's.
    """
    header, payload = read_header(path)
    modules = dict(skeleton.named_modules())
    for name, module in modules.items():
        if parametrize.is_parametrized(module):
            raise PackedFormatError(f"skeleton layer {name!r} is parametrized; pass a plain model "
                                    "built from the config/factory")
    state = skeleton.state_dict()
    new: dict[str, Tensor] = {}
    for entry in header["layers"]:
        name = entry["name"]
        module = modules.get(name)
        shape = tuple(entry["shape"])
        if module is None or not isinstance(getattr(module, "weight", None), Tensor):
            raise PackedFormatError(f"layer {name!r} (weight {shape}) is not a layer with a "
                                    "weight in the skeleton")
        if tuple(module.weight.shape) != shape:
            raise PackedFormatError(f"layer {name!r}: the file has weight shape {shape}, the "
                                    f"skeleton {tuple(module.weight.shape)}")
        has_bias = getattr(module, "bias", None) is not None
        if has_bias != bool(entry["bias"]):
            in_file = "has a" if entry["bias"] else "has no"
            raise PackedFormatError(f"layer {name!r}: the file {in_file} bias, the skeleton "
                                    f"{'has one' if has_bias else 'has none'}")
        weight, bias = _unpack_layer(entry, payload)
        new[f"{name}.weight"] = weight
        if bias is not None:
            new[f"{name}.bias"] = bias
    aliases = []
    for entry in header["tensors"]:
        key = entry["name"]
        if "alias_of" in entry:
            aliases.append((key, entry["alias_of"]))
            continue
        if key not in state:
            raise PackedFormatError(f"the file has tensor {key!r} {tuple(entry['shape'])}, "
                                    "the skeleton does not")
        start = int(entry["offset"])
        array = np.frombuffer(payload[start:start + int(entry["nbytes"])], dtype=entry["dtype"])
        shape = tuple(entry["shape"])
        if tuple(state[key].shape) != shape or array.size != int(np.prod(shape)):
            raise PackedFormatError(f"tensor {key!r}: the file has shape {shape}, the skeleton "
                                    f"{tuple(state[key].shape)}")
        new[key] = torch.from_numpy(array.copy()).reshape(shape)
    for key, target in aliases:
        if target not in new:
            raise PackedFormatError(f"tensor {key!r} aliases unknown {target!r} (corrupt file)")
        new[key] = new[target]
    missing = sorted(set(state) - set(new))
    extra = sorted(set(new) - set(state))
    if missing or extra:
        raise PackedFormatError(f"skeleton does not match the file: missing from the file "
                                f"{missing}, not in the skeleton {extra}")
    for key, value in new.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise PackedFormatError(f"tensor {key!r}: the file has shape {tuple(value.shape)}, "
                                    f"the skeleton {tuple(state[key].shape)}")
    skeleton.load_state_dict(new, strict=True)
    return skeleton
