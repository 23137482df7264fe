"""Packed checkpoints: exact round trips, payload bits equal to the size formula, clear errors."""

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autosparse.compress.apply import bake, compress_model, structural_keep
from autosparse.compress.footprint import (
    footprint_metrics,
    model_footprint,
    storage_options,
)
from autosparse.compress.shrink import shrink_model
from autosparse.compress.storage import model_zeros
from autosparse.compress.bitpack import _BitReader, _row_scales, _uint_bits
from autosparse.export.packed import (
    MAGIC,
    PackedFormatError,
    load_packed,
    read_header,
    save_packed,
)
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover, example_input
from autosparse.space.structure import leaders, pruned_by_group
from autosparse.workload.models import DigitsCNN, DigitsMLP, DigitsResNet

SHAPE = (1, 8, 8)


class BNNet(nn.Module):
    """Conv without bias + batch norm (parameters and buffers outside the searched layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _dense_cnn() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(1, 8, 8, 10).eval()


@pytest.fixture(scope="module")
def cnn():
    model = _dense_cnn()
    return model, *discover(model, SHAPE)


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(1))


def _candidate(table, pattern, sparsity, bits) -> Candidate:
    """The same choice on every layer that supports it (N:M skips conv1's 9-long rows; channel
    goes to the channel groups' leaders, never to the output layer)."""
    offered = leaders(table) if pattern == "channel" else None
    return Candidate({layer.name: LayerChoice.make(pattern, sparsity, bits)
                      for layer in table.layers
                      if (layer.name in offered if offered is not None
                          else layer.supports(pattern))})


def _to_save(dense, table, graph, candidate, baked=False):
    """(compressed model, model to save, kept channels): the shrunk model when a channel group
    is pruned (as export saves it), else the parametrized or baked compressed model."""
    compressed = compress_model(dense, candidate, None, graph).eval()
    _, _, kept = structural_keep(dense, candidate, graph)
    if not any(pruned_by_group(table, candidate).values()):
        return compressed, (bake(compress_model(dense, candidate, None, graph)).eval()
                            if baked else compressed), kept
    shrunk, _ = shrink_model(bake(compress_model(dense, candidate, None, graph)).eval(),
                             candidate, table, graph, kept, example_input(dense, SHAPE))
    return compressed, shrunk.eval(), kept


def _check_round_trip(dense, table, graph, candidate, path, skeleton, inputs, baked=False,
                      max_header=2000):
    compressed, saved, kept = _to_save(dense, table, graph, candidate, baked)
    info = save_packed(saved, candidate, path, table=table, kept=kept)
    loaded = load_packed(path, skeleton).eval()

    # weights bit for bit (the shrunk model's), outputs equal the compressed model's
    modules = dict(saved.named_modules())
    for name, module in loaded.named_modules():
        if name in table.names:
            assert torch.equal(module.weight, modules[name].weight), name
            if module.bias is not None:
                assert torch.equal(module.bias, modules[name].bias), name
    with torch.no_grad():
        expected, got = compressed(inputs), loaded(inputs)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert all(layer.exact for layer in info.layers.values())

    # payload bits equal the size formula on the saved model's own zeros (what the search's
    # size objective measures on the fine-tuned model), layer by layer and part by part; the
    # prediction from the patterns alone is an upper bound
    zeros = model_zeros(saved, table, candidate)
    measured = model_footprint(table, candidate, zeros)
    footprint = {fp.name: fp for fp in measured.layers}
    pattern_only = {fp.name: fp for fp in model_footprint(table, candidate).layers}
    for name, bits in info.layers.items():
        fp = footprint[name]
        assert (bits.values, bits.index, bits.scales, bits.bias) == (
            fp.value_bits, fp.index_bits, fp.scale_bits, fp.bias_bits), name
        assert bits.total == bits.predicted == fp.total_bits <= pattern_only[name].total_bits
        assert bits.index_format == {"dense": "none"}.get(fp.storage, fp.storage), name
    assert info.other_param_bits == info.predicted_other_bits == measured.other_bits
    assert info.payload_bits == info.predicted_bits == measured.total_bits
    # the only slack: each layer's bitstream is padded to a whole byte
    padded = sum(b.padded_bytes for b in info.layers.values()) + info.other_param_bits // 8
    assert info.payload_bytes == padded
    assert 0 <= info.payload_bytes - info.predicted_bits / 8 < len(info.layers)
    predicted_bytes = footprint_metrics(table, candidate, zeros)["size_kb"] * 1000
    assert info.file_bytes == path.stat().st_size
    assert info.file_bytes == info.header_bytes + info.payload_bytes + info.buffer_bytes
    assert info.file_bytes <= 1.03 * predicted_bytes + info.header_bytes + info.buffer_bytes
    assert info.header_bytes < max_header  # JSON: one entry per layer and per other tensor
    return info, loaded


PATTERNS = [
    ("unstructured", 0.3),
    ("unstructured", 0.75),
    ("unstructured", 0.97),
    ("channel", 0.5),
    ("2:4", 0.0),
    ("1:4", 0.0),
    ("dense", 0.0),
]


@pytest.mark.parametrize("bits", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("pattern, sparsity", PATTERNS, ids=lambda p: str(p))
def test_round_trip_every_pattern_and_width(cnn, inputs, tmp_path, one_thread,
                                            pattern, sparsity, bits):
    dense, table, graph = cnn
    candidate = _candidate(table, pattern, sparsity, bits)
    _check_round_trip(dense, table, graph, candidate, tmp_path / "m.aspk",
                      DigitsCNN(1, 8, 8, 10), inputs)


@pytest.mark.parametrize("pattern, sparsity, bits",
                         [("unstructured", 0.8, 4), ("channel", 0.25, 8), ("2:4", 0, 3),
                          ("dense", 0, 5)])
def test_baked_model_round_trips_like_the_parametrized_one(cnn, inputs, tmp_path, one_thread,
                                                           pattern, sparsity, bits):
    dense, table, graph = cnn
    candidate = _candidate(table, pattern, sparsity, bits)
    from_param, _ = _check_round_trip(dense, table, graph, candidate, tmp_path / "a.aspk",
                                      DigitsCNN(1, 8, 8, 10), inputs)
    from_baked, _ = _check_round_trip(dense, table, graph, candidate, tmp_path / "b.aspk",
                                      DigitsCNN(1, 8, 8, 10), inputs, baked=True)
    assert from_baked.file_bytes == from_param.file_bytes


def test_mixed_candidate_with_batch_norm_buffers(tmp_path, inputs, one_thread):
    torch.manual_seed(3)
    dense = BNNet()
    dense.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            dense(torch.randn(16, *SHAPE))
    dense.eval()
    table, graph = discover(dense, SHAPE)
    candidate = Candidate({
        "conv1": LayerChoice.make("channel", 0.5, 4),
        "conv2": LayerChoice.make("2:4", 0, 8),
        "fc": LayerChoice.make("unstructured", 0.9, 2),
    })
    info, loaded = _check_round_trip(dense, table, graph, candidate, tmp_path / "bn.aspk",
                                     BNNet(), inputs)
    assert loaded.conv1.out_channels == loaded.bn1.num_features == loaded.conv2.in_channels == 4
    assert info.other_param_bits == 8 * 32  # bn1 weight and bias of the 4 kept channels
    # running mean and var (4 floats each) + num_batches_tracked (int64), not in the formula
    assert info.buffer_bytes == 4 * 4 * 2 + 8
    _, _, kept = structural_keep(dense, candidate, graph)
    assert torch.equal(loaded.bn1.running_var, dense.bn1.running_var[kept["conv1"]])
    assert int(loaded.bn1.num_batches_tracked) == 3


def _trained_like(model: nn.Module) -> nn.Module:
    """Random batch-norm statistics, scales and shifts (removed channels leave constants)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model.eval()


RESIDUAL = Candidate({
    "stem": LayerChoice.make("channel", 0.5, 8),            # stage 1 (stem + two conv2s)
    "blocks.2.conv2": LayerChoice.make("channel", 0.25, 4),  # stage 2 (conv2 + shortcut + conv2)
    "blocks.0.conv1": LayerChoice.make("channel", 0.5, 6),
    "blocks.0.conv2": LayerChoice.make("unstructured", 0.7, 4),  # a follower: own pattern on top
    "blocks.2.shortcut.0": LayerChoice.make("2:4", 0, 8),
    "blocks.3.conv1": LayerChoice.make("unstructured", 0.95, 3),
    "fc": LayerChoice.make("unstructured", 0.5, 8),
})


def test_residual_channel_groups_pack_exactly_and_round_trip(tmp_path, inputs, one_thread):
    torch.manual_seed(4)
    dense = _trained_like(DigitsResNet(1, 10))
    table, graph = discover(dense, SHAPE)
    info, loaded = _check_round_trip(dense, table, graph, RESIDUAL, tmp_path / "r.aspk",
                                     DigitsResNet(1, 10), inputs, max_header=16000)
    assert loaded.stem.out_channels == loaded.blocks[1].conv2.out_channels == 8
    assert loaded.blocks[2].shortcut[0].out_channels == loaded.blocks[3].conv2.out_channels == 24
    # the leader's index is its group's bitmask (one bit per dense channel), then its rows dense
    assert (info.layers["stem"].index_format, info.layers["stem"].index) == ("none", 16)
    assert info.layers["blocks.2.conv2"].index == 32
    assert info.layers["blocks.0.conv2"].index_format in ("bitmask", "csr") or \
        info.layers["blocks.0.conv2"].index_format.startswith("relative")
    header, _ = read_header(tmp_path / "r.aspk")
    assert header["input_shape"] == list(SHAPE)
    assert [(g["name"], g["layer"], g["bits"], g["kept"]) for g in header["groups"]] == [
        ("stem", "stem", 16, 8), ("blocks.0.conv1", "blocks.0.conv1", 16, 8),
        ("blocks.2.conv2", "blocks.2.conv2", 32, 24)]
    # a second load of the same file into a fresh skeleton gives the identical model
    again = load_packed(tmp_path / "r.aspk", DigitsResNet(1, 10)).eval()
    with torch.no_grad():
        assert torch.equal(again(inputs), loaded(inputs))


def test_channel_candidates_need_the_shrunk_model_and_its_masks(tmp_path):
    dense = _dense_cnn()
    table, graph = discover(dense, SHAPE)
    candidate = Candidate({"conv2": LayerChoice.make("channel", 0.5, 8)})
    compressed, shrunk, kept = _to_save(dense, table, graph, candidate)
    with pytest.raises(ValueError, match="shrink it first.*conv2: model \\(32, 16, 3, 3\\), "
                                         "expected \\(16, 16, 3, 3\\)"):
        save_packed(compressed, candidate, tmp_path / "x.aspk", table=table, kept=kept)
    with pytest.raises(ValueError, match="needs the dense model's layer table"):
        save_packed(shrunk, candidate, tmp_path / "x.aspk")
    with pytest.raises(ValueError, match="prunes channel group conv2: pass its kept"):
        save_packed(shrunk, candidate, tmp_path / "x.aspk", table=table)
    with pytest.raises(ValueError, match="'fc2' cannot be channel-pruned"):
        save_packed(shrunk, Candidate({"fc2": LayerChoice.make("channel", 0.5, 8)}),
                    tmp_path / "x.aspk", table=table)
    save_packed(shrunk, candidate, tmp_path / "x.aspk", table=table, kept=kept)
    with pytest.raises(PackedFormatError, match="'conv2' \\(32 channels\\), the skeleton has "
                                                "8 channels"):
        load_packed(tmp_path / "x.aspk", DigitsCNN(1, 8, 8, 10, widths={"conv2": 8}))


def test_index_format_is_the_cheaper_one(cnn, tmp_path):
    dense, table, _ = cnn
    sparse = _candidate(table, "unstructured", 0.97, 8)
    compressed = compress_model(dense, sparse)
    info = save_packed(compressed, sparse, tmp_path / "s.aspk", table=table)
    zeros = model_zeros(compressed, table, sparse)["fc1"]
    n = table["fc1"].weight_count
    options = storage_options(n, table["fc1"].out_channels, 8, zeros)
    cheapest = min(options, key=lambda k: sum(options[k]))
    assert info.layers["fc1"].index_format == cheapest.replace("dense", "none")
    # 97 % sparse: a relative index beats column indices, which beat a bitmask
    assert cheapest.startswith("relative") and sum(options[cheapest]) < sum(options["csr"]) \
        < sum(options["bitmask"])
    assert info.layers["fc1"].index < table["fc1"].weight_count
    mild = _candidate(table, "unstructured", 0.5, 8)
    info = save_packed(compress_model(dense, mild), mild, tmp_path / "m.aspk", table=table)
    # half the weights: a bitmask (or its 1-bit relative form, which stops at the last value)
    assert {b.index_format for b in info.layers.values()} <= {"bitmask", "relative1"}


def test_omitted_layers_are_dense_fp32_and_table_is_optional(cnn, tmp_path):
    dense, table, _ = cnn
    candidate = Candidate({"fc1": LayerChoice.make("unstructured", 0.9, 4)})
    compressed = compress_model(dense, candidate)
    with_table = save_packed(compressed, candidate, tmp_path / "a.aspk", table=table)
    without = save_packed(compressed, candidate, tmp_path / "b.aspk")
    assert with_table.predicted_bits == without.predicted_bits == with_table.payload_bits
    assert with_table.layers["conv1"].values == table["conv1"].weight_count * 32
    (head_a, payload_a), (head_b, payload_b) = (read_header(tmp_path / n) for n in ("a.aspk",
                                                                                 "b.aspk"))
    assert payload_a == payload_b
    assert (head_a.pop("input_shape"), head_b.pop("input_shape")) == ([1, 8, 8], [])
    assert head_a == head_b  # the only difference: a table built from shapes has no input shape


@pytest.mark.parametrize("width", [1, 2, 3, 7, 9, 16, 32])
def test_bit_packing_round_trips(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2**width, size=37, dtype=np.uint64)
    bits = _uint_bits(values, width)
    data = np.packbits(bits, bitorder="little").tobytes()
    assert len(data) == (37 * width + 7) // 8
    assert np.array_equal(_BitReader(data, bits.size, "t").uints(37, width), values)


# ------------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def saved(cnn, tmp_path):
    dense, table, _ = cnn
    candidate = _candidate(table, "unstructured", 0.75, 4)
    path = tmp_path / "m.aspk"
    save_packed(compress_model(dense, candidate), candidate, path, table=table)
    return path


def test_wrong_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(PackedFormatError, match="not an autosparse packed checkpoint"):
        load_packed(path, DigitsCNN(1, 8, 8, 10))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(PackedFormatError, match="not an autosparse packed"):
        read_header(empty)


def test_other_version_is_refused(saved):
    data = bytearray(saved.read_bytes())
    struct.pack_into("<H", data, len(MAGIC), 99)
    saved.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="version 99.*reads versions 2, 3"):
        load_packed(saved, DigitsCNN(1, 8, 8, 10))


def test_truncated_or_corrupted_payload_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:-10])
    with pytest.raises(PackedFormatError, match="truncated"):
        load_packed(saved, DigitsCNN(1, 8, 8, 10))
    flipped = bytearray(data)
    flipped[-100] ^= 0x10
    saved.write_bytes(bytes(flipped))
    with pytest.raises(PackedFormatError, match="checksum"):
        load_packed(saved, DigitsCNN(1, 8, 8, 10))
    broken = bytearray(data)
    broken[12] = ord("}")
    saved.write_bytes(bytes(broken))
    with pytest.raises(PackedFormatError, match="corrupt header"):
        load_packed(saved, DigitsCNN(1, 8, 8, 10))


def test_skeleton_mismatch_names_layer_and_shapes(saved):
    with pytest.raises(PackedFormatError, match=r"'conv2'.*\(32, 16, 3, 3\).*\(8, 16, 3, 3\)"):
        load_packed(saved, DigitsCNN(1, 8, 8, 10, widths={"conv2": 8}))
    with pytest.raises(PackedFormatError, match="'conv1'.*not a layer"):
        load_packed(saved, DigitsMLP(64, 10))
    header, _ = read_header(saved)
    assert [layer["name"] for layer in header["layers"]] == ["conv1", "conv2", "conv3", "fc1",
                                                             "fc2"]
    json.dumps(header)  # plain JSON


def test_saving_needs_the_compressed_model_and_its_candidate(cnn, tmp_path):
    dense, table, _ = cnn
    quantized = _candidate(table, "dense", 0, 4)
    with pytest.raises(ValueError, match="'conv1'.*not on a"):
        save_packed(dense, quantized, tmp_path / "x.aspk")
    pruned = _candidate(table, "unstructured", 0.5, 32)
    with pytest.raises(ValueError, match="'conv1'.*nonzero weights"):
        save_packed(dense, pruned, tmp_path / "x.aspk")
    with pytest.raises(ValueError, match="'conv1'.*keeps"):
        save_packed(compress_model(dense, pruned), _candidate(table, "unstructured", 0.8, 32),
                    tmp_path / "x.aspk")
    with pytest.raises(ValueError, match="'conv1'.*2:4 needs its reduction length"):
        save_packed(dense, Candidate({"conv1": LayerChoice.make("2:4", 0, 32)}),
                    tmp_path / "x.aspk")
    with pytest.raises(ValueError, match="not layers of the model"):
        save_packed(dense, Candidate({"nope": LayerChoice.make("dense", 0, 8)}),
                    tmp_path / "x.aspk")


@pytest.mark.parametrize("qmax", [1, 7, 127, 32767])
def test_codes_and_scales_are_recovered_bit_exactly(qmax):
    """max|w|/qmax is sometimes an ulp off the scale that made the weights; a nudge finds it."""
    generator = torch.Generator().manual_seed(qmax)
    scale = torch.rand(4000, generator=generator) * 3 + 1e-3
    codes = torch.randint(-qmax, qmax + 1, (4000, 6), generator=generator).float()
    codes[:, 0] = qmax
    codes[0] = 0  # an all-zero (pruned) row
    weights = codes * scale[:, None]
    got_scale, got_codes, exact = _row_scales(weights, qmax)
    assert exact
    assert torch.equal(got_codes * got_scale[:, None], weights)
    assert torch.equal(got_codes, codes)


def test_a_file_with_its_graph_loads_without_model_code(cnn, inputs, tmp_path):
    """save_packed(..., example=): the weight-free program travels in the file, so one call
    with no skeleton gives a model computing what the skeleton-filled one does; the payload
    (the scored bytes) is unchanged, the graph's bytes are counted apart."""
    import autosparse
    from autosparse.export.packed import read_file

    dense, table, graph = cnn
    candidate = _candidate(table, "channel", 0.5, 4)
    _, saved, kept = _to_save(dense, table, graph, candidate)
    without = save_packed(saved, candidate, tmp_path / "w.packed", table=table, kept=kept)
    info = save_packed(saved, candidate, tmp_path / "g.packed", table=table, kept=kept,
                       example=(inputs[:2],))
    assert info.payload_bytes == without.payload_bytes and info.graph_bytes > 0
    assert info.file_bytes == (tmp_path / "g.packed").stat().st_size == \
        info.header_bytes + info.payload_bytes + info.buffer_bytes + info.graph_bytes
    header, _, blob = read_file(tmp_path / "g.packed")
    assert header["graph"]["nbytes"] == len(blob) == info.graph_bytes

    model = autosparse.load(tmp_path / "g.packed")
    filled = load_packed(tmp_path / "g.packed", DigitsCNN(1, 8, 8, 10)).eval()
    with torch.no_grad():
        assert torch.equal(model(inputs), filled(inputs))  # any batch size: dynamic
        assert torch.equal(model(inputs[:5]), filled(inputs[:5]))
    assert torch.equal(model.tensors()["fc1.weight"], filled.fc1.weight)

    with pytest.raises(PackedFormatError, match="no graph section"):
        load_packed(tmp_path / "w.packed")
    data = bytearray((tmp_path / "g.packed").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "bad.packed").write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="graph section corrupt"):
        load_packed(tmp_path / "bad.packed")
