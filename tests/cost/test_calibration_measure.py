"""The measurement half of calibration: real variants, their ONNX files, and their timing."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from autosparse.cost.calibration.architectures import ARCHITECTURES
from autosparse.cost.calibration.export import layer_nodes, quantized_layers
from autosparse.cost.calibration.timing import (
    Measurement,
    compare_runs,
    fixed_input,
    make_session,
    time_variants,
)
from autosparse.cost.calibration.variants import VariantSpec, build_variant, draw_specs
from autosparse.space.discovery import discover_layers


def total_macs(model, input_shape):
    return sum(layer.macs for layer in discover_layers(model, input_shape).layers)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_builds_at_custom_widths_and_macs_shrink(name):
    arch = ARCHITECTURES[name]
    base = arch.build(seed=0)
    narrow_widths = {layer: max(1, width // 2) for layer, width in arch.base_widths.items()}
    narrow = arch.build(narrow_widths, seed=0)
    table = discover_layers(narrow, arch.input_shape)
    assert table.names == arch.layers
    for layer, width in narrow_widths.items():
        assert table[layer].out_channels == width
    assert table[arch.classifier].out_channels == arch.num_classes
    assert total_macs(narrow, arch.input_shape) < total_macs(base, arch.input_shape)
    y = narrow(torch.zeros(1, *arch.input_shape))
    assert y.shape == (1, arch.num_classes)


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    arch = ARCHITECTURES["digits-mlp"]
    state = torch.random.get_rng_state()
    a, b = arch.build(seed=3), arch.build(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, arch.build(seed=4).fc1.weight)


def test_unknown_or_empty_widths_are_refused():
    arch = ARCHITECTURES["digits-cnn"]
    with pytest.raises(ValueError, match="no prunable"):
        arch.build({"fc2": 5})
    with pytest.raises(ValueError, match="at least 1"):
        arch.build({"conv1": 0})


def run_onnx(path, x):
    session = make_session(path)
    return session.run(None, {"x": x})[0]


def torch_output(spec, x, seed=0):
    """The same model built again in torch (the variant does not keep the module)."""
    from autosparse.cost.calibration.export import zero_smallest

    model = ARCHITECTURES[spec.architecture].build(spec.widths, seed=seed)
    zero_smallest(model, spec.sparsity)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_fp32_variant_matches_torch_tightly(tmp_path):
    arch = ARCHITECTURES["digits-cnn"]
    spec = VariantSpec("cnn-narrow", arch.name, {"conv1": 4, "conv2": 8, "conv3": 16, "fc1": 32})
    variant = build_variant(spec, tmp_path)
    x = fixed_input(arch.input_shape)
    np.testing.assert_allclose(run_onnx(variant.onnx_path, x), torch_output(spec, x),
                               rtol=1e-4, atol=1e-5)
    assert all(choice.bits == 32 and choice.pattern == "dense"
               for choice in variant.candidate.values())
    assert variant.table["conv2"].weight_shape == (8, 4, 3, 3)


@pytest.mark.parametrize("name", ["digits-cnn", "cifar-cnn"])
def test_int8_only_on_the_chosen_layers(tmp_path, name):
    arch = ARCHITECTURES[name]
    chosen = frozenset(arch.layers[1:3])
    spec = VariantSpec("mixed", name, dict(arch.base_widths), int8_layers=chosen)
    variant = build_variant(spec, tmp_path)
    model = onnx.load(str(variant.onnx_path))
    assert quantized_layers(model) == set(chosen)
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    nodes = layer_nodes(model.graph)
    for layer in set(arch.layers) - chosen:  # fp32 layers read their float weight directly
        assert f"{layer}.weight" in nodes[layer].input
    # ORT fuses the QDQ groups into integer kernels, one per chosen layer and no more
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(variant.onnx_path), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(options.optimized_model_filepath).graph.node
             if n.op_type in ("QLinearConv", "QGemm", "QLinearMatMul")]
    assert len(fused) == len(chosen)
    assert {c.bits for n, c in variant.candidate.items() if n in chosen} == {8}
    assert {c.bits for n, c in variant.candidate.items() if n not in chosen} == {32}
    x = fixed_input(arch.input_shape)
    expected = torch_output(spec, x)
    got = run_onnx(variant.onnx_path, x)
    assert np.abs(got - expected).max() <= 0.25 * np.abs(expected).max()


def test_unstructured_variant_has_the_zeros(tmp_path):
    arch = ARCHITECTURES["digits-mlp"]
    sparsity = {"fc1": 0.9, "fc3": 0.5}
    spec = VariantSpec("sparse", arch.name, dict(arch.base_widths), sparsity=sparsity)
    variant = build_variant(spec, tmp_path)
    weights = {t.name: onnx.numpy_helper.to_array(t)
               for t in onnx.load(str(variant.onnx_path)).graph.initializer}
    for layer in arch.layers:
        w = weights[f"{layer}.weight"]
        zeros = int((w == 0).sum())
        assert zeros == round(sparsity.get(layer, 0.0) * w.size)
        choice = variant.candidate[layer]
        assert choice.pattern == ("unstructured" if layer in sparsity else "dense")
        assert choice.sparsity == sparsity.get(layer, 0.0)
    assert variant.table["fc1"].weight_shape == (128, 64)  # same widths, dense kernels


def test_int8_keeps_the_zeros(tmp_path):
    arch = ARCHITECTURES["digits-mlp"]
    spec = VariantSpec("sparse-int8", arch.name, dict(arch.base_widths),
                       int8_layers=frozenset(arch.layers), sparsity={"fc1": 0.8})
    variant = build_variant(spec, tmp_path)
    weights = {t.name: onnx.numpy_helper.to_array(t)
               for t in onnx.load(str(variant.onnx_path)).graph.initializer}
    quantized = weights["fc1.weight_quantized"]
    assert quantized.dtype == np.int8
    assert (quantized == 0).sum() >= round(0.8 * quantized.size)


def test_variant_generation_is_reproducible_and_varied():
    arch = ARCHITECTURES["cifar-cnn"]
    specs = draw_specs(arch, 25, seed=7)
    assert specs == draw_specs(arch, 25, seed=7)
    assert specs != draw_specs(arch, 25, seed=8)
    assert len({s.name for s in specs}) == 25
    kinds = {s.name.split("-", 3)[-1] for s in specs}
    assert {"base-fp32", "base-int8", "base-fp32-sparse"} <= kinds
    assert any(k.startswith("pruned-fp32") for k in kinds)
    assert any("mixed" in k for k in kinds)
    for s in specs:
        assert all(1 <= w <= arch.base_widths[n] for n, w in s.widths.items())
        assert all(0.5 <= v <= 0.95 for v in s.sparsity.values())


def test_built_variants_are_reproducible(tmp_path):
    arch = ARCHITECTURES["digits-cnn"]
    spec = draw_specs(arch, 6, seed=1)[5]
    a = build_variant(spec, tmp_path / "a", seed=1)
    b = build_variant(spec, tmp_path / "b", seed=1)
    assert a.candidate == b.candidate and a.table == b.table
    x = fixed_input(arch.input_shape)
    np.testing.assert_array_equal(run_onnx(a.onnx_path, x), run_onnx(b.onnx_path, x))


def test_timing_gives_positive_medians(tmp_path):
    arch = ARCHITECTURES["digits-mlp"]
    variants = [build_variant(s, tmp_path) for s in draw_specs(arch, 3, seed=0)]
    first = time_variants(variants, rounds=3, calls=3, warmup=1)
    assert [m.name for m in first] == [v.name for v in variants]
    for m in first:
        assert isinstance(m, Measurement)
        assert m.median_seconds > 0 and len(m.round_medians) == 3 and m.spread >= 0
    second = time_variants(variants, rounds=2, calls=2, warmup=0, seed=1, sessions=2)
    report = compare_runs(first, second)
    assert report.shift > 0 and 0 <= report.within_5_percent <= 1
    with pytest.raises(ValueError):
        time_variants(variants, rounds=0)
