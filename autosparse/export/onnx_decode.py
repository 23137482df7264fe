"""ONNX functions that rebuild a searched layer's weight from the bits ``model.compact.onnx``
stores (``compact_onnx``): b-bit codes, a sparse index and per-row scales.

Why functions made of standard operators: ONNX has tensor types for 4, 8 and 16-bit integers
but none for 2, 3, 5, 6 or 7 bits, and no sparse layout but COO (``sparse_initializer``: a
position of >= 8 bits per kept value, no int4 values), where the score counts a bitmask bit or
a short relative step (``compact_onnx`` has the measurements). So every stream is stored as the
exact bits the score counts, in ``uint8`` initializers, and a few standard operators (BitShift,
Mod, MatMul, CumSum, Gather, ScatterElements, ...) unpack them. Every input of those operators
is a constant, so onnxruntime folds the whole decode into plain float32 weights when it loads
the file (graph optimisation level basic or above, its default): inference then runs the same
kernels as ``model.onnx``. Operators onnxruntime does not fold are avoided: ``Compress`` and
``NonZero`` (data-dependent shapes; with them the knee ran 10x slower, decoding on every call),
``CastLike`` (no kernel), ``DequantizeLinear`` (kept for QDQ fusion).

Model-local functions (ONNX IR >= 8, domain :data:`DOMAIN`) hold the decode once, so a layer
costs one to three calls instead of ~25 operators: ``onnx.inliner.inline_local_functions``
made the quickstart knee's file 21.7 kB instead of 13.6 kB. onnxruntime inlines them at load;
the inlined file is for a tool that reads no local functions (it decodes and folds alike).

Streams are LSB-first, as ``export.bitpack`` writes them: value ``i`` of width ``w`` is bits
``i*w .. i*w+w-1`` of the stream, bit ``j`` of a byte is ``(byte >> j) & 1``.
"""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto, FunctionProto, TensorProto, helper, numpy_helper

DOMAIN = "autosparse"
OPSET = 17  # the opset of the exported graph (cost.onnx_files); every operator here has it
_INTS = AttributeProto.INTS

__all__ = ["DOMAIN", "functions"]


def _const(out: str, attr: str, kind: int = _INTS):
    """A Constant whose ``value_ints`` (or ``value_int``) is the calling node's ``attr``."""
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(helper.make_attribute_ref(
        "value_ints" if kind == _INTS else "value_int", kind, ref_attr_name=attr))
    return node


def _tensor(out: str, array: np.ndarray):
    """A literal Constant; int64 ones as ``value_ints``/``value_int``, ~20 bytes smaller each
    than a tensor."""
    if array.dtype == np.int64 and array.ndim <= 1:
        if array.ndim:
            return helper.make_node("Constant", [], [out], value_ints=array.tolist())
        return helper.make_node("Constant", [], [out], value_int=int(array))
    return helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array))


def _function(name: str, inputs: list[str], outputs: list[str], nodes: list,
              attributes: list[str]) -> FunctionProto:
    opsets = [helper.make_opsetid("", OPSET)]
    if any(node.domain == DOMAIN for node in nodes):  # it calls another function here
        opsets.append(helper.make_opsetid(DOMAIN, 1))
    return helper.make_function(DOMAIN, name, inputs, outputs, nodes, opsets, attributes)


def _call(name: str, inputs: list[str], outputs: list[str], **refs: str):
    """A call of another function of the library whose attributes pass the caller's on."""
    node = helper.make_node(name, inputs, outputs, domain=DOMAIN)
    node.attribute.extend(helper.make_attribute_ref(attr, _INTS, ref_attr_name=source)
                          for attr, source in refs.items())
    return node


def _unpack() -> FunctionProto:
    """``Unpack<cw=[count, width]>(bytes) -> int64 (count,)``: unsigned fields of a stream:
    the stream's bits (``(byte >> j) % 2``), the first ``count * width`` of them as rows of
    ``width``, each row dotted with ``2^0 .. 2^(width-1)``."""
    return _function("Unpack", ["bytes"], ["out"], [
        _const("cw", "cw"),
        _tensor("ax", np.array([1], np.int64)),
        helper.make_node("Unsqueeze", ["bytes", "ax"], ["u"]),
        _tensor("sh", np.arange(8, dtype=np.uint8)),
        helper.make_node("BitShift", ["u", "sh"], ["s"], direction="RIGHT"),
        _tensor("two", np.array(2, np.uint8)),
        helper.make_node("Mod", ["s", "two"], ["b"]),
        _tensor("flat", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["b", "flat"], ["f"]),
        helper.make_node("ReduceProd", ["cw"], ["n"]),  # keepdims: [count * width]
        _tensor("zero", np.array([0], np.int64)),
        helper.make_node("Slice", ["f", "zero", "n"], ["sl"]),
        helper.make_node("Reshape", ["sl", "cw"], ["r"]),
        helper.make_node("Cast", ["r"], ["c"], to=TensorProto.INT64),
        _tensor("one", np.array(1, np.int64)),
        helper.make_node("Gather", ["cw", "one"], ["w"]),
        _tensor("z", np.array(0, np.int64)),
        helper.make_node("Range", ["z", "w", "one"], ["k"]),
        _tensor("two64", np.array(2, np.int64)),
        helper.make_node("Pow", ["two64", "k"], ["pw"]),
        helper.make_node("MatMul", ["c", "pw"], ["out"]),
    ], ["cw"])


def _codes() -> FunctionProto:
    """``Codes<cw=[kept, bits], q=[qmax]>(bytes) -> int64 codes``: offset-binary ``code + qmax``
    back to signed integer levels."""
    return _function("Codes", ["bytes"], ["out"], [
        _call("Unpack", ["bytes"], ["u"], cw="cw"),
        _const("q", "q"),
        helper.make_node("Sub", ["u", "q"], ["out"]),
    ], ["cw", "q"])


def _scaled() -> FunctionProto:
    """``Scaled<shape>(codes, scale) -> float weight``: ``code * scale`` per row, one float32
    multiply, exactly as the quantizer computed the weight."""
    return _function("Scaled", ["codes", "scale"], ["out"], [
        _const("shape", "shape"),
        helper.make_node("Reshape", ["codes", "shape"], ["r"]),
        # Cast, not CastLike: onnxruntime has no kernel for CastLike and cannot fold it once
        # the functions are inlined by another tool
        helper.make_node("Cast", ["r"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["out"]),
    ], ["shape"])


def _shaped() -> FunctionProto:
    """``Shaped<shape>(values) -> weight``: a float32 layer's placed values in its shape."""
    return _function("Shaped", ["values"], ["out"], [
        _const("shape", "shape"),
        helper.make_node("Reshape", ["values", "shape"], ["out"]),
    ], ["shape"])


def _place() -> FunctionProto:
    """``Place(values, mask) -> flat``: kept value ``i`` goes to the mask's ``i``-th one:
    ``Gather`` of ``[0, values...]`` at ``cumsum(mask) * mask``. Every sparse layout below is
    turned into a 0/1 mask first because the gathers and scatters that build it are folded by
    onnxruntime at load, while ``Compress``/``NonZero`` (data-dependent shapes) are not, and
    would then run on every call (measured 10x slower)."""
    return _function("Place", ["values", "mask"], ["out"], [
        _tensor("axis", np.array(0, np.int64)),
        helper.make_node("CumSum", ["mask", "axis"], ["c"]),
        helper.make_node("Mul", ["c", "mask"], ["idx"]),
        _tensor("zero", np.array([0], np.int64)),
        _tensor("one", np.array([1], np.int64)),
        helper.make_node("Slice", ["values", "zero", "one"], ["first"]),
        helper.make_node("Sub", ["first", "first"], ["z"]),  # a zero of the values' type
        helper.make_node("Concat", ["z", "values"], ["padded"], axis=0),
        helper.make_node("Gather", ["padded", "idx"], ["out"]),
    ], [])


def _bitmask() -> FunctionProto:
    """``Bitmask<cw=[n, 1]>(values, mask) -> flat (n,)``: one bit per weight."""
    return _function("Bitmask", ["values", "mask"], ["out"], [
        _call("Unpack", ["mask"], ["m"], cw="cw"),
        _call("Place", ["values", "m"], ["out"]),
    ], ["cw"])


def _mark_nodes(positions: str, ones: str, n_attr: str) -> list:
    """A 0/1 mask of length ``@n_attr`` with ``ones`` written at ``positions`` -> ``mask``."""
    return [
        _const("n", n_attr),
        helper.make_node("ConstantOfShape", ["n"], ["zeros"],
                         value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("ScatterElements", ["zeros", positions, ones], ["mask"]),
    ]


def _csr() -> FunctionProto:
    """``Csr<cc=[rows, wc], cj=[kept, wj], r=[row length], k1=[kept + 1], n=[size]>(values,
    counts, columns) -> flat``: per row the number of kept weights, then each one's column.
    A kept weight's row is how many rows after the first start at or before it (a one added at
    each row's start, then cumsum), its position ``row * r + column``."""
    return _function("Csr", ["values", "counts", "columns"], ["out"], [
        _call("Unpack", ["counts"], ["cnt"], cw="cc"),
        _call("Unpack", ["columns"], ["col"], cw="cj"),
        _tensor("axis", np.array(0, np.int64)),
        helper.make_node("CumSum", ["cnt", "axis"], ["ends"]),
        _tensor("zero", np.array([0], np.int64)),
        _tensor("stop", np.array([-1], np.int64)),
        helper.make_node("Slice", ["ends", "zero", "stop"], ["starts"]),  # of rows 1..O-1
        _const("k1", "k1"),
        helper.make_node("ConstantOfShape", ["k1"], ["zk"],
                         value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Shape", ["starts"], ["rows"]),
        helper.make_node("ConstantOfShape", ["rows"], ["ones"],
                         value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("ScatterElements", ["zk", "starts", "ones"], ["marks"],
                         reduction="add"),
        helper.make_node("CumSum", ["marks", "axis"], ["rowk1"]),
        helper.make_node("Shape", ["col"], ["kept"]),
        helper.make_node("Slice", ["rowk1", "zero", "kept"], ["row"]),
        _const("r", "r"),
        helper.make_node("Mul", ["row", "r"], ["base"]),
        helper.make_node("Add", ["base", "col"], ["p"]),
        helper.make_node("ConstantOfShape", ["kept"], ["kept_ones"],
                         value=numpy_helper.from_array(np.array([1], np.int64))),
        *_mark_nodes("p", "kept_ones", "n"),
        _call("Place", ["values", "mask"], ["out"]),
    ], ["cc", "cj", "r", "k1", "n"])


def _relative() -> FunctionProto:
    """``Relative<ce=[entries, w], fill=[2^w - 1], n=[size]>(values, entries) -> flat``: code
    c >= 1 steps c positions to the next kept weight, 0 is a filler stepping 2^w - 1 (Deep
    Compression; ``bitpack.relative_codes``). A filler lands strictly between two kept
    weights, so writing each entry's ``code > 0`` at the position it reaches marks exactly the
    kept ones."""
    return _function("Relative", ["values", "entries"], ["out"], [
        _call("Unpack", ["entries"], ["e"], cw="ce"),
        _const("fill", "fill"),
        _tensor("zero", np.array(0, np.int64)),
        helper.make_node("Equal", ["e", "zero"], ["is_filler"]),
        helper.make_node("Where", ["is_filler", "fill", "e"], ["step"]),
        helper.make_node("CumSum", ["step", "zero"], ["reach"]),
        _tensor("one", np.array(1, np.int64)),
        helper.make_node("Sub", ["reach", "one"], ["at"]),
        helper.make_node("Where", ["is_filler", "zero", "one"], ["is_value"]),
        *_mark_nodes("at", "is_value", "n"),
        _call("Place", ["values", "mask"], ["out"]),
    ], ["ce", "fill", "n"])


def _nm() -> FunctionProto:
    """``Nm<cp=[kept, w], gk=[groups, N], gm=[groups, M], view=(O, *k, I), perm>(values,
    positions) -> weight layout``: each kept value's position in its group of M along the input
    channels (``(O, I, *k)`` viewed as ``(O, *k, I)``, as ``compress.compute_mask`` groups
    them), as a mask of that view; placed, then transposed back by ``perm``."""
    return _function("Nm", ["values", "positions"], ["out"], [
        _call("Unpack", ["positions"], ["p"], cw="cp"),
        _const("gk", "gk"),
        helper.make_node("Reshape", ["p", "gk"], ["pg"]),
        helper.make_node("ConstantOfShape", ["gk"], ["ones"],
                         value=numpy_helper.from_array(np.array([1], np.int64))),
        _const("gm", "gm"),
        helper.make_node("ConstantOfShape", ["gm"], ["zeros"],
                         value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("ScatterElements", ["zeros", "pg", "ones"], ["groups"], axis=1),
        _tensor("flat", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["groups", "flat"], ["mask"]),
        _call("Place", ["values", "mask"], ["placed"]),
        _const("view", "view"),
        helper.make_node("Reshape", ["placed", "view"], ["viewed"]),
        _transpose("viewed", "out"),
    ], ["cp", "gk", "gm", "view", "perm"])


def _transpose(x: str, out: str):
    node = helper.make_node("Transpose", [x], [out])
    node.attribute.append(helper.make_attribute_ref("perm", _INTS))
    return node


_LIBRARY = {"Unpack": _unpack, "Place": _place, "Codes": _codes, "Scaled": _scaled,
            "Shaped": _shaped, "Bitmask": _bitmask, "Csr": _csr, "Relative": _relative,
            "Nm": _nm}
_NEEDS = {"Codes": ("Unpack",), "Bitmask": ("Unpack", "Place"), "Csr": ("Unpack", "Place"),
          "Relative": ("Unpack", "Place"), "Nm": ("Unpack", "Place")}


def _short(function: FunctionProto) -> FunctionProto:
    """The function with its values renamed ``a, b, ...``: the readable names above cost ~15 %
    of the library's bytes in every file, and only the calls' positions and attribute names
    matter to a caller."""
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name and name not in names:
            i, label = len(names), ""
            while True:
                label += chr(ord("a") + i % 26)
                i //= 26
                if not i:
                    break
            names[name] = label
        return names.get(name, name)

    function.input[:] = [short(x) for x in function.input]
    function.output[:] = [short(x) for x in function.output]
    for node in function.node:
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    return function


def functions(used: set[str]) -> list[FunctionProto]:
    """The library's functions that ``used`` names, with the ones they call (only what the file
    needs travels in it)."""
    names = set(used)
    for name in used:
        names.update(_NEEDS.get(name, ()))
    return [_short(_LIBRARY[name]()) for name in _LIBRARY if name in names]
