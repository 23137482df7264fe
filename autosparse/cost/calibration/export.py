"""Torch model -> ONNX file, with magnitude-zeroed weights and int8 QDQ on chosen layers.

Kept apart from variant drawing so each step is checkable: what was zeroed, what got quantized.
Int8 uses ONNX Runtime's static QDQ quantizer; at session load ORT fuses DQ -> Conv/Gemm -> Q
into QLinearConv/QGemm, which is the integer kernel the calibration wants to time.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn

from autosparse.space.discovery import find_layers

OPSET = 17
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Relu after an int8 layer is folded into the layer's output range (ORT's "removable
# activation"), as a deployed int8 model would; leaving it float would add a DQ/Q pair per layer.
FOLDED_ACTIVATIONS = ("Relu",)
CALIBRATION_SAMPLES = 4


def zero_smallest(model: nn.Module, sparsity: Mapping[str, float]) -> dict[str, int]:
    """Zero the ``round(s * n)`` smallest-magnitude weights of each named layer, in place.

    Returns the zero count per layer so callers can check it (random weights have no ties, so
    the count is exact).
    """
    layers = find_layers(model)
    zeros = {}
    with torch.no_grad():
        for name, s in sparsity.items():
            weight = layers[name].weight
            k = int(round(float(s) * weight.numel()))
            flat = weight.view(-1)
            flat[torch.argsort(flat.abs())[:k]] = 0.0
            zeros[name] = int((weight == 0).sum())
    return zeros


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Export with the legacy TorchScript exporter (needs no onnxscript), batch size 1."""
    x = torch.zeros((1, *input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
            opset_version=OPSET,
        )
    return path


def layer_nodes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Torch layer name -> the Conv/Gemm/MatMul node that consumes its weight.

    The legacy exporter names weight initializers by state-dict key (``conv1.weight``), which is
    sturdier than its node names (``/conv1/Conv``).
    """
    out = {}
    for node in graph.node:
        if node.op_type in WEIGHT_OPS:
            for name in node.input[1:2]:
                if name.endswith(".weight"):
                    out[name.removesuffix(".weight")] = node
    return out


def _folded_activation(graph: onnx.GraphProto, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Relu that is the only consumer of ``node``'s output, if any."""
    consumers = [n for n in graph.node if node.output[0] in n.input]
    if len(consumers) == 1 and consumers[0].op_type in FOLDED_ACTIVATIONS:
        return consumers[0]
    return None


class _RandomInputs(CalibrationDataReader):
    """A few seeded normal inputs: ranges only need to be plausible, accuracy is not measured."""

    def __init__(self, input_shape: tuple[int, ...], seed: int):
        rng = np.random.default_rng(seed)
        self._samples = iter(
            [{"x": rng.standard_normal((1, *input_shape)).astype(np.float32)}
             for _ in range(CALIBRATION_SAMPLES)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._samples, None)


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's "consider pre-processing" root-logger warnings, nothing else.

    ORT's own graph optimisations at session load do what pre-processing would for these
    plain models.
    """
    hint = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def quantize_layers(
    fp32_path: Path, out_path: Path, layers: Collection[str], input_shape: tuple[int, ...],
    seed: int = 0, whole_model: bool = False,
    find_nodes: Callable[[onnx.GraphProto], Mapping[str, onnx.NodeProto]] | None = None,
) -> Path:
    """Write a QDQ model in which exactly ``layers`` (torch names) run in int8.

    uint8 activations with int8 per-channel weights (U8S8) is MLAS's native x86 AVX2 kernel
    and ORT's documented choice for x86; int8 activations timed the same here. Each chosen layer
    is quantized together with the Relu that follows it. ``whole_model`` (every layer int8)
    quantizes every op the quantizer can (adds, pooling, ...) as export's
    ``quantize_onnx_int8`` does, so the ops between layers are timed as a deployed int8
    model runs them.
    """
    graph = onnx.load(str(fp32_path)).graph
    nodes = (find_nodes or layer_nodes)(graph)
    missing = sorted(set(layers) - set(nodes))
    if missing:
        raise ValueError(f"{fp32_path.name}: no ONNX weight node for layers {missing}")
    chosen = []
    for name in layers:
        chosen.append(nodes[name].name)
        activation = _folded_activation(graph, nodes[name])
        if activation is not None:
            chosen.append(activation.name)
    with _quiet_quantizer():
        quantize_static(
            str(fp32_path), str(out_path), _RandomInputs(input_shape, seed),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=None if whole_model else chosen,
        )
    return out_path


def quantized_layers(model: onnx.ModelProto) -> set[str]:
    """Torch layers whose weight reaches its node through a DequantizeLinear (i.e. int8)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        producer = producers.get(node.input[1])
        if producer is not None and producer.op_type == "DequantizeLinear":
            names.add(producer.input[0].split(".weight")[0])
    return names
