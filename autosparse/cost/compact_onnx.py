"""``model.compact.onnx``: a standard ONNX file whose searched weights take the bits the size
objective counted, beside the fp32 reference ``model.onnx``.

``model.onnx`` stores every weight as dense float32 (zeros included), ``model.int8.onnx`` as
dense int8: neither realises a score that counts b-bit codes of the kept weights, a sparse index
and one scale per row. Here every searched layer's weight initializer of the shrunk model's ONNX
graph is replaced by its streams, exactly as ``compress.bitpack`` encodes them for
``model.packed``:

    values   the kept weights' offset-binary b-bit codes, bit-packed (``uint8``), or float32
             at 32 bits
    index    the storage the size formula picked on the fine-tuned weights' own zeros:
             none (dense), bitmask, csr, relativeW, or N:M positions, bit-packed
    scales   float32 per row when quantized: weight = code x scale

and a few nodes calling the decode functions of ``onnx_decode`` rebuild the float32 weight
under the initializer's old name, so the graph's Conv/Gemm/MatMul/Gather nodes are untouched.
onnxruntime folds the decode at load: the session runs ``model.onnx``'s kernels on weights equal
to the compressed model's bit for bit (checked on the file when it is written, layer by layer).

Why not the typed route, measured on the quickstart's knee (10.1 kB scored; conv1 dense int4,
conv2/conv3/fc2 50-70 % sparse int2, fc1 80 % sparse int4; latency on the 2-core dev CPU, one
thread, batch 1, median of 7 rounds, noisy): ``DequantizeLinear`` (opset 21, per-row scales)
on dense int4 initializers made a 29.4 kB file (2.9x the score) running at 106 us against
model.onnx's 17.6 us, int8 50.7 kB (5.0x) at 42 us, int8 ``sparse_initializer`` (COO with int16
positions) 46.0 kB (4.6x) at 43 us; this file 13.6 kB (1.35x) at 17.6 us, now 12.55 kB (1.24x). ONNX has no type
for 2, 3, 5, 6 or 7-bit integers, a sparse initializer holds no int4 (onnxruntime refuses it)
and pays a >= 8-bit position per kept weight where the score counts a bitmask bit or a short
relative step, and onnxruntime never constant-folds ``DequantizeLinear`` (it keeps QDQ pairs
for its integer kernels): every call dequantized every weight again and the convolutions lost
their prepacked weights. onnxruntime's contrib ``MatMulNBits`` (4-bit blockwise, block = one
row) computed fc1 correctly but stores it dense: 16.4 kB for a layer scored at 6.7 kB.

Every bit width therefore keeps its exact bits (nothing is widened: 3 bits take 3 bits, 16
take 16), and what the format cannot carry is reported per layer (:class:`CompactLayer.note`):
only a weight the exporter did not leave as an initializer (folded into another constant),
which stays float32. The rest of the file is the model's graph (its own operators, as in
``model.onnx``), the decode functions (0.8 to 1.8 kB, once) and ~40 to 110 bytes of calls per
layer. Every byte of it is names, attributes and operators, so they are cut to what ONNX needs:
tensors renamed ``a, b, ...`` (``CompactLayer.initializers`` gives the file's names), one-letter
functions, attributes and domain, no producer, node names, doc strings or shape hints, no
attribute that restates a default, literal Constants as ``value_int(s)``. On the quickstart knee
(scored 10.09 kB) that took the rest from 3.51 to 2.46 kB (graph 1.01 -> 0.72, decode 2.51 ->
1.75 kB; file 13.60 -> 12.55 kB, 1.35x -> 1.24x the score); over the deploy benchmark's 20
front points from 1.35-4.00x to 1.24-3.17x (ResNet's rest 11.5 -> 6.6 kB, the ViT's 14.7 ->
10.0 kB). Scores of 1-5 kB, batch-norm statistics (unscored) and exporter graphs full of shape
arithmetic (ViT, tiny LM) keep those files above 1.25x. Merging a layer's two or three calls into one per-layer function was
estimated and left out: a function per combination of index and scale costs ~170 bytes, more
than the ~35 bytes a merged call saves on these 5 to 14-layer models.

The graph is the shrunk model exported without folding batch norms into the convolutions
(``fold_batch_norm=False``): folded, a conv's weight is no longer ``code x scale``. onnxruntime
fuses them again once the decode is folded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from autosparse.compress.apply import qmax_for_bits
from autosparse.compress.bitpack import _index, _layer_mask, _quantized, _uint_bits
from autosparse.compress.footprint import _bits_for, model_footprint
from autosparse.compress.storage import model_zeros
from autosparse.cost.onnx_decode import DOMAIN, OPS, OPSET, functions
from autosparse.cost.onnx_files import export_onnx
from autosparse.space.candidate import (
    CHANNEL,
    DENSE,
    FLOAT_BITS,
    Candidate,
    LayerChoice,
    parse_nm,
)
from autosparse.space.layers import LayerTable
from autosparse.space.structure import layer_structures

COMPACT_FILE = "model.compact.onnx"
IR_VERSION = 8  # model-local functions; onnxruntime 1.14+ reads it

__all__ = ["COMPACT_FILE", "CompactInfo", "CompactLayer", "compact_markdown", "decoded_weights",
           "write_compact_onnx"]


@dataclass(frozen=True)
class CompactLayer:
    """How one searched layer's weight is stored in the file, next to what the score counted.

    ``stored_bits``/``scored_bits``: values + index + scales (the bias is float32 in both, and a
    channel leader's group bitmask is not needed in a graph whose channels are gone). ``note``
    says what the format could not carry and how it was stored instead; empty when nothing.
    """

    layer: str
    initializers: tuple[str, ...]  # the file's tensors holding its decoded weight (short names)
    pattern: str
    bits: int
    storage: str  # none (dense), bitmask, csr, relativeW, nm, or fp32 (left as exported)
    stored_bits: int
    stored_bytes: int  # its initializers: each stream padded to a byte, scales
    scored_bits: int
    max_weight_error: float  # largest |decoded - compressed weight|; 0.0: bit for bit
    note: str = ""


@dataclass(frozen=True)
class CompactInfo:
    """What :func:`write_compact_onnx` wrote: the file's bytes by part and each layer."""

    path: Path
    file_bytes: int
    layer_bytes: int  # the searched layers' streams and scales
    other_bytes: int  # the other parameters (biases, layers outside the search), float32
    buffer_bytes: int  # buffers (batch-norm statistics): outside the score, as in model.packed
    decode_bytes: int  # the decode functions and the nodes calling them
    graph_bytes: int  # the rest: the model's own operators, names, shapes
    layers: tuple[CompactLayer, ...]

    def to_report(self, scored_kb: float | None) -> dict:
        """report.json's ``compact_onnx`` entry: sizes against the scored one, and the layers."""
        scored = None if scored_kb is None else scored_kb * 1000
        return {"file": self.path.name, "file_bytes": self.file_bytes,
                "scored_bytes": scored,
                "ratio_to_scored": None if not scored else self.file_bytes / scored,
                "layer_bytes": self.layer_bytes, "other_bytes": self.other_bytes,
                "buffer_bytes": self.buffer_bytes,
                "decode_bytes": self.decode_bytes, "graph_bytes": self.graph_bytes,
                "layers": [{**asdict(layer), "initializers": list(layer.initializers)}
                           for layer in self.layers]}


@dataclass
class _Encoded:
    """One layer's initializers and nodes (output: the float32 weight under ``out``)."""

    inits: list[TensorProto]
    nodes: list[onnx.NodeProto]
    storage: str
    stored_bits: int


def _packed(name: str, fields: np.ndarray, width: int) -> TensorProto:
    bits = _uint_bits(np.asarray(fields, dtype=np.int64), width)
    return numpy_helper.from_array(np.packbits(bits, bitorder="little"), name)


def _bits_init(name: str, bits: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.packbits(bits.astype(np.uint8), bitorder="little"), name)


def _call(op: str, inputs: list[str], out: str, **attrs: Sequence[int]) -> onnx.NodeProto:
    return helper.make_node(OPS[op], inputs, [out], domain=DOMAIN,
                            **{k: [int(v) for v in value] for k, value in attrs.items()})


def _index_call(fmt: str, index_bits: np.ndarray, values: str, prefix: str,
                shape: list[int], kept: int, pattern: str, perm: tuple[int, ...] | None
                ) -> tuple[list[TensorProto], list[onnx.NodeProto], str]:
    """The index streams of one layer and the call placing its ``values`` (int64 codes or
    float32) where they belong: (initializers, nodes, name of the placed tensor)."""
    n, rows = math.prod(shape), shape[0]
    placed, index = f"{prefix}p", f"{prefix}i"
    if fmt == "none":
        return [], [], values
    if fmt == "bitmask":
        return [_bits_init(index, index_bits)], [
            _call("Bitmask", [values, index], placed, w=[n, 1])], placed
    if fmt == "csr":  # two streams: per-row counts, then columns
        row_len = n // rows
        wc, wj = _bits_for(row_len + 1), _bits_for(row_len)
        return [_bits_init(index, index_bits[:rows * wc]),
                _bits_init(f"{prefix}j", index_bits[rows * wc:])], [
            _call("Csr", [values, index, f"{prefix}j"], placed, c=[rows, wc], j=[kept, wj],
                  r=[row_len], k=[kept + 1], n=[n])], placed
    if fmt.startswith("relative"):
        width = int(fmt.removeprefix("relative"))
        return [_bits_init(index, index_bits)], [
            _call("Relative", [values, index], placed, w=[index_bits.size // width, width],
                  f=[2 ** width - 1], n=[n])], placed
    keep, group = parse_nm(pattern)  # positions in groups of M along the input channels
    view = [shape[p] for p in perm]
    inverse = [perm.index(i) for i in range(len(perm))]
    return [_bits_init(index, index_bits)], [
        _call("Nm", [values, index], placed, w=[kept, _bits_for(group)], k=[n // group, keep],
              m=[n // group, group], v=view, p=inverse)], placed


def _encode(prefix: str, weight: torch.Tensor, choice: LayerChoice, name: str) -> _Encoded:
    """The streams of one layer and the calls that decode them, with ``bitpack``'s own mask,
    codes, scales and index (so the bits are the packed file's, layer for layer)."""
    weight = weight.detach().to("cpu", torch.float32)
    shape, rows = list(weight.shape), weight.shape[0]
    mask = _layer_mask(name, weight, None, choice, None)
    masked = torch.where(mask, weight, torch.zeros_like(weight))
    scale, codes, _ = _quantized(name, choice, masked)
    fmt, index_bits, order_mask, perm = _index(choice, mask, masked if codes is None else codes,
                                               None)

    def kept_of(t: torch.Tensor) -> np.ndarray:  # in the order the index places them
        if perm is not None:
            t = t.permute(perm).reshape(order_mask.shape)
        return t[order_mask].numpy()

    values, kept = f"{prefix}v", int(order_mask.sum())
    if codes is None:  # float32 values, no scale
        inits, nodes = [numpy_helper.from_array(kept_of(masked).astype(np.float32), values)], []
        stored = 32 * kept
    else:
        qmax = qmax_for_bits(choice.bits)
        inits = [_packed(values, kept_of(codes).astype(np.int64) + qmax, choice.bits)]
        nodes = [_call("Unpack", [values], f"{prefix}c", w=[kept, choice.bits], q=[qmax])]
        values, stored = f"{prefix}c", kept * choice.bits
    index_inits, index_nodes, placed = _index_call(fmt, index_bits, values, prefix, shape, kept,
                                                   choice.pattern, perm)
    inits += index_inits
    nodes += index_nodes
    if scale is None:
        nodes.append(_call("Shaped", [placed], f"{prefix}w", s=shape))
    else:
        scales = scale.numpy().astype(np.float32).reshape([rows] + [1] * (len(shape) - 1))
        inits.append(numpy_helper.from_array(scales, f"{prefix}s"))
        nodes.append(_call("Scaled", [placed, f"{prefix}s"], f"{prefix}w", s=shape))
        stored += 32 * rows
    return _Encoded(inits, nodes, fmt, stored + int(index_bits.size))


def _float_initializers(graph: onnx.GraphProto) -> dict[tuple[int, ...], list[TensorProto]]:
    """The graph's float32 initializers by shape (the candidates for a layer's weight)."""
    by_shape: dict[tuple[int, ...], list[TensorProto]] = {}
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            by_shape.setdefault(tuple(init.dims), []).append(init)
    return by_shape


def _matches(by_shape: dict[tuple[int, ...], list[TensorProto]], weight: np.ndarray
             ) -> list[tuple[str, bool]]:
    """Initializers holding ``weight`` (False) or, for a matrix, its transpose (True): the
    exporter names most weights after their module, but stores a MatMul's transposed (and a
    tied weight may be in both forms), so the values decide."""
    found = [(init.name, False) for init in by_shape.get(weight.shape, [])
             if np.array_equal(numpy_helper.to_array(init), weight)]
    if weight.ndim == 2:
        found += [(init.name, True) for init in by_shape.get(weight.shape[::-1], [])
                  if np.array_equal(numpy_helper.to_array(init), weight.T)
                  and (init.name, False) not in found]
    return found


def _scored_bits(table: LayerTable, candidate: Candidate, shrunk: nn.Module) -> dict[str, int]:
    """Per layer, the score's values + index + scales, less a leader's group bitmask."""
    footprint = model_footprint(table, candidate, model_zeros(shrunk, table, candidate))
    structures = layer_structures(table, candidate)
    out = {}
    for layer, fp in zip(table.layers, footprint.layers):
        group = layer.out_channels if structures[layer.name].leads is not None else 0
        out[layer.name] = fp.value_bits + fp.index_bits + fp.scale_bits - group
    return out


def write_compact_onnx(shrunk: nn.Module, table: LayerTable, candidate: Candidate,
                       input_shape: Sequence[int], path: str | Path) -> CompactInfo:
    """Write ``shrunk`` (the baked model with its channel groups removed, as export has it) as
    ``path`` with every searched weight stored at its searched bits and sparsity, check that the
    decoded weights are the model's, and say what was stored how.

    A searched layer kept dense at float32 needs nothing. Raises ``ValueError`` (naming the
    layer) when a weight is not on its quantization grid or breaks its pattern: that is not the
    compressed model of ``candidate``.
    """
    path = Path(path)
    export_onnx(shrunk, input_shape, path, fold_batch_norm=False)
    model = onnx.load(str(path))
    _slim(model.graph)
    by_shape = _float_initializers(model.graph)
    modules = dict(shrunk.named_modules())
    scored = _scored_bits(table, candidate, shrunk)
    replaced: dict[str, str] = {}  # initializer -> the layer whose decoded weight replaces it
    expected: dict[str, np.ndarray] = {}  # initializer -> the value its decode must give
    decode: list[onnx.NodeProto] = []
    streams: set[str] = set()  # the initializers written for the searched layers
    layers = []
    for i, layer in enumerate(table.layers):
        choice = candidate.get_choice(layer.name)
        weight = modules[layer.name].weight.detach().cpu().float()
        targets = [(name, t) for name, t in _matches(by_shape, weight.numpy())
                   if name not in replaced]
        kept_float = {"initializers": (), "storage": "fp32", "stored_bits": 32 * weight.numel(),
                      "stored_bytes": 4 * weight.numel(), "max_weight_error": 0.0}
        common = {"layer": layer.name, "pattern": choice.pattern, "bits": choice.bits,
                  "scored_bits": scored[layer.name]}
        if choice.bits == FLOAT_BITS and choice.pattern in (DENSE, CHANNEL):
            layers.append(CompactLayer(**kept_float, **common))  # stored as scored already
            continue
        if not targets:
            layers.append(CompactLayer(**kept_float, **common, note=(
                "its weight is not an initializer of the exported graph (the exporter folded it "
                "into another constant): stored as exported, float32")))
            continue
        encoded = _encode(f"w{i}", weight, choice, layer.name)
        model.graph.initializer.extend(encoded.inits)
        streams.update(t.name for t in encoded.inits)
        # the last node writes the weight under its initializer's name; a transposed or second
        # copy (a MatMul's, a tied weight) is made from it
        direct = [name for name, transposed in targets if not transposed]
        out = encoded.nodes[-1].output[0] = direct[0] if direct else f"w{i}w"
        decode += encoded.nodes
        for name, transposed in targets:
            replaced[name] = layer.name
            expected[name] = weight.numpy().T if transposed else weight.numpy()
            if transposed:
                decode.append(helper.make_node("Transpose", [out], [name]))  # 2-D: reversed
            elif name != out:
                decode.append(helper.make_node("Identity", [out], [name]))
        layers.append(CompactLayer(
            initializers=tuple(name for name, _ in targets), storage=encoded.storage,
            stored_bits=encoded.stored_bits,
            stored_bytes=sum(_raw_bytes(t) for t in encoded.inits), max_weight_error=0.0,
            **common))
    _replace(model, replaced, decode)
    names = _rename(model)  # every tensor but the graph's input and output: a short name
    onnx.save(model, str(path))
    expected = {names[name]: value for name, value in expected.items()}
    errors = _check_weights(path, expected, {names[name]: layer for name, layer in
                                             replaced.items()})
    layers = [replace(layer, initializers=tuple(names[name] for name in layer.initializers),
                      max_weight_error=errors.get(layer.layer, 0.0)) for layer in layers]
    return _info(path, model, layers, len(decode), {names[name] for name in streams},
                 {names[name] for name, _ in shrunk.named_buffers() if name in names})


def _raw_bytes(tensor: TensorProto) -> int:
    return int(numpy_helper.to_array(tensor).nbytes)


def _is_default(op: str, attr: onnx.AttributeProto) -> bool:
    """Whether ``attr`` only restates its operator's default (``dilations=1``, ``alpha=1.0``)."""
    try:
        schema = onnx.defs.get_schema(op, OPSET)
    except onnx.defs.SchemaError:
        return False
    spec = schema.attributes.get(attr.name)
    if spec is None or not spec.default_value.name:
        # documented defaults without a schema value: stride and dilation 1, no padding
        unit = {"dilations": {1}, "strides": {1}, "pads": {0}}.get(attr.name)
        return op in ("Conv", "MaxPool", "AveragePool") and unit is not None and \
            bool(attr.ints) and set(attr.ints) == unit
    default = spec.default_value
    return helper.get_attribute_value(attr) == helper.get_attribute_value(default)


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in graph.node for attr in node.attribute)


def _slim(graph: onnx.GraphProto) -> None:
    """Node names and doc strings dropped, attributes that restate their default removed (the
    exporter's ``dilations=[1, 1]``, ``alpha=1.0``, a Conv's ``kernel_shape`` that its weight's
    shape gives), literal int64 and float32 Constants written as ``value_int(s)`` /
    ``value_float(s)`` when shorter (the same tensor), and shape hints (``value_info``) dropped:
    on the quickstart knee the exporter's names and defaults took 1.3 kB of 15 kB. A graph with
    subgraphs is left as it is."""
    if _has_subgraphs(graph):
        return
    dims = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        node.ClearField("name")
        node.ClearField("doc_string")
        kept = [a for a in node.attribute if node.domain or not _is_default(node.op_type, a)
                and not _given_by_weight(node, a, dims)]
        del node.attribute[:]
        node.attribute.extend(kept)
        if node.op_type == "Constant" and not node.domain:
            _literal(node)
    graph.ClearField("value_info")
    graph.ClearField("doc_string")


def _given_by_weight(node: onnx.NodeProto, attr: onnx.AttributeProto,
                     dims: dict[str, list[int]]) -> bool:
    """A Conv's ``kernel_shape`` equal to its weight initializer's spatial dims: optional, the
    operator reads it from the weight (which the decode rebuilds in that shape)."""
    weight = dims.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    return attr.name == "kernel_shape" and weight is not None and list(attr.ints) == weight[2:]


def _literal(node: onnx.NodeProto) -> None:
    """A Constant's int64 or float32 scalar/vector ``value`` as ``value_int(s)`` /
    ``value_float(s)`` (the same tensor) where that is shorter (a negative int is a 10-byte
    varint)."""
    (attr,) = node.attribute
    if attr.name != "value":
        return
    array = numpy_helper.to_array(attr.t)
    kinds = {np.dtype(np.int64): ("value_int", "value_ints"),
             np.dtype(np.float32): ("value_float", "value_floats")}
    if array.dtype not in kinds or array.ndim > 1 or array.size == 0:
        return
    scalar, vector = kinds[array.dtype]
    new = helper.make_attribute(vector, array.tolist()) if array.ndim else \
        helper.make_attribute(scalar, array.item())
    if new.ByteSize() < attr.ByteSize():
        del node.attribute[:]
        node.attribute.append(new)


def _short_names(taken: set[str]):
    """``a .. z, A .. Z, aa, ab, ...``, skipping ``taken``."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
        [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    i = 0
    while True:
        i += 1
        n, name = i, ""
        while n:
            n, digit = divmod(n - 1, len(letters))
            name = letters[digit] + name
        if name not in taken:
            yield name


def _rename(model: onnx.ModelProto) -> dict[str, str]:
    """Every tensor but the graph's inputs and outputs renamed ``a, b, ...`` (initializers
    first), the graph ``g``, the producer fields cleared: on the ViT front point the
    exporter's ``hf.vit.layers.0.attention.q_proj.bias`` names, each written where it is made
    and where it is read, took 2.5 kB of 28. Returns old -> new (identity for a graph with
    subgraphs, whose names are left as they are)."""
    graph = model.graph
    model.ClearField("producer_name")
    model.ClearField("producer_version")
    graph.name = "g"  # the checker wants one
    everything = [init.name for init in graph.initializer] + \
        [x for node in graph.node for x in [*node.input, *node.output] if x]
    if _has_subgraphs(graph):
        return {name: name for name in everything}
    inits = {init.name for init in graph.initializer}
    keep = {x.name for x in graph.input if x.name not in inits} | {x.name for x in graph.output}
    fresh = _short_names(keep)
    names = {name: name for name in keep}
    for name in everything:
        if name not in names:
            names[name] = next(fresh)
    for init in graph.initializer:
        init.name = names[init.name]
    for node in graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]
    for info in graph.input:
        info.name = names.get(info.name, info.name)
    return names


def _replace(model: onnx.ModelProto, replaced: dict[str, str], nodes: list[onnx.NodeProto]
             ) -> None:
    """Drop the replaced fp32 initializers, put the decode nodes first (they read only
    initializers) and the library's functions in, at IR 8 with the decode domain imported."""
    graph = model.graph
    keep = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [x for x in graph.input if x.name not in replaced]  # old IRs list weights as inputs
    del graph.input[:]
    graph.input.extend(inputs)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    used = {node.op_type for node in nodes if node.domain == DOMAIN}
    if used:
        model.functions.extend(functions(used))
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    model.ir_version = max(model.ir_version, IR_VERSION)
    onnx.checker.check_model(model)


def decoded_weights(path: str | Path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The weights ``path``'s decode nodes produce (``names``, or every tensor computed from
    initializers alone that the model's other nodes read), computed by onnxruntime on a graph of
    just the nodes computing them, graph optimisation off: the decode operators themselves run,
    not a folded copy."""
    model = onnx.load(str(path))
    graph = model.graph
    constant = {init.name for init in graph.initializer}
    decode, rest = [], []
    for node in graph.node:
        if all(x in constant for x in node.input if x):
            decode.append(node)
            constant.update(node.output)
        else:
            rest.append(node)
    read = {x for node in rest for x in node.input} | {x.name for x in graph.output}
    outputs = [out for node in decode for out in node.output if out in read] \
        if names is None else list(names)
    if not outputs:
        return {}
    needed = {x for node in decode for x in node.input}
    sub = helper.make_graph(decode, "decode", [], [helper.make_value_info(o, onnx.TypeProto())
                                                   for o in outputs],
                            [init for init in graph.initializer if init.name in needed])
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import),
                                  functions=list(model.functions))
    sub_model.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(sub_model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return dict(zip(outputs, session.run(outputs, {})))


def _check_weights(path: Path, expected: dict[str, np.ndarray], replaced: dict[str, str]
                   ) -> dict[str, float]:
    """Largest |decoded - model weight| per layer; a weight off by more than the few float32
    ulps ``bitpack`` allows for a nudged scale is a bug, not a rounding: raise."""
    decoded = decoded_weights(path, list(expected))
    errors: dict[str, float] = {}
    for name, want in expected.items():
        got = decoded[name]
        layer = replaced[name]
        if got.shape != want.shape:
            raise ValueError(f"layer {layer!r}: decoded weight {name!r} has shape {got.shape}, "
                             f"the model's {want.shape}")
        error = float(np.abs(got - want).max()) if want.size else 0.0
        limit = 4 * np.finfo(np.float32).eps * float(np.abs(want).max(initial=0.0))
        if error > limit:
            raise ValueError(f"layer {layer!r}: the decoded weight {name!r} differs from the "
                             f"model's by {error:.3g} (allowed {limit:.3g})")
        errors[layer] = max(errors.get(layer, 0.0), error)
    return errors


def _info(path: Path, model: onnx.ModelProto, layers: list[CompactLayer],
          decode_nodes: int, streams: set[str], buffers: set[str]) -> CompactInfo:
    """The file's bytes by part. ``streams``: the searched layers' initializers; ``buffers``:
    the model's buffers; every other float initializer is a parameter the score counts at
    float32, and the exporter's integer constants (shapes, axes) go with the graph."""
    inits = model.graph.initializer
    layer_bytes = sum(_raw_bytes(t) for t in inits if t.name in streams)
    buffer_bytes = sum(_raw_bytes(t) for t in inits if t.name in buffers)
    other_bytes = sum(_raw_bytes(t) for t in inits if t.data_type == TensorProto.FLOAT
                      and t.name not in streams and t.name not in buffers)
    decode = sum(f.ByteSize() for f in model.functions) + \
        sum(n.ByteSize() for n in model.graph.node[:decode_nodes])
    file_bytes = path.stat().st_size
    return CompactInfo(path=path, file_bytes=file_bytes, layer_bytes=layer_bytes,
                       other_bytes=other_bytes, buffer_bytes=buffer_bytes, decode_bytes=decode,
                       graph_bytes=file_bytes - layer_bytes - other_bytes - buffer_bytes - decode,
                       layers=tuple(layers))


def compact_markdown(report: dict) -> list[str]:
    """report.md's section on ``model.compact.onnx`` from report.json (nothing for a report
    without one): its size against the score, its latency against ``model.onnx``'s, and how
    each searched layer is stored."""
    entry = report.get("compact_onnx")
    if not entry:
        return []
    ratio, scored = entry.get("ratio_to_scored"), entry.get("scored_bytes")
    lines = ["## model.compact.onnx", "",
             f"{entry['file_bytes'] / 1000:.2f} kB"
             + (f" against the scored {scored / 1000:.2f} kB ({ratio:.2f}×)" if ratio else "")
             + f": searched weights {entry['layer_bytes'] / 1000:.2f} kB, other parameters "
             f"(float32) {entry['other_bytes'] / 1000:.2f} kB"
             + (f", buffers (not scored) {entry['buffer_bytes'] / 1000:.2f} kB"
                if entry.get("buffer_bytes") else "")
             + f", weight decoding "
             f"{entry['decode_bytes'] / 1000:.2f} kB, the model's graph "
             f"{entry['graph_bytes'] / 1000:.2f} kB. Standard ONNX operators: onnxruntime "
             "decodes the weights once, when it loads the file, and then runs `model.onnx`'s "
             "kernels on them."]
    latency = report.get("latency_ms_measured", {})
    if "onnx_compact" in latency and "onnx" in latency:
        lines[-1] += (f" Measured {latency['onnx_compact']:.4f} ms per call vs "
                      f"{latency['onnx']:.4f} ms for `model.onnx`.")
    lines += ["", "| layer | choice | stored as | stored bits | scored bits | note |",
              "|---|---|---|---|---|---|"]
    for layer in entry["layers"]:
        bits = "fp32" if layer["bits"] == FLOAT_BITS else f"int{layer['bits']}"
        lines.append(f"| {layer['layer']} | {layer['pattern']}/{bits} | {layer['storage']} | "
                     f"{layer['stored_bits']} | {layer['scored_bits']} | {layer['note']} |")
    return lines + [""]
