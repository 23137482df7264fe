"""``model.compact.onnx``: every searched weight at its searched bits and sparsity in standard
ONNX. Per case: onnxruntime loads it, its outputs are the compressed model's (float32
reassociation only, within export's OUTPUT_TOLERANCE), the decoded weights are the model's bit
for bit, each layer stores exactly the bits the size formula scored, onnxruntime folds the
decode at load (the optimised graph is ``model.onnx``'s), and the file is within a stated margin
of the scored size.

Measured file / scored (random-weight DigitsCNN unless named): int8 1.03, int4 1.07, int3 1.09,
int6 1.04, int16 1.02, unstructured 30 % int8 1.06, fp32 50 % unstructured 1.02, 2:4 int8 1.08,
channel 25 % int8 1.05, unstructured 75 % int4 (12.3 kB scored) 1.21, channel 50 % int4 (7.8 kB)
1.19. Beyond the scored bits a file holds the decode functions (0.8 to 1.8 kB), ~40 to 110 bytes
of calls per layer and the model's own graph (0.6 to 0.75 kB here, 6.4 kB for the ViT): 1.5 to
2.6 kB here (3.6 kB before the names, defaults and function bodies were cut), so a small score
still shows them: 1:4 int4 (10.6 kB) 1.25, unstructured 97 % int2 (2.8 kB) 1.89, the ViT at 70 %
int4 (21 kB) 1.45. Those cases are held to their measured ratio (plus a margin) and to the byte
bounds below, the others to 1.25x.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from autosparse.compress.apply import bake, compress_model, structural_keep
from autosparse.compress.footprint import footprint_metrics
from autosparse.compress.shrink import shrink_model
from autosparse.compress.storage import model_zeros
from autosparse.cost.compact_onnx import (
    compact_markdown,
    decoded_weights,
    write_compact_onnx,
)
from autosparse.cost.onnx_decode import DOMAIN
from autosparse.cost.onnx_files import export_onnx, onnx_outputs
from autosparse.export.checks import OUTPUT_TOLERANCE
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover, example_input
from autosparse.space.structure import leaders, pruned_by_group
from autosparse.workload.models import DigitsCNN, DigitsResNet, DigitsViT

SHAPE = (1, 8, 8)
DECODE_BYTES = 2700  # the decode functions, every one of them (2.6 kB; 0.8 to 1.8 kB in a file)
DECODE_BYTES_PER_LAYER = 150  # the calls decoding one layer (measured 40 to 110 bytes)
FIXED_BYTES = 2800  # DigitsCNN's decode + graph, whatever its index (measured 1.5 to 2.6 kB)


def _candidate(table, pattern: str, sparsity: float, bits: int) -> Candidate:
    """The same choice on every layer that supports it (channel: on the groups' leaders)."""
    offered = leaders(table) if pattern == "channel" else None
    return Candidate({layer.name: LayerChoice.make(pattern, sparsity, bits)
                      for layer in table.layers
                      if (layer.name in offered if offered is not None
                          else layer.supports(pattern))})


def _written_cnn(tmp_path, pattern: str, sparsity: float, bits: int):
    """(layer table, CompactInfo) of a seeded DigitsCNN's compact file at one choice everywhere."""
    torch.manual_seed(0)
    dense = DigitsCNN(1, 8, 8, 10).eval()
    table, _ = discover(dense, SHAPE)
    candidate = _candidate(table, pattern, sparsity, bits)
    _, _, shrunk = _compressed(dense, candidate)
    return table, write_compact_onnx(shrunk, table, candidate, SHAPE,
                                     tmp_path / "model.compact.onnx")


def _compressed(dense: nn.Module, candidate: Candidate, shape=SHAPE):
    """(table, compressed parametrized model, baked and shrunk model) as export has them."""
    table, graph = discover(dense, shape)
    compressed = compress_model(dense, candidate, None, graph).eval()
    baked = bake(compress_model(dense, candidate, None, graph)).eval()
    if any(pruned_by_group(table, candidate).values()):
        _, _, kept = structural_keep(dense, candidate, graph)
        baked, _ = shrink_model(baked, candidate, table, graph, kept, example_input(dense, shape))
        baked.eval()
    return table, compressed, baked


def _as_trained(model: nn.Module) -> nn.Module:
    """Every parameter and batch-norm statistic nudged apart: the exporter merges equal
    tensors (fresh norms' ones and zeros), which a trained model does not have."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator) * 0.2
                tensor.copy_(tensor.abs() + noise if "running_var" in name else tensor + noise)
    return model.eval()


def _optimised_ops(path, tmp_path) -> list[str]:
    """The operators onnxruntime runs after its basic optimisations (constant folding)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sorted(node.op_type for node in onnx.load(str(tmp_path / "optimised.onnx")).graph.node)


def _check(dense, candidate, tmp_path, max_ratio: float | None, shape=SHAPE):
    """Every property of the module docstring; returns the writer's info and the ratio."""
    table, compressed, shrunk = _compressed(dense, candidate, shape)
    path = tmp_path / "model.compact.onnx"
    info = write_compact_onnx(shrunk, table, candidate, shape, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)

    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = compressed(x).numpy()
    got = onnx_outputs(path, x.numpy())
    assert np.abs(got - expected).max() <= OUTPUT_TOLERANCE * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).all()

    modules = dict(shrunk.named_modules())
    decoded = decoded_weights(path)
    for layer in info.layers:
        weight = modules[layer.layer].weight.detach().numpy()
        assert layer.max_weight_error == 0.0, layer
        for name in layer.initializers:  # bit for bit, as the model's weight (or transposed)
            value = decoded[name]
            assert np.array_equal(value, weight) or np.array_equal(value, weight.T), name
        assert layer.stored_bits == layer.scored_bits, layer
        assert layer.note == "", layer

    # onnxruntime folds the decode when it loads the file: it then runs model.onnx's graph
    reference = tmp_path / "model.onnx"
    export_onnx(shrunk, shape, reference, fold_batch_norm=False)
    assert _optimised_ops(path, tmp_path) == _optimised_ops(reference, tmp_path)

    # the weights and other parameters are the scored bits, up to byte padding (<= 3 streams a
    # layer) and a channel leader's group bitmask (the removed channels are gone); the rest is
    # the decode functions and calls, the model's graph (no bigger than model.onnx's) and
    # buffers (batch-norm statistics: outside the score, as in model.packed)
    scored = footprint_metrics(table, candidate, model_zeros(shrunk, table, candidate))["size_kb"]
    layers = len(table.layers)
    assert info.file_bytes == path.stat().st_size
    assert info.file_bytes == (info.layer_bytes + info.other_bytes + info.buffer_bytes
                               + info.decode_bytes + info.graph_bytes)
    groups = sum(layer.out_channels for layer in table.layers
                 if candidate.get_choice(layer.name).pattern == "channel") / 8
    assert -groups - 4 * layers <= info.layer_bytes + info.other_bytes - scored * 1000 <= 3 * layers
    assert info.decode_bytes <= DECODE_BYTES + DECODE_BYTES_PER_LAYER * layers
    floats = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(reference)).graph
                 .initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert info.graph_bytes <= reference.stat().st_size - floats + 64 * layers
    ratio = info.file_bytes / (scored * 1000)
    if max_ratio is not None:
        assert ratio <= max_ratio, (ratio, info)
    return info, ratio


CASES = [  # (pattern, sparsity, bits, largest file / scored, the storages expected)
    ("dense", 0.0, 8, 1.25, {"none"}),
    ("dense", 0.0, 4, 1.25, {"none"}),
    ("dense", 0.0, 3, 1.25, {"none"}),  # no int3 in ONNX: bit-packed, still 3 bits each
    ("dense", 0.0, 6, 1.25, {"none"}),
    ("dense", 0.0, 16, 1.25, {"none"}),
    ("unstructured", 0.3, 8, 1.25, None),  # bitmask or relative, as the formula chose
    ("unstructured", 0.75, 4, 1.25, None),  # 12 kB scored: the fixed part shows (1.21)
    ("unstructured", 0.97, 2, None, None),  # 3 kB scored: only the byte bound holds
    ("unstructured", 0.5, 32, 1.25, None),  # float32 values, sparse index
    ("2:4", 0.0, 8, 1.25, {"nm", "fp32"}),  # conv1's rows (9) cannot hold 2:4: dense fp32
    ("1:4", 0.0, 4, 1.3, {"nm", "fp32"}),  # 10.6 kB scored: 1.25
    ("channel", 0.25, 8, 1.25, {"none", "fp32"}),  # channels removed, the rest int8
    ("channel", 0.5, 4, 1.25, {"none", "fp32"}),  # 7.8 kB scored: 1.19
]


@pytest.mark.parametrize("pattern, sparsity, bits, max_ratio, storages", CASES,
                         ids=lambda v: ",".join(sorted(v)) if isinstance(v, (set, frozenset))
                         else str(v))  # a set's order varies by process: xdist needs one id
def test_compact_onnx_is_the_compressed_model_at_its_scored_size(
        tmp_path, one_thread, pattern, sparsity, bits, max_ratio, storages):
    torch.manual_seed(0)
    dense = DigitsCNN(1, 8, 8, 10).eval()
    table, _ = discover(dense, SHAPE)
    info, _ = _check(dense, _candidate(table, pattern, sparsity, bits), tmp_path, max_ratio)
    found = {layer.storage for layer in info.layers}
    if storages is not None:
        assert found == storages
    elif pattern == "unstructured":
        assert found <= {"bitmask", "csr"} | {f"relative{w}" for w in range(1, 9)}


@pytest.mark.parametrize("pattern, sparsity, bits", [("unstructured", 0.75, 4),
                                                     ("unstructured", 0.97, 2), ("1:4", 0, 4),
                                                     ("dense", 0, 4)])
def test_fixed_overhead_stays_small(tmp_path, one_thread, pattern, sparsity, bits):
    """What a file holds beyond its weights and parameters (the decode functions and calls, the
    graph, names and shapes) is a few bytes per node: bytes, not time, so no CPU changes it.
    Measured 1.5 to 2.6 kB on this 5-layer model (3.6 kB before names, defaults and function
    bodies were cut; the quickstart's knee went from 1.35x to 1.24x its score)."""
    table, info = _written_cnn(tmp_path, pattern, sparsity, bits)
    fixed = info.file_bytes - info.layer_bytes - info.other_bytes - info.buffer_bytes
    assert fixed == info.decode_bytes + info.graph_bytes
    assert fixed < FIXED_BYTES, info
    model = onnx.load(str(info.path))
    names = [t.name for t in model.graph.initializer] + \
        [x for n in model.graph.node for x in n.output]
    assert max(len(name) for name in names if name != "logits") <= 2  # short names throughout
    assert not model.producer_name and not model.graph.value_info


def test_csr_index_decodes(tmp_path, one_thread):
    """Long rows with two kept weights each, at their two ends: a relative index needs fillers
    for the long gaps, a bitmask a bit per weight; per-row counts and 12-bit columns win."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10))
    with torch.no_grad():
        dense[3].weight.mul_(1e-3)
        dense[3].weight[:, 0] = 1.0 + torch.arange(10) / 10
        dense[3].weight[:, -1] = -1.0 - torch.arange(10) / 10
    candidate = Candidate({"3": LayerChoice.make("unstructured", 1 - 20 / 40960, 8)})
    info, _ = _check(dense.eval(), candidate, tmp_path, None)
    assert {layer.layer: layer.storage for layer in info.layers}["3"] == "csr"


def test_residual_net_with_batch_norms_and_channel_groups(tmp_path, one_thread):
    """Batch norms stay separate in the file (a folded conv weight is no longer code x scale)
    and onnxruntime fuses them after decoding; removed channel groups, N:M, 3 and 6 bits."""
    torch.manual_seed(4)
    dense = _as_trained(DigitsResNet(1, 10))
    candidate = Candidate({
        "stem": LayerChoice.make("channel", 0.5, 8),
        "blocks.2.conv2": LayerChoice.make("channel", 0.25, 4),
        "blocks.0.conv1": LayerChoice.make("channel", 0.5, 6),
        "blocks.0.conv2": LayerChoice.make("unstructured", 0.7, 4),
        "blocks.2.shortcut.0": LayerChoice.make("2:4", 0, 8),
        "blocks.3.conv1": LayerChoice.make("unstructured", 0.95, 3),
        "fc": LayerChoice.make("unstructured", 0.5, 8),
    })
    info, _ = _check(dense, candidate, tmp_path, 1.25)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(info.path)).graph.node}
    assert info.buffer_bytes > 0


def test_transposed_matmul_weights_of_a_transformer(tmp_path, one_thread):
    """The exporter stores a MatMul's weight transposed under its own name: found by value,
    decoded once and transposed back."""
    torch.manual_seed(0)
    dense = _as_trained(DigitsViT(1, 8, 10))
    table, _ = discover(dense, SHAPE)
    info, _ = _check(dense, _candidate(table, "unstructured", 0.7, 4), tmp_path, None)
    graph = onnx.load(str(info.path)).graph
    decoded = {out for n in graph.node if n.domain == DOMAIN for out in n.output}
    transposes = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in decoded]
    assert transposes and all(layer.initializers for layer in info.layers)


class _Folded(nn.Module):
    """A weight the exporter folds into another constant: not an initializer of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return F.linear(x.flatten(1), self.fc.weight * 2.0, self.fc.bias)


def test_a_weight_the_graph_does_not_hold_stays_float_and_says_so(tmp_path, one_thread):
    torch.manual_seed(0)
    dense = _Folded().eval()
    candidate = Candidate({"fc": LayerChoice.make("dense", 0, 8)})
    table, compressed, shrunk = _compressed(dense, candidate)
    info = write_compact_onnx(shrunk, table, candidate, SHAPE, tmp_path / "m.onnx")
    (layer,) = info.layers
    assert layer.storage == "fp32" and "not an initializer" in layer.note
    assert not any(node.domain == DOMAIN for node in onnx.load(str(info.path)).graph.node)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_outputs(info.path, x.numpy()), compressed(x).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_report_entry_and_markdown(tmp_path, one_thread):
    table, info = _written_cnn(tmp_path, "unstructured", 0.5, 4)
    entry = json.loads(json.dumps(info.to_report(20.0)))  # report.json round trip
    assert entry["file_bytes"] == info.file_bytes and entry["scored_bytes"] == 20000
    assert entry["ratio_to_scored"] == pytest.approx(info.file_bytes / 20000)
    assert [layer["layer"] for layer in entry["layers"]] == table.names
    text = "\n".join(compact_markdown({"compact_onnx": entry,
                                       "latency_ms_measured": {"onnx": 0.02,
                                                               "onnx_compact": 0.021}}))
    assert "## model.compact.onnx" in text and "(" in text and "0.0210 ms" in text
    assert all(f"| {name} |" in text for name in table.names)
    assert compact_markdown({}) == []


def test_inlined_for_a_tool_without_local_functions_still_folds(tmp_path, one_thread):
    """``onnx.inliner`` turns the decode functions into plain operators: same outputs, and
    onnxruntime still folds every one of them at load."""
    torch.manual_seed(0)
    dense = DigitsCNN(1, 8, 8, 10).eval()
    table, _ = discover(dense, SHAPE)
    candidate = _candidate(table, "unstructured", 0.75, 4)
    _, _, shrunk = _compressed(dense, candidate)
    info = write_compact_onnx(shrunk, table, candidate, SHAPE, tmp_path / "model.compact.onnx")
    inlined = tmp_path / "inlined.onnx"
    onnx.save(onnx.inliner.inline_local_functions(onnx.load(str(info.path))), str(inlined))
    assert not onnx.load(str(inlined)).functions
    x = torch.randn(8, *SHAPE)
    np.testing.assert_array_equal(onnx_outputs(inlined, x.numpy()), onnx_outputs(info.path,
                                                                                x.numpy()))
    reference = tmp_path / "model.onnx"
    export_onnx(shrunk, SHAPE, reference)
    assert _optimised_ops(inlined, tmp_path) == _optimised_ops(reference, tmp_path)


def test_the_report_says_in_one_line_whether_any_file_is_faster():
    """Speed at the top of report.md: the fastest file when it beats dense by 5 %, else that
    none does and which objective and pattern would buy speed."""
    from autosparse.export.report import speed_line

    faster = speed_line({"dense_fp32": 0.020, "onnx": 0.012, "onnx_int8": 0.025})
    assert faster.startswith("Speed on this CPU: onnx runs 1.67x faster")
    none = speed_line({"dense_fp32": 0.020, "onnx": 0.0199, "onnx_compact": 0.021})
    assert "no exported file runs faster" in none and "`channel`" in none and "latency" in none
    assert speed_line({}) == ""
