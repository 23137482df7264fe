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

Every byte here is paid once per file, and a call's operator and domain name once per call, so
the file holds them as single letters (:data:`OPS`: ``C`` codes, ``S`` scaled, ``F`` float
shaped, ``B`` bitmask, ``R`` CSR, ``D`` relative steps, ``N`` N:M, ``U`` unpack, ``P`` place;
domain ``a``): with the cheaper bodies below this took the knee's decode from 2.5 to 1.75 kB.
A constant costs ~30 bytes and an operator ~15, so a zero or a two that another constant gives
is computed (``Sub(one, one)``, ``Add(one, one)``).

Streams are LSB-first, as ``compress.bitpack`` writes them: value ``i`` of width ``w`` is bits
``i*w .. i*w+w-1`` of the stream, bit ``j`` of a byte is ``(byte >> j) & 1``.
"""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto, FunctionProto, TensorProto, helper, numpy_helper

DOMAIN = "a"  # autosparse: a byte per call and function, so one letter
OPSET = 17  # the opset of the exported graph (cost.onnx_files); every operator here has it
_INTS = AttributeProto.INTS

__all__ = ["DOMAIN", "OPS", "functions"]

# the name each function has in a file (the readable ones are this module's)
OPS = {"Unpack": "U", "Place": "P", "Scaled": "S", "Shaped": "F", "Bitmask": "B", "Csr": "R",
       "Relative": "D", "Nm": "N"}


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
    return helper.make_function(DOMAIN, OPS[name], inputs, outputs, nodes, opsets, attributes)


def _filled(shape: str, out: str, value: int):
    """``ConstantOfShape`` of int64 ``value``: the value in ``int64_data`` (3 bytes, not the
    10 of ``numpy_helper``'s raw data)."""
    return helper.make_node("ConstantOfShape", [shape], [out],
                            value=helper.make_tensor("", TensorProto.INT64, [1], [value]))


def _call(name: str, inputs: list[str], outputs: list[str], q: int | None = None,
          **refs: str):
    """A call of another function of the library whose attributes pass the caller's on
    (``refs``: callee's attribute = caller's), and a literal ``q`` for ``Unpack``."""
    node = helper.make_node(OPS[name], inputs, outputs, domain=DOMAIN)
    node.attribute.extend(helper.make_attribute_ref(attr, _INTS, ref_attr_name=source)
                          for attr, source in refs.items())
    if q is not None:
        node.attribute.append(helper.make_attribute("q", [q]))
    return node


def _unpack() -> FunctionProto:
    """``Unpack<w=[count, width], q=[offset]>(bytes) -> int64 (count,)``: fields of a stream,
    less ``q``: the stream's bits (``byte / 2^j % 2``, as int64), the first ``count * width``
    of them as rows of ``width``, each row dotted with ``2^0 .. 2^(width-1)``. ``q = qmax``
    turns a layer's offset-binary ``code + qmax`` back into its signed levels (a layer's call;
    an index stream is called with ``q = 0``)."""
    return _function("Unpack", ["bytes"], ["out"], [
        _const("cw", "w"),
        _tensor("ax", np.array([1], np.int64)),
        _tensor("p8", 2 ** np.arange(8, dtype=np.int64)),
        helper.make_node("Squeeze", ["ax"], ["one"]),  # scalar 1
        helper.make_node("Cast", ["bytes"], ["x"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
        helper.make_node("Div", ["u", "p8"], ["s"]),  # (bytes, 8): byte / 2^j
        helper.make_node("Add", ["one", "one"], ["two"]),
        helper.make_node("Mod", ["s", "two"], ["b"]),
        helper.make_node("Flatten", ["b"], ["f"], axis=0),  # (1, 8 * bytes), in stream order
        helper.make_node("ReduceProd", ["cw"], ["n"]),  # keepdims: [count * width]
        helper.make_node("Sub", ["ax", "ax"], ["zero"]),
        helper.make_node("Slice", ["f", "zero", "n", "ax"], ["sl"]),
        helper.make_node("Reshape", ["sl", "cw"], ["r"]),
        helper.make_node("Gather", ["cw", "one"], ["w"]),
        helper.make_node("Sub", ["one", "one"], ["z"]),
        helper.make_node("Range", ["z", "w", "one"], ["k"]),
        helper.make_node("Pow", ["two", "k"], ["pw"]),
        helper.make_node("MatMul", ["r", "pw"], ["field"]),
        _const("q", "q"),
        helper.make_node("Sub", ["field", "q"], ["out"]),
    ], ["w", "q"])


def _scaled() -> FunctionProto:
    """``Scaled<s=shape>(codes, scale) -> float weight``: ``code * scale`` per row, one float32
    multiply, exactly as the quantizer computed the weight."""
    return _function("Scaled", ["codes", "scale"], ["out"], [
        _const("shape", "s"),
        helper.make_node("Reshape", ["codes", "shape"], ["r"]),
        # Cast, not CastLike: onnxruntime has no kernel for CastLike and cannot fold it once
        # the functions are inlined by another tool
        helper.make_node("Cast", ["r"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["out"]),
    ], ["s"])


def _shaped() -> FunctionProto:
    """``Shaped<s=shape>(values) -> weight``: a float32 layer's placed values in its shape."""
    return _function("Shaped", ["values"], ["out"], [
        _const("shape", "s"),
        helper.make_node("Reshape", ["values", "shape"], ["out"]),
    ], ["s"])


def _place() -> FunctionProto:
    """``Place(values, mask) -> flat``: kept value ``i`` goes to the mask's ``i``-th one:
    ``Gather`` of ``[0, values...]`` at ``cumsum(mask) * mask``. Every sparse layout below is
    turned into a 0/1 mask first because the gathers and scatters that build it are folded by
    onnxruntime at load, while ``Compress``/``NonZero`` (data-dependent shapes) are not, and
    would then run on every call (measured 10x slower)."""
    return _function("Place", ["values", "mask"], ["out"], [
        _tensor("one", np.array([1], np.int64)),
        helper.make_node("Sub", ["one", "one"], ["zero"]),
        helper.make_node("Squeeze", ["zero"], ["axis"]),  # scalar 0
        helper.make_node("CumSum", ["mask", "axis"], ["c"]),
        helper.make_node("Mul", ["c", "mask"], ["idx"]),
        helper.make_node("Slice", ["values", "zero", "one"], ["first"]),
        helper.make_node("Sub", ["first", "first"], ["z"]),  # a zero of the values' type
        helper.make_node("Concat", ["z", "values"], ["padded"], axis=0),
        helper.make_node("Gather", ["padded", "idx"], ["out"]),
    ], [])


def _bitmask() -> FunctionProto:
    """``Bitmask<w=[n, 1]>(values, mask) -> flat (n,)``: one bit per weight."""
    return _function("Bitmask", ["values", "mask"], ["out"], [
        _call("Unpack", ["mask"], ["m"], q=0, w="w"),
        _call("Place", ["values", "m"], ["out"]),
    ], ["w"])


def _mark_nodes(positions: str, ones: str, n_attr: str) -> list:
    """A 0/1 mask of length ``@n_attr`` with ``ones`` written at ``positions`` -> ``mask``."""
    return [
        _const("n", n_attr),
        _filled("n", "zeros", 0),
        helper.make_node("ScatterElements", ["zeros", positions, ones], ["mask"]),
    ]


def _csr() -> FunctionProto:
    """``Csr<c=[rows, wc], j=[kept, wj], r=[row length], k=[kept + 1], n=[size]>(values,
    counts, columns) -> flat``: per row the number of kept weights, then each one's column.
    A kept weight's row is how many rows after the first start at or before it (a one added at
    each row's start, then cumsum), its position ``row * r + column``."""
    return _function("Csr", ["values", "counts", "columns"], ["out"], [
        _call("Unpack", ["counts"], ["cnt"], q=0, w="c"),
        _call("Unpack", ["columns"], ["col"], q=0, w="j"),
        _tensor("axis", np.array(0, np.int64)),
        helper.make_node("CumSum", ["cnt", "axis"], ["ends"]),
        _tensor("stop", np.array([-1], np.int64)),
        helper.make_node("Sub", ["stop", "stop"], ["zero"]),
        helper.make_node("Slice", ["ends", "zero", "stop"], ["starts"]),  # of rows 1..O-1
        _const("k1", "k"),
        _filled("k1", "zk", 0),
        helper.make_node("Shape", ["starts"], ["rows"]),
        _filled("rows", "ones", 1),
        helper.make_node("ScatterElements", ["zk", "starts", "ones"], ["marks"],
                         reduction="add"),
        helper.make_node("CumSum", ["marks", "axis"], ["rowk1"]),
        helper.make_node("Shape", ["col"], ["kept"]),
        helper.make_node("Slice", ["rowk1", "zero", "kept"], ["row"]),
        _const("r", "r"),
        helper.make_node("Mul", ["row", "r"], ["base"]),
        helper.make_node("Add", ["base", "col"], ["p"]),
        _filled("kept", "kept_ones", 1),
        *_mark_nodes("p", "kept_ones", "n"),
        _call("Place", ["values", "mask"], ["out"]),
    ], ["c", "j", "r", "k", "n"])


def _relative() -> FunctionProto:
    """``Relative<w=[entries, width], f=[2^width - 1], n=[size]>(values, entries) -> flat``:
    code c >= 1 steps c positions to the next kept weight, 0 is a filler stepping 2^w - 1 (Deep
    Compression; ``bitpack.relative_codes``). A filler lands strictly between two kept
    weights, so writing each entry's ``code > 0`` at the position it reaches marks exactly the
    kept ones."""
    return _function("Relative", ["values", "entries"], ["out"], [
        _call("Unpack", ["entries"], ["e"], q=0, w="w"),
        _const("fill", "f"),
        _tensor("one", np.array(1, np.int64)),
        helper.make_node("Sub", ["one", "one"], ["zero"]),
        helper.make_node("Equal", ["e", "zero"], ["is_filler"]),
        helper.make_node("Where", ["is_filler", "fill", "e"], ["step"]),
        helper.make_node("CumSum", ["step", "zero"], ["reach"]),
        helper.make_node("Sub", ["reach", "one"], ["at"]),
        helper.make_node("Where", ["is_filler", "zero", "one"], ["is_value"]),
        *_mark_nodes("at", "is_value", "n"),
        _call("Place", ["values", "mask"], ["out"]),
    ], ["w", "f", "n"])


def _nm() -> FunctionProto:
    """``Nm<w=[kept, width], k=[groups, N], m=[groups, M], v=(O, *k, I), p=perm>(values,
    positions) -> weight layout``: each kept value's position in its group of M along the input
    channels (``(O, I, *k)`` viewed as ``(O, *k, I)``, as ``compress.compute_mask`` groups
    them), as a mask of that view; placed, then transposed back by ``perm``."""
    return _function("Nm", ["values", "positions"], ["out"], [
        _call("Unpack", ["positions"], ["p"], q=0, w="w"),
        _const("gk", "k"),
        helper.make_node("Reshape", ["p", "gk"], ["pg"]),
        _filled("gk", "ones", 1),
        _const("gm", "m"),
        _filled("gm", "zeros", 0),
        helper.make_node("ScatterElements", ["zeros", "pg", "ones"], ["groups"], axis=1),
        _tensor("flat", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["groups", "flat"], ["mask"]),
        _call("Place", ["values", "mask"], ["placed"]),
        _const("view", "v"),
        helper.make_node("Reshape", ["placed", "view"], ["viewed"]),
        _transpose("viewed", "out", "p"),
    ], ["w", "k", "m", "v", "p"])


def _transpose(x: str, out: str, attr: str):
    node = helper.make_node("Transpose", [x], [out])
    node.attribute.append(helper.make_attribute_ref("perm", _INTS, ref_attr_name=attr))
    return node


_LIBRARY = {"Unpack": _unpack, "Place": _place, "Scaled": _scaled, "Shaped": _shaped,
            "Bitmask": _bitmask, "Csr": _csr, "Relative": _relative, "Nm": _nm}
_NEEDS = {"Bitmask": ("Unpack", "Place"), "Csr": ("Unpack", "Place"),
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
    readable = {short: name for name, short in OPS.items()}
    used = {readable.get(name, name) for name in used}  # a file's names or this module's
    names = set(used)
    for name in used:
        names.update(_NEEDS.get(name, ()))
    return [_short(_LIBRARY[name]()) for name in _LIBRARY if name in names]
