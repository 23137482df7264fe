"""Masks, fake quantization, parametrizations, Taylor scores and baking (autosparse.compress.apply)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet
from torch import nn
from torch.nn.utils import parametrize

from autosparse.compress.apply import (
    MaskedQuantizer,
    bake,
    compress_model,
    compute_mask,
    fake_quant,
    layer_sparsity,
    qmax_for_bits,
    taylor_scores,
    weight_mask,
)
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.layers import LayerInfo

LAYERS = ("conv1", "conv2", "fc1", "fc2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen))
        for _ in range(3)
    ]


def uniform(pattern: str, sparsity: float, bits: int, layers=LAYERS, criterion="magnitude"):
    return Candidate({n: LayerChoice.make(pattern, sparsity, bits, criterion) for n in layers})


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


# ---------------------------------------------------------------------------- masks


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.73, 0.9, 0.99])
def test_unstructured_sparsity_is_exact_per_layer(net, sparsity):
    model = compress_model(net, uniform("unstructured", sparsity, 32))
    for name in LAYERS:
        numel = getattr(net, name).weight.numel()
        expected = round(sparsity * numel)
        assert zeros(getattr(model, name).weight) == expected, name
        assert layer_sparsity(model, name) == pytest.approx(expected / numel)
        # with quantization, the mask still prunes exactly that many (rounding may add zeros)
    model8 = compress_model(net, uniform("unstructured", sparsity, 8))
    for name in LAYERS:
        mask = weight_mask(model8, name)
        assert zeros(mask) == round(sparsity * mask.numel())
        assert zeros(getattr(model8, name).weight) >= zeros(mask)


def test_unstructured_prunes_lowest_magnitudes_and_breaks_ties_deterministically():
    w = torch.tensor([[0.5, -0.1, 0.3, 0.0], [-2.0, 0.1, 0.1, 0.1]])
    mask = compute_mask(w, LayerChoice.make("unstructured", 0.5, 32))
    # 4 pruned: 0.0, then the four |0.1| ties -> the first three by flat index
    assert mask.tolist() == [[True, False, True, False], [True, False, False, True]]
    assert torch.equal(mask, compute_mask(w.clone(), LayerChoice.make("unstructured", 0.5, 32)))


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
def test_nm_conv_groups_run_along_input_channels(net, pattern):
    n, m = map(int, pattern.split(":"))
    weight = net.conv2.weight.detach()  # (16, 8, 3, 3): 8 input channels
    mask = compute_mask(weight, LayerChoice.make(pattern, 0, 32))
    # (O, I, kh, kw) -> (O, kh, kw, I): groups of M consecutive input channels
    groups = mask.permute(0, 2, 3, 1).reshape(16, -1, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the N largest magnitudes of each group
    mags = weight.abs().permute(0, 2, 3, 1).reshape(16, -1, m)
    kept_min = torch.where(groups, mags, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, mags).amax(-1)
    assert (kept_min >= pruned_max).all()

    model = compress_model(net, Candidate({"conv2": LayerChoice.make(pattern, 0, 32)}))
    eff = model.conv2.weight.detach().permute(0, 2, 3, 1).reshape(16, -1, m)
    assert ((eff != 0).sum(-1) == n).all()


def test_nm_conv_grouping_differs_from_kernel_order():
    # scores that favour the first input channels at every kernel position: grouping along I keeps
    # input channels 0,1 of each group of 4; grouping the raw (O, I*k*k) order would not
    scores = torch.arange(4, 0, -1, dtype=torch.float).reshape(1, 4, 1, 1).expand(2, 4, 3, 3)
    mask = compute_mask(torch.randn(2, 4, 3, 3), LayerChoice.make("2:4", 0, 32), scores.clone())
    assert mask[:, :2].all() and not mask[:, 2:].any()


def test_nm_linear_groups(net):
    model = compress_model(net, uniform("2:4", 0, 32, layers=("fc1", "fc2")))
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight.detach()
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()
        assert layer_sparsity(model, name) == pytest.approx(0.5)


def test_nm_unsupported_row_length_raises(net):
    choice = LayerChoice.make("2:4", 0, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        compute_mask(net.conv1.weight, choice)  # row length 1*3*3 = 9
    with pytest.raises(ValueError, match="conv1"):
        compress_model(net, Candidate({"conv1": choice}))
    with pytest.raises(ValueError, match="multiple of 8"):
        compute_mask(torch.randn(3, 12), LayerChoice.make("4:8", 0, 32))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.99])
def test_channel_zeroes_whole_rows_and_their_bias(net, sparsity):
    model = compress_model(net, uniform("channel", sparsity, 32))
    x = torch.randn(4, 1, 8, 8)
    for name in LAYERS:
        module = getattr(model, name)
        rows = module.weight.detach().reshape(module.weight.shape[0], -1)
        out = rows.shape[0]
        dead = (rows == 0).all(dim=1)
        assert int(dead.sum()) == min(round(sparsity * out), out - 1), name
        assert int((~dead).sum()) >= 1
        assert (module.bias[dead] == 0).all() and (module.bias[~dead] != 0).all()
        # pruned channels are the lowest-L2 rows of the dense weight
        norms = getattr(net, name).weight.detach().reshape(out, -1).norm(dim=1)
        if dead.any():
            assert norms[dead].max() <= norms[~dead].min()
    # a pruned conv channel outputs exactly zero
    module = model.conv1
    dead = (module.weight.detach().reshape(8, -1) == 0).all(dim=1)
    with torch.no_grad():
        assert (module(x)[:, dead] == 0).all()


def test_channel_with_taylor_uses_summed_row_scores():
    w = torch.ones(4, 3)
    scores = torch.tensor([[3.0, 3, 3], [0, 0, 1], [2, 2, 2], [0, 0, 0.5]])
    mask = compute_mask(w, LayerChoice.make("channel", 0.5, 32, "taylor"), scores)
    assert mask.all(dim=1).tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    "shape", [(8, 1, 3, 3), (16, 8, 3, 3), (4, 6, 5), (1, 12), (10, 64), (6, 10), (3, 24, 1, 1)]
)
@pytest.mark.parametrize("pattern", ["unstructured", "channel", "2:4", "1:8", "3:6"])
def test_compute_mask_agrees_with_layer_info_supports(shape, pattern):
    info = LayerInfo("x", "Conv2d" if len(shape) > 2 else "Linear", shape, False, macs=1)
    choice = LayerChoice.make(pattern, 0.5, 8)
    if info.supports(pattern):
        assert compute_mask(torch.randn(shape), choice).shape == shape
    else:
        with pytest.raises(ValueError):
            compute_mask(torch.randn(shape), choice)


def test_single_channel_layer_cannot_be_channel_pruned():
    with pytest.raises(ValueError, match="more than one output channel"):
        compute_mask(torch.randn(1, 5), LayerChoice.make("channel", 0.5, 32))


def test_scores_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        compute_mask(torch.randn(4, 4), LayerChoice.make("unstructured", 0.5, 32), torch.ones(4))


# ---------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_levels_per_output_channel(net, bits):
    model = compress_model(net, uniform("unstructured", 0.3, bits))
    qmax = qmax_for_bits(bits)
    for name in LAYERS:
        dense_masked = getattr(net, name).weight.detach() * weight_mask(model, name)
        w = getattr(model, name).weight.detach()
        rows, dense_rows = w.reshape(w.shape[0], -1), dense_masked.reshape(w.shape[0], -1)
        amax = dense_rows.abs().amax(dim=1)
        scale = amax / qmax
        for row, dense_row, a, s in zip(rows, dense_rows, amax, scale):
            assert len(torch.unique(row)) <= 2**bits - 1 <= 2**bits
            levels = row / s
            assert torch.allclose(levels, levels.round(), atol=1e-4)
            assert levels.abs().max() == pytest.approx(qmax, abs=1e-4)
            assert row.abs().max() == pytest.approx(float(a), rel=1e-6)  # max level = max |w|
            assert (row.abs() - dense_row.abs()).abs().max() <= s / 2 + 1e-6  # round to nearest
        assert (w[dense_masked == 0] == 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
def test_fake_quant_never_exceeds_qmax_levels(bits):
    gen = torch.Generator().manual_seed(bits)
    qmax = qmax_for_bits(bits)
    w = torch.randn(64, 33, generator=gen) * torch.logspace(-6, 6, 64).unsqueeze(1)
    q = fake_quant(w, bits)
    scale = w.abs().amax(1, keepdim=True) / qmax
    levels = q / scale
    assert (levels.round().abs() <= qmax).all()
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert max(len(torch.unique(row)) for row in q) <= 2 * qmax + 1


def test_fake_quant_zero_row_and_16_bits():
    w = torch.randn(3, 20)
    w[1] = 0
    q = fake_quant(w, 16)
    assert torch.isfinite(q).all() and (q[1] == 0).all()
    assert torch.allclose(q, w, atol=float(w.abs().max()) / 32767)
    assert fake_quant(w, 32) is w
    with pytest.raises(ValueError):
        qmax_for_bits(1)


def test_bits32_changes_nothing(net):
    model = compress_model(net, uniform("dense", 0, 32))
    for name in LAYERS:
        assert not parametrize.is_parametrized(getattr(model, name))
        assert torch.equal(getattr(model, name).weight, getattr(net, name).weight)
    model = compress_model(net, uniform("unstructured", 0.5, 32))
    for name in LAYERS:
        w, mask = getattr(model, name).weight, weight_mask(model, name).bool()
        assert torch.equal(w[mask], getattr(net, name).weight[mask])


def test_dense_int8_quantizes_without_mask(net):
    model = compress_model(net, uniform("dense", 0, 8))
    assert weight_mask(model, "fc1") is None
    w = model.fc1.weight.detach()
    assert zeros(w) < w.numel() // 10
    assert all(len(torch.unique(r)) <= 255 for r in w)


def test_ste_gradient_flows_only_through_kept_weights(net, data):
    model = compress_model(net, uniform("unstructured", 0.5, 4))
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()
    for name in LAYERS:
        original = getattr(model, name).parametrizations.weight.original
        mask = weight_mask(model, name).bool()
        assert original.grad is not None
        assert (original.grad[~mask] == 0).all(), name
        assert (original.grad[mask] != 0).float().mean() > 0.5, name


def test_parametrization_keeps_mask_as_buffer(net):
    model = compress_model(net, uniform("unstructured", 0.5, 8))
    quantizer = model.fc1.parametrizations.weight[0]
    assert isinstance(quantizer, MaskedQuantizer)
    assert "mask" in dict(quantizer.named_buffers())
    assert not any(p is quantizer.mask for p in model.parameters())
    assert "fc1.parametrizations.weight.0.mask" in model.state_dict()


# ---------------------------------------------------------------------------- models


def test_compress_model_leaves_dense_untouched(net, data):
    before = copy.deepcopy(net.state_dict())
    x, _ = data[0]
    with torch.no_grad():
        ref = net(x)
    model = compress_model(net, uniform("channel", 0.5, 4))
    with torch.no_grad():
        model(x)
    assert model is not net
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(net(x), ref)


def test_layers_not_in_candidate_are_untouched(net):
    model = compress_model(net, Candidate({"conv2": LayerChoice.make("unstructured", 0.5, 8)}))
    assert parametrize.is_parametrized(model.conv2)
    for name in ("conv1", "fc1", "fc2"):
        assert not parametrize.is_parametrized(getattr(model, name))
        assert torch.equal(getattr(model, name).weight, getattr(net, name).weight)


def test_unknown_layer_raises(net):
    with pytest.raises(KeyError, match="nope"):
        compress_model(net, Candidate({"nope": LayerChoice.make("unstructured", 0.5, 8)}))


@pytest.mark.parametrize(
    "pattern,sparsity,bits", [("unstructured", 0.6, 4), ("2:4", 0, 8), ("channel", 0.5, 3)]
)
def test_bake_removes_parametrizations_and_keeps_output(net, data, pattern, sparsity, bits):
    layers = ("conv2", "fc1", "fc2") if pattern == "2:4" else LAYERS
    model = compress_model(net, uniform(pattern, sparsity, bits, layers=layers)).eval()
    x, _ = data[0]
    with torch.no_grad():
        before = model(x)
        weights = {n: getattr(model, n).weight.detach().clone() for n in layers}
    assert bake(model) is model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any("parametrizations" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    for name in layers:
        weight = getattr(model, name).weight
        assert isinstance(weight, nn.Parameter)
        assert torch.equal(weight.detach(), weights[name])


def test_taylor_scores_differ_from_magnitude_and_are_used(net):
    # input feature 0 of a linear layer is always zero: its weights have zero gradient, so
    # Taylor importance prunes them first although they are the largest in magnitude
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[:, 0] = 5.0
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randn(16, 8, generator=gen)
        x[:, 0] = 0
        batches.append((x, torch.randint(0, 3, (16,), generator=gen)))
    before = copy.deepcopy(model.state_dict())
    model.train()
    scores = taylor_scores(model, batches, ["0", "2"], max_batches=3)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(scores) == {"0", "2"} and scores["0"].shape == (6, 8)
    assert (scores["0"][:, 0] == 0).all() and (scores["0"][:, 1:] > 0).any()

    # max_batches is honoured: 3 batches sum to more than 1
    one = taylor_scores(model, batches, ["0"], max_batches=1)["0"]
    assert scores["0"].sum() > one.sum()

    choice = LayerChoice.make("unstructured", 0.25, 32, "taylor")
    magnitude = compute_mask(model[0].weight, LayerChoice.make("unstructured", 0.25, 32))
    taylor = compute_mask(model[0].weight, choice, scores["0"])
    assert magnitude[:, 0].all() and not taylor[:, 0].any()
    assert not torch.equal(magnitude, taylor)

    compressed = compress_model(model, Candidate({"0": choice}), scores=scores)
    assert torch.equal(weight_mask(compressed, "0").bool(), taylor)
    with pytest.raises(ValueError, match="taylor"):
        compress_model(model, Candidate({"0": choice}))
    with pytest.raises(ValueError, match="taylor"):
        compress_model(model, Candidate({"0": choice}), scores={"2": scores["2"]})


def test_taylor_scores_on_cnn_keeps_eval_mode(net, data):
    net.eval()
    scores = taylor_scores(net, data, LAYERS, max_batches=2)
    assert not net.training
    assert all(scores[n].shape == getattr(net, n).weight.shape for n in LAYERS)
    candidate = uniform("2:4", 0, 8, layers=("conv2", "fc1"), criterion="taylor")
    model = compress_model(net, candidate, scores)
    assert layer_sparsity(model, "conv2") >= 0.5
