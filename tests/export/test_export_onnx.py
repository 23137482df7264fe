"""ONNX export of a chosen model: fp32 parity with torch, int8 QDQ, dynamic batch, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from autosparse.cost.onnx_files import (
    ExportError,
    evaluate_onnx,
    export_onnx,
    onnx_outputs,
    onnx_session,
    quantize_onnx_int8,
    time_onnx,
)
from autosparse.workload.models import DigitsCNN

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model(one_thread) -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(1, 8, 8, 10).eval()


@pytest.fixture(scope="module")
def fp32_path(model, tmp_path_factory):
    return export_onnx(model, SHAPE, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def int8_path(fp32_path, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx8") / "model.int8.onnx"
    return quantize_onnx_int8(fp32_path, out, (inputs[i : i + 16] for i in range(0, 64, 16)))


def _torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_fp32_export_matches_torch_and_names_its_io(model, fp32_path, inputs):
    assert model.training is False
    graph = onnx.load(str(fp32_path)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    x = inputs[:8]
    np.testing.assert_allclose(onnx_outputs(fp32_path, x), _torch_logits(model, x), atol=1e-5,
                               rtol=1e-5)


def test_batch_dimension_is_dynamic(model, fp32_path, inputs):
    dim = onnx.load(str(fp32_path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    session = onnx_session(fp32_path)
    for n in (1, 5, 64):
        out = session.run(["logits"], {"input": inputs[:n]})[0]
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, _torch_logits(model, inputs[:n]), atol=1e-5, rtol=1e-5)


def test_export_restores_the_training_mode(tmp_path):
    net = DigitsCNN(1, 8, 8, 10).train()
    export_onnx(net, SHAPE, tmp_path / "sub" / "m.onnx")
    assert net.training and (tmp_path / "sub" / "m.onnx").exists()


def test_int8_model_is_qdq_and_stays_close(model, fp32_path, int8_path, inputs):
    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops or "QLinearConv" in ops
    assert {"Conv", "Gemm"} <= ops  # QDQ keeps float ops between DQ/Q pairs
    fp32 = onnx_outputs(fp32_path, inputs)
    int8 = onnx_outputs(int8_path, inputs)
    assert int8.shape == fp32.shape == (64, 10)
    agreement = float(np.mean(int8.argmax(1) == fp32.argmax(1)))
    assert agreement >= 0.9, agreement
    # the fused integer kernels, not just the QDQ simulation, stay close (7-bit weights keep
    # AVX2's saturating int16 sums from clipping: full-range weights were ~6x further off)
    spread = np.abs(fp32 - fp32.mean(axis=1, keepdims=True)).mean()
    assert np.abs(int8 - fp32).mean() < 0.03 * spread
    # evaluate_onnx: labels = the fp32 argmax, so accuracy is that same agreement in percent
    labels = fp32.argmax(1)
    batches = [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]
    assert evaluate_onnx(fp32_path, batches) == 100.0
    assert evaluate_onnx(int8_path, batches) == pytest.approx(100.0 * agreement)


def test_quantize_needs_calibration_data(fp32_path, tmp_path):
    with pytest.raises(ValueError, match="no batches"):
        quantize_onnx_int8(fp32_path, tmp_path / "q.onnx", [])


class _RunningMax(nn.Module):
    """A cumulative max over the last axis: aten::cummax has no ONNX symbolic at opset 17."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=-1).values


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.running = _RunningMax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.running(self.conv(x))


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList([_Block()])
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks[0](self.stem(x)).flatten(1))


def test_unsupported_op_raises_a_clear_export_error(tmp_path, capfd):
    with pytest.raises(ExportError) as info:
        export_onnx(_Unexportable(), SHAPE, tmp_path / "bad.onnx")
    error = info.value
    message = str(error)
    assert "aten::cummax" in message and "'blocks.0.running'" in message
    assert "_RunningMax" in message and "\n" not in message
    assert (error.op, error.layer) == ("aten::cummax", "blocks.0.running")
    assert error.__cause__ is None and error.__suppress_context__
    assert error.original is not None
    out, _ = capfd.readouterr()
    assert "Torch IR graph" not in out  # the exporter's graph dump is kept off stdout


def test_time_onnx_returns_positive_seconds(fp32_path):
    seconds = time_onnx(fp32_path, SHAPE, rounds=3, calls=5, warmup=2)
    assert 0.0 < seconds < 0.1
