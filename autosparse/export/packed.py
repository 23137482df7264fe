"""Packed checkpoints: a file that stores exactly the bits the README's size formula counts.

``save_packed(shrunk, candidate, path, table, kept)`` writes the *shrunk* compressed model
(``shrink.shrink_model``: the candidate's channel groups physically removed; for a candidate
without channel choices the compressed model itself, parametrized or baked) so that every
searched layer's bitstream has exactly the bits ``footprint.model_footprint`` counts for it,
plus at most 7 bits of padding per layer, a fixed header and the buffers (batch-norm running
statistics; the formula counts parameters only, so they sit in their own section).
``load_packed(path, skeleton)`` rebuilds the model from a plain dense-shaped skeleton of the
same architecture: it removes the same channels with Torch-Pruning (the bitmasks are in the
file), then fills every tensor.

File layout (little-endian)::

    b"ASPK" | uint16 version (3) | uint32 header length | uint32 header CRC-32 | header (compact
    UTF-8 JSON) | payload | graph (optional)

The graph section (version 3, ``save_packed(..., example=...)``) is the model's weight-free
``torch.export`` program (``packed_graph``), so ``load_packed(path)`` returns a runnable model
with no model code and no skeleton; its bytes are counted apart (header ``graph``: offset after
the payload, size, CRC-32, the torch version that wrote it). Version 2 files (no graph) still load
with a skeleton.

The header holds the input shape (one sample, used to trace the skeleton), the channel groups
removed (``groups``: name, leader layer, where its kept-channel bitmask is, channels and how many
are kept), every layer and tensor with its (shrunk) shape, format, offset and byte count, and a
CRC-32 of the payload. The payload is one contiguous block: one bitstream per searched layer
(in discovery order, each padded to a whole byte), then every other parameter as raw float32
(batch norms already shrunk), then the buffers. A searched layer's bitstream holds, LSB-first:

- index: ``dense``: nothing. ``unstructured``: a bitmask of all ``n`` weights of the stored
  tensor, or, when ``k*ceil(log2 R) + O*ceil(log2(R+1))`` bits are fewer, per row the count of
  kept weights (``ceil(log2(R+1))`` bits each, all rows first) followed by each kept weight's
  column (``ceil(log2 R)`` bits each). ``N:M``: for each kept weight its position in its group
  (``ceil(log2 M)`` bits); groups run along the reduction dimension with input channels fastest,
  exactly as ``compress.compute_mask`` builds them (conv ``(O, I, *k)`` viewed as ``(O, *k, I)``).
  ``channel`` (a group leader): the group's kept-channel bitmask, one bit per channel of the
  dense layer (``group_bits``); what is left of the layer is stored dense.
- values: the kept weights in row-major order (for N:M in the group order above), as ``b``-bit
  offset-binary integer codes ``code + qmax`` (``qmax = 2^(b-1) - 1``), or raw float32 at 32 bits.
- scales: float32 per row of the stored tensor when ``b < 32`` (``weight = code * scale``).
- bias: float32 per row of the stored tensor.

(``ceil(log2 x)`` is at least 1, as in footprint.py.) Integer codes are recovered from the
effective weights: a row's scale is ``max|w_row| / qmax`` (its largest weight sits at level
``qmax``), nudged by a few float32 ulps when needed so that ``code * scale`` reproduces every stored
weight bit for bit. The bit-level encoding of a layer lives in ``bitpack.py``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autosparse.compress.apply import weight_mask
from autosparse.compress.bitpack import (
    LayerBits,
    PackedFormatError,
    _pack_layer,
    _unpack_layer,
    group_bitmask,
)
from autosparse.compress.footprint import LayerFootprint, model_footprint
from autosparse.compress.shrink import ShrinkError, expected_shapes, remove_groups
from autosparse.compress.storage import model_zeros
from autosparse.export.packed_graph import (
    GRAPH_FORMAT,
    PackedProgram,
    graph_bytes,
    load_graph,
)
from autosparse.space.candidate import CHANNEL, Candidate
from autosparse.space.discovery import count_other_params, find_layers, layer_kind
from autosparse.space.layers import LayerInfo, LayerTable
from autosparse.space.structure import channel_groups, pruned_by_group

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
VERSION = 3  # 2: the shrunk model, with one kept-channel bitmask per removed group; 3: + graph
READABLE = (2, 3)
_PREFIX = struct.Struct("<4sHII")  # magic, version, header length, header CRC-32


@dataclass(frozen=True)
class PackedInfo:
    """What ``save_packed`` wrote: byte counts by section and bits by layer and part.

    ``payload_bytes`` is what the size formula counts (searched layers, padded to a byte each, plus
    the other parameters at fp32); ``buffer_bytes`` (batch-norm statistics), ``header_bytes``
    and ``graph_bytes`` (the model's program, when written) are extra.
    ``file_bytes = header_bytes + payload_bytes + buffer_bytes + graph_bytes``.
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
    graph_bytes: int = 0

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
            f"{self.payload_bytes} + buffers {self.buffer_bytes} + graph {self.graph_bytes}; "
            "predicted "
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
# saving


def _raw(tensor: Tensor) -> tuple[bytes, str]:
    t = tensor.detach().cpu()
    if t.is_floating_point():
        array = t.to(torch.float32).numpy().astype("<f4")
    else:
        array = t.numpy()
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes(), array.dtype.str


def _bias_length(module: nn.Module) -> int | None:
    """transformers' Conv1D has one bias per output column, not per stored row."""
    bias = getattr(module, "bias", None)
    return int(bias.numel()) if layer_kind(module) == "Conv1D" and bias is not None else None


def _table_for(model: nn.Module, layers: dict[str, nn.Module]) -> LayerTable:
    """A layer table without the forward pass (sizes need shapes only)."""
    infos = tuple(
        LayerInfo(name=name, kind=layer_kind(module),
                  weight_shape=tuple(int(d) for d in module.weight.shape),
                  has_bias=getattr(module, "bias", None) is not None, macs=0,
                  bias_length=_bias_length(module))
        for name, module in layers.items()
    )
    return LayerTable(layers=infos, other_params=count_other_params(model, layers))


def _group_masks(table: LayerTable, candidate: Candidate,
                 kept: Mapping[str, Tensor] | None) -> dict[str, tuple[str, Tensor]]:
    """Leader layer -> (group name, kept-channel bitmask) for every group the candidate prunes,
    each checked against the channel count the footprint assumed."""
    groups = {g.name: g for g in channel_groups(table)}
    pruned = pruned_by_group(table, candidate)
    out = {}
    for name in [g for g in groups if pruned.get(g)]:  # in the table's order, as shrink_model
        count = pruned[name]
        if kept is None or name not in kept:
            raise ValueError(f"the candidate prunes channel group {name}: pass its kept-channel "
                             "mask (kept=, the third result of compress.structural_keep)")
        mask = kept[name].detach().to("cpu", torch.bool).reshape(-1)
        group = groups[name]
        if mask.numel() != group.channels or int((~mask).sum()) != count:
            raise ValueError(f"group {name}: the kept mask removes {int((~mask).sum())} of "
                             f"{mask.numel()} channels, the candidate {count} of {group.channels}")
        out[group.producers[0]] = (name, mask)
    return out


def _check_table(table: LayerTable, candidate: Candidate, layers: dict[str, nn.Module]) -> None:
    """The model must be the shrunk one: each layer shaped as the structure the footprint
    counted (with no channel group pruned, the dense shapes)."""
    shapes = {name: tuple(module.weight.shape) for name, module in layers.items()}
    try:
        want = expected_shapes(table, candidate)
    except ValueError as err:
        raise ValueError(f"the candidate does not fit the layer table: {err}") from None
    if shapes != want:
        wrong = "; ".join(f"{n}: model {shapes.get(n)}, expected {s}" for n, s in want.items()
                          if shapes.get(n) != s) or f"layers {sorted(set(shapes) ^ set(want))}"
        raise ValueError(f"the layer table does not describe this model once its channel groups "
                         f"are removed (shrink it first, export.shrink.shrink_model): {wrong}")


def _check_bits(name: str, bits: LayerBits, fp: LayerFootprint) -> LayerBits:
    """Every part of the layer's bitstream must have exactly the bits the size formula counts."""
    stored = (bits.values, bits.index, bits.scales, bits.bias)
    counted = (fp.value_bits, fp.index_bits, fp.scale_bits, fp.bias_bits)
    if stored != counted:
        raise ValueError(f"layer {name!r}: stores (values, index, scales, bias) = {stored} bits, "
                         f"the size formula counts {counted}")
    return replace(bits, predicted=fp.total_bits)


def _pack_layers(model: nn.Module, candidate: Candidate, layers: dict[str, nn.Module],
                 table: LayerTable, masks: dict[str, tuple[str, Tensor]]
                 ) -> tuple[list[bytes], list[dict], dict[str, LayerBits], dict[tuple, str]]:
    """Every searched layer's bitstream, header entry and bits; plus the layer weights'
    tensor keys (a weight tied into another module is stored once, as an alias)."""
    # the formula with this model's own zeros: what the search's size objective measured
    footprint = {fp.name: fp for fp in model_footprint(table, candidate,
                                                       model_zeros(model, table, candidate)).layers}
    blobs, entries, layer_bits, tensors = [], [], {}, {}
    offset = 0
    with torch.no_grad():
        for name, module in layers.items():
            group_mask = masks[name][1] if name in masks else None
            packed, entry, bits = _pack_layer(name, module.weight, getattr(module, "bias", None),
                                              candidate.get_choice(name),
                                              weight_mask(model, name), group_mask)
            data = packed.tobytes()
            entry.update(offset=offset, nbytes=len(data))
            entries.append(entry)
            layer_bits[name] = _check_bits(name, bits, footprint[name])
            blobs.append(data)
            offset += len(data)
            if not parametrize.is_parametrized(module, "weight"):
                tensors[_tensor_key(module.weight)] = f"{name}.weight"
    return blobs, entries, layer_bits, tensors


def _other_tensors(model: nn.Module, layers: dict[str, nn.Module]
                   ) -> dict[str, list[tuple[str, Tensor]]]:
    """State outside the searched layers' weight and bias: parameters, then buffers."""
    skip = {f"{name}.{part}" for name in layers for part in ("weight", "bias")}
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    sections: dict[str, list[tuple[str, Tensor]]] = {"param": [], "buffer": []}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in skip or any(key.startswith(f"{name}.parametrizations.") for name in layers):
            continue
        if ".parametrizations." in key:
            raise ValueError(f"{key!r} is parametrized outside the searched layers; bake the "
                             "model (compress.bake) before saving")
        sections["param" if key in param_names else "buffer"].append((key, value))
    return sections


def save_packed(model: nn.Module, candidate: Candidate, path: str | PathLike,
                table: LayerTable | None = None,
                kept: Mapping[str, Tensor] | None = None,
                example: tuple[Tensor, ...] | None = None) -> PackedInfo:
    """Write the shrunk compressed ``model`` as a packed checkpoint.

    ``table`` is the dense model's layer table (``discover``), which the model's shapes must
    match once the candidate's groups are removed; without it one is built from the model's
    shapes (then no channel group can be pruned). ``kept`` (group -> kept-channel mask, from
    ``compress.structural_keep`` on the dense model) is needed for every pruned group: its
    bitmask goes into the leader's index, where ``load_packed`` finds it. Every Conv1d/Conv2d/
    Linear is a searched layer stored as ``candidate.get_choice(name)`` says; the layer's bits
    must equal the footprint's exactly (ValueError otherwise). Every other parameter is raw
    float32 and every buffer raw (floats as float32). With ``example`` (model inputs, batch 2),
    the model's weight-free program is written too, so the file loads without a skeleton.
    """
    path = Path(path)
    layers = find_layers(model)
    unknown = sorted(set(candidate) - set(layers))
    if unknown:
        raise ValueError(f"candidate names {unknown} are not layers of the model "
                         f"({', '.join(layers)})")
    if table is None:
        if any(choice.pattern == CHANNEL for choice in candidate.values()):
            raise ValueError("a candidate with channel choices needs the dense model's layer "
                             "table (table=) and the kept channels (kept=)")
        table = _table_for(model, layers)
    _check_table(table, candidate, layers)
    masks = _group_masks(table, candidate, kept)
    blobs, header_layers, layer_bits, seen = _pack_layers(model, candidate, layers, table, masks)
    offset = sum(len(b) for b in blobs)
    tensors: list[dict] = []
    other_bits = payload_bytes = 0
    sections = _other_tensors(model, layers)
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
    graph = b"" if example is None else graph_bytes(model, example)
    header = {
        "format": "autosparse-packed",
        "input_shape": list(table.input_shape),
        "groups": [{"name": group, "layer": leader, "bit_offset": 0, "bits": int(mask.numel()),
                    "kept": int(mask.sum())} for leader, (group, mask) in masks.items()],
        "layers": header_layers,
        "tensors": tensors,
        "payload_bytes": len(payload),
        "crc32": zlib.crc32(payload),
    }
    if graph:
        header["graph"] = {"format": GRAPH_FORMAT, "nbytes": len(graph),
                           "crc32": zlib.crc32(graph), "torch": torch.__version__,
                           "state": list(model.state_dict())}  # the program's input order
    header_json = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header_json), zlib.crc32(header_json))
    path.write_bytes(prefix + header_json + payload + graph)
    footprint = model_footprint(table, candidate, model_zeros(model, table, candidate))
    return PackedInfo(
        path=path,
        file_bytes=len(prefix) + len(header_json) + len(payload) + len(graph),
        header_bytes=len(prefix) + len(header_json),
        payload_bytes=payload_bytes,
        buffer_bytes=len(payload) - payload_bytes,
        layers=layer_bits,
        other_param_bits=other_bits,
        predicted_bits=footprint.total_bits,
        predicted_other_bits=footprint.other_bits,
        graph_bytes=len(graph),
    )


def _tensor_key(t: Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device.type)


# --------------------------------------------------------------------------------------------
# loading


def read_header(path: str | PathLike) -> tuple[dict, bytes]:
    """The header dict and the verified payload of a packed checkpoint."""
    header, payload, _ = read_file(path)
    return header, payload


def read_file(path: str | PathLike) -> tuple[dict, bytes, bytes]:
    """The header dict, the verified payload and the verified graph section (b"" when the
    file has none) of a packed checkpoint."""
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
    if version not in READABLE:
        raise PackedFormatError(
            f"{path} is packed format version {version}; this autosparse reads versions "
            f"{', '.join(map(str, READABLE))}"
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
        header["layers"], header["tensors"], header["groups"]  # noqa: B018 - required keys
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise PackedFormatError(f"{path}: corrupt header ({err})") from None
    graph_entry = header.get("graph") or {}
    graph_size = int(graph_entry.get("nbytes", 0))
    payload = data[start:len(data) - graph_size] if graph_size else data[start:]
    if len(payload) != expected:
        raise PackedFormatError(
            f"{path}: payload is {len(payload)} bytes, the header says {expected} "
            "(truncated or corrupt file)"
        )
    if zlib.crc32(payload) != crc:
        raise PackedFormatError(f"{path}: payload checksum mismatch (corrupt file)")
    graph = data[start + expected:]
    if len(graph) != graph_size or (graph and zlib.crc32(graph) != int(graph_entry["crc32"])):
        raise PackedFormatError(f"{path}: graph section corrupt or truncated")
    return header, payload, graph


def _removed_in_file(header: dict, payload: bytes, modules: dict[str, nn.Module]
                     ) -> dict[str, list[int]]:
    """Leader -> channel indices removed, read from each group's bitmask in the file."""
    entries = {entry["name"]: entry for entry in header["layers"]}
    removed = {}
    for group in header["groups"]:
        leader = group["layer"]
        weight = getattr(modules.get(leader), "weight", None)
        if not isinstance(weight, Tensor) or weight.shape[0] != int(group["bits"]):
            found = "no such layer" if weight is None else f"{weight.shape[0]} channels"
            raise PackedFormatError(f"group {group['name']}: the file removes channels of "
                                    f"{leader!r} ({group['bits']} channels), the skeleton has "
                                    f"{found}")
        mask = group_bitmask(entries[leader], payload)
        if int(mask.sum()) != int(group["kept"]):
            raise PackedFormatError(f"group {group['name']}: bitmask keeps {int(mask.sum())} "
                                    f"channels, the header says {group['kept']} (corrupt file)")
        removed[leader] = [int(i) for i in torch.nonzero(~mask).flatten()]
    return removed


def _shrink_skeleton(header: dict, payload: bytes, skeleton: nn.Module) -> None:
    """Remove the file's channel groups from the dense-shaped skeleton, as the export did."""
    modules = dict(skeleton.named_modules())
    removed = _removed_in_file(header, payload, modules)
    if not removed:
        return
    parameter = next(skeleton.parameters())
    example = torch.zeros((1, *header["input_shape"]), dtype=parameter.dtype,
                          device=parameter.device)  # tracing only: values do not matter
    try:
        remove_groups(skeleton, example, removed)
    except ShrinkError as err:
        raise PackedFormatError(f"the skeleton cannot be shrunk as the file says: {err}") from None


def _file_state(header: dict, payload: bytes,
                state: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Every tensor the file holds, by state-dict key, checked against the skeleton's shapes
    (``state``; None: no skeleton, the header's shapes only)."""
    new: dict[str, Tensor] = {}
    for entry in header["layers"]:
        weight, bias = _unpack_layer(entry, payload)
        new[f"{entry['name']}.weight"] = weight
        if bias is not None:
            new[f"{entry['name']}.bias"] = bias
    aliases = []
    for entry in header["tensors"]:
        key = entry["name"]
        if "alias_of" in entry:
            aliases.append((key, entry["alias_of"]))
            continue
        if state is not None and key not in state:
            raise PackedFormatError(f"the file has tensor {key!r} {tuple(entry['shape'])}, "
                                    "the skeleton does not")
        start = int(entry["offset"])
        array = np.frombuffer(payload[start:start + int(entry["nbytes"])], dtype=entry["dtype"])
        shape = tuple(entry["shape"])
        if array.size != int(np.prod(shape)):
            raise PackedFormatError(f"tensor {key!r}: {array.size} values for shape {shape} "
                                    "(corrupt file)")
        if state is not None and tuple(state[key].shape) != shape:
            raise PackedFormatError(f"tensor {key!r}: the file has shape {shape}, the skeleton "
                                    f"{tuple(state[key].shape)}")
        new[key] = torch.from_numpy(array.copy()).reshape(shape)
    for key, target in aliases:
        if target not in new:
            raise PackedFormatError(f"tensor {key!r} aliases unknown {target!r} (corrupt file)")
        new[key] = new[target]
    return new


def _check_layers(header: dict, modules: dict[str, nn.Module]) -> None:
    for entry in header["layers"]:
        name, shape = entry["name"], tuple(entry["shape"])
        module = modules.get(name)
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


def load_packed(path: str | PathLike, skeleton: nn.Module | None = None) -> nn.Module:
    """The model in ``path``, ready to run.

    Without ``skeleton`` (a file with a graph section): a :class:`PackedProgram` of the file's
    decoded tensors and its exported graph - no model code needed. With ``skeleton`` (a plain,
    dense-shaped model of the same architecture; any file): the skeleton is shrunk in place
    first (the file's channel groups removed with Torch-Pruning, exactly as the export removed
    them), then every tensor is loaded. Either way pruned weights are zeros and quantized ones
    ``code * scale``, and the outputs equal the exported shrunk model's.
    """
    header, payload, graph = read_file(path)
    if skeleton is None:
        if not graph:
            raise PackedFormatError(f"{path} holds weights only (no graph section: written "
                                    "without an example input, or packed format version 2); "
                                    "pass skeleton=, an untrained instance of the model")
        tensors = _file_state(header, payload, None)
        order = header["graph"].get("state", [])
        if sorted(order) != sorted(tensors):
            raise PackedFormatError(f"{path}: the graph takes tensors {sorted(order)}, the "
                                    f"payload holds {sorted(tensors)} (corrupt file)")
        return PackedProgram(load_graph(graph), {key: tensors[key] for key in order}).eval()
    for name, module in skeleton.named_modules():
        if parametrize.is_parametrized(module):
            raise PackedFormatError(f"skeleton layer {name!r} is parametrized; pass a plain model "
                                    "built from the config/factory")
    _shrink_skeleton(header, payload, skeleton)
    _check_layers(header, dict(skeleton.named_modules()))
    state = skeleton.state_dict()
    new = _file_state(header, payload, state)
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
