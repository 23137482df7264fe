"""A chosen model as deployable ONNX: fp32 export, int8 QDQ quantization, evaluation, timing.

Export uses the legacy TorchScript exporter (``dynamo=False``: no onnxscript needed) at opset 17
with a dynamic batch dimension, input ``input`` and output ``logits``. A model the exporter
cannot handle raises :class:`ExportError` naming the operator and the layer that calls it.

Int8 is ONNX Runtime's static quantizer in QDQ format (uint8 activations, int8 weights kept to
7 bits by default, MinMax ranges) calibrated on real batches from the caller, as in
:mod:`autosparse.cost.calibration.export` (whose log filter is reused); sessions and timing come from :mod:`autosparse.cost.calibration.timing`,
so an exported model is timed exactly like the calibration variants.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn

from autosparse.cost.calibration.export import OPSET, _quiet_quantizer
from autosparse.cost.calibration.timing import (
    DEFAULT_SESSIONS,
    DEFAULT_WARMUP,
    make_session,
    time_variants,
)
from autosparse.space.discovery import token_embedding

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

__all__ = [
    "ExportError",
    "export_onnx",
    "quantize_onnx_int8",
    "onnx_session",
    "onnx_outputs",
    "evaluate_onnx",
    "onnx_module",
    "ScoredRun",
    "time_onnx",
]


class ExportError(RuntimeError):
    """The model cannot be exported to ONNX; ``op`` and ``layer`` say where, when known, and
    ``original`` is the exporter's own exception."""

    def __init__(self, message: str, *, op: str = "", layer: str = ""):
        super().__init__(message)
        self.op = op
        self.layer = layer
        self.original: BaseException | None = None


# --------------------------------------------------------------------------------------------
# fp32 export
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _captured_export_log() -> Iterator[list]:
    """Collect what the legacy exporter logs instead of letting it reach stdout.

    torch 2.13's ``setup_onnx_logging`` tests the *function* ``_jit_is_onnx_log_enabled`` for
    truth, so its log is always on: a failing export prints the whole TorchScript graph to
    stdout. The failing graph is also what tells which layer called the unsupported operator,
    so it is kept here (as ``(message, graph)``) rather than dropped.
    """
    records: list = []
    original = torch._C._jit_onnx_log

    def capture(*args):
        records.append(args)

    torch._C._jit_onnx_log = capture
    try:
        yield records
    finally:
        torch._C._jit_onnx_log = original


def _nodes(block) -> Iterator:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)


def _layer_of(records: list, op: str) -> tuple[str, str]:
    """(dotted module path, module class) of the first node of kind ``op`` in a logged graph.

    Scopes read ``pkg.Model::/pkg.Block::blocks.0/pkg.Weird::inner``: each segment is
    ``<class>::<attribute of the parent>``; the root's attribute is empty.
    """
    for args in records:
        graph = args[-1] if args else None
        if not isinstance(graph, torch._C.Graph):
            continue
        for node in _nodes(graph):
            if node.kind() != op:
                continue
            segments = [s.rpartition("::") for s in node.scopeName().split("/") if s]
            path = ".".join(attr for _, _, attr in segments if attr)
            kind = segments[-1][0].rsplit(".", 1)[-1] if segments else ""
            return path, kind
    return "", ""


def _export_error(model: nn.Module, exc: Exception, records: list) -> ExportError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    name = type(model).__name__
    match = re.search(r"operator '([\w:.]+)'", first)
    if match is None:
        return ExportError(
            f"cannot export {name} to ONNX (opset {OPSET}, TorchScript exporter): "
            f"{type(exc).__name__}: {first}"
        )
    op = match.group(1)
    layer, kind = _layer_of(records, op)
    if layer:
        where = f"layer '{layer}' ({kind})"
    elif kind:
        where = f"{kind}.forward itself (not inside a submodule)"
    else:
        where = "an unknown layer"
    return ExportError(
        f"cannot export {name} to ONNX: operator '{op}' in {where} has no ONNX opset {OPSET} "
        "equivalent; replace it with supported operations or register a custom symbolic "
        "(torch.onnx.register_custom_op_symbolic)",
        op=op, layer=layer,
    )


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path, *,
                fold_batch_norm: bool = True) -> Path:
    """Write ``model`` as ONNX (opset 17, batch dimension dynamic) and return the path.

    ``fold_batch_norm=False`` keeps batch norms as ``BatchNormalization`` nodes (the exporter
    otherwise folds them into the preceding convolution's weight): every weight initializer is
    then the module's own tensor, which ``cost.compact_onnx`` needs to replace it by its
    quantized codes; onnxruntime folds them itself when it loads the file.

    ``input_shape`` is one sample's shape (e.g. ``(1, 8, 8)``), as in
    :class:`~autosparse.space.layers.LayerTable`. A language model (its first weighted module an
    ``nn.Embedding``) takes token ids: its input is int64 (batch, tokens), every other model's
    float32. The model is exported in eval mode; its previous
    mode is restored afterwards. Raises :class:`ExportError` when an operator has no ONNX
    counterpart (the message names the operator and the layer) or tracing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = token_embedding(model) is not None
    x = torch.zeros((1, *input_shape), dtype=torch.long if tokens else torch.float32)
    was_training = model.training
    try:
        with warnings.catch_warnings(), _captured_export_log() as records:
            # the legacy exporter's deprecation notice, and the tracer's notes on Python values
            # taken as constants (export checks the ONNX outputs on the whole test split)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # PRESERVE of a model in eval mode: the advice against constant folding is for
            # models exported for training
            warnings.filterwarnings("ignore", message="It is recommended that constant folding")
            try:
                torch.onnx.export(
                    model.eval(), (x,), str(path), dynamo=False, opset_version=OPSET,
                    training=(torch.onnx.TrainingMode.EVAL if fold_batch_norm
                              else torch.onnx.TrainingMode.PRESERVE),
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
            except Exception as exc:  # noqa: BLE001 - turned into one clear error below
                error = _export_error(model, exc, records)
                error.original = exc  # for debugging; the printed report stays one message
                raise error from None
    finally:
        model.train(was_training)
    return path


# --------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------


def _input_name(path: str | Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def input_array(x) -> np.ndarray:
    """A batch as the exported model takes it: integer arrays (token ids) as int64, everything
    else as float32."""
    x = np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.int64 if np.issubdtype(x.dtype, np.integer)
                                else np.float32)


class _Batches(CalibrationDataReader):
    """The caller's batches, fed one per inference under the model's input name (float32, or
    int64 token ids)."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str):
        self._batches = iter(batches)
        self._name = input_name
        self._first = next(self._batches, None)

    @property
    def empty(self) -> bool:
        return self._first is None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._first is not None:
            batch, self._first = self._first, None
        else:
            batch = next(self._batches, None)
        if batch is None:
            return None
        return {self._name: input_array(batch)}


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "Gather")


def _weighted_nodes(path: Path) -> dict:
    """``quantize_static`` arguments that leave every operator without a weight in float: the
    weighted op types, minus the MatMuls of two activations (attention's q·k and p·v)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    weights |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    activations_only = [node.name for node in graph.node
                        if node.op_type == "MatMul" and not weights & set(node.input)]
    return {"op_types_to_quantize": list(WEIGHTED_OPS), "nodes_to_exclude": activations_only}


def quantize_onnx_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[np.ndarray],
    per_channel: bool = True,
    reduce_range: bool = True,
    weighted_only: bool = False,
) -> Path:
    """Static int8 QDQ model of ``fp32_path``: uint8 activations, int8 weights, MinMax ranges.

    ``calibration`` yields input batches (N, *input_shape), typically the train split: the
    activation ranges are the min/max seen over all of them, so they should be real data.
    U8S8 with per-channel weights is MLAS's native x86 kernel (see
    :func:`autosparse.cost.calibration.export.quantize_layers`); ORT fuses the QDQ pairs into
    QLinearConv / QGemm when it loads the model.

    ``reduce_range`` keeps weights within 7 bits (still stored as int8, same size and speed).
    On x86 CPUs without VNNI (AVX2 only, like the 2-core dev box) the U8S8 kernel sums pairs of
    u8 x s8 products in saturating int16; with full-range weights those sums clip, and the fused
    integer model drifted ~8x further from fp32 than the QDQ simulation (logit error 0.36 vs
    0.046 on a trained DigitsCNN, argmax agreement 97.0 % vs 99.5 %). With 7-bit weights the
    integer model matches the simulation; on VNNI CPUs the cost is negligible. ONNX Runtime's
    quantization guide recommends the same for non-VNNI machines.

    ``weighted_only`` quantizes just the operators that hold a weight (Conv, Gemm, MatMul with a
    constant side, Gather of an embedding), as the search did. Export sets it for a language
    model: quantizing everything put QDQ pairs around the masked attention scores (-inf before
    the softmax) and layer norms, and cost the tiny LM 12.9 % of perplexity (14.65 -> 16.53);
    weighted ops only: 14.59.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    reader = _Batches(calibration, _input_name(fp32_path))
    if reader.empty:
        raise ValueError("quantize_onnx_int8: the calibration data yielded no batches")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    only = _weighted_nodes(fp32_path) if weighted_only else {}
    with _quiet_quantizer():
        quantize_static(
            str(fp32_path), str(out_path), reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
            **only,
        )
    return out_path


# --------------------------------------------------------------------------------------------
# running and timing
# --------------------------------------------------------------------------------------------


def onnx_session(path: str | Path) -> ort.InferenceSession:
    """CPU session, one thread, sequential, full graph optimisation (the calibrated setting)."""
    return make_session(str(path))


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    first = session.get_inputs()[0]
    dtype = np.int64 if first.type == "tensor(int64)" else np.float32
    feed = {first.name: np.ascontiguousarray(x, dtype=dtype)}
    return session.run([session.get_outputs()[0].name], feed)[0]


def onnx_outputs(model: str | Path | ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """The model's first output (the logits) for the batch ``x``; ``model`` is the file, or a
    session already open on it (:func:`onnx_session`, one for a loop over batches)."""
    session = model if isinstance(model, ort.InferenceSession) else onnx_session(model)
    return _run(session, x)


class ScoredRun(nn.Module):
    """A runnable (an ONNX session, a loaded torch.export program) as a module a task's
    metric can score (``Task.evaluate``, ``workload.evaluate``): a plain function inside, so
    ``eval()`` never reaches a loaded program."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self._run = lambda x: run(x)  # a function: a module given here is not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def onnx_module(path: str | Path) -> nn.Module:
    """An ONNX file run by onnxruntime (one session, CPU) as a module taking and returning
    tensors: the task's own metric scores a file like a PyTorch model."""
    session = onnx_session(path)
    return ScoredRun(lambda x: torch.from_numpy(_run(session, x.cpu().numpy())))


def evaluate_onnx(path: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Top-1 accuracy in percent over ``(inputs, labels)`` batches."""
    session = onnx_session(path)
    correct = total = 0
    for x, y in batches:
        predicted = _run(session, x).argmax(axis=1)
        labels = np.asarray(y).reshape(-1)
        correct += int((predicted == labels).sum())
        total += int(labels.size)
    if total == 0:
        raise ValueError("evaluate_onnx: no samples")
    return 100.0 * correct / total


@dataclass(frozen=True)
class _OnnxFile:
    """What :func:`~autosparse.cost.calibration.timing.time_variants` reads of a ``Variant``."""

    name: str
    onnx_path: Path
    input_shape: tuple[int, ...]


def time_onnx(
    path: str | Path,
    input_shape: Sequence[int],
    rounds: int,
    calls: int,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
) -> float:
    """Median seconds of one batch-1 call: median over ``rounds`` of per-round medians of
    ``calls`` single calls, on one thread (the calibration's timer, for a single file)."""
    return time_onnx_files({"model": path}, input_shape, rounds, calls, warmup, seed)["model"]


def time_onnx_files(
    paths: Mapping[str, str | Path],
    input_shape: Sequence[int],
    rounds: int,
    calls: int,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
    sessions: int = DEFAULT_SESSIONS,
) -> dict[str, float]:
    """Median seconds per batch-1 call of several models timed in interleaved rounds, so that
    load on a shared machine hits them alike and their ratios hold; ``sessions`` sessions per
    file used in turn (``time_variants``)."""
    shape = tuple(int(d) for d in input_shape)
    targets = [_OnnxFile(name, Path(path), shape) for name, path in paths.items()]
    measurements = time_variants(targets, rounds=rounds, calls=calls, warmup=warmup, seed=seed,
                                 sessions=sessions)
    return {target.name: m.median_seconds for target, m in zip(targets, measurements)}
