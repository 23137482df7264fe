"""Physical removal of channel groups (autosparse.compress.shrink): the shrunk model computes what
the compressed model computes, has the parameters the footprint predicts, and keeps residual,
depthwise and attention groups consistent.

Models get *trained-like* batch norms (random running statistics, scale and shift): a removed
channel then leaves a nonzero constant after its batch norm, the case the old fx tracer refused.
Tolerance: max |shrunk - compressed| <= 1e-5 x max |compressed| in eval mode (float32; removing
zero terms only reorders sums).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from autosparse.compress.apply import bake, compress_model, structural_keep
from autosparse.compress.shrink import (
    ShrinkError,
    ShrinkReport,
    expected_shapes,
    predicted_parameters,
    shrink_model,
)
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover, example_input
from autosparse.space.structure import pruned_by_group
from autosparse.workload.models import DigitsCNN, DigitsResNet

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
RELATIVE = 1e-5


def channel(sparsity: float = 0.5, bits: int = 32) -> LayerChoice:
    return LayerChoice.make("channel", sparsity, bits)


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random batch-norm statistics, scales and shifts: removed channels leave constants."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shrink(dense: nn.Module, choices: dict[str, LayerChoice]
           ) -> tuple[nn.Module, nn.Module, ShrinkReport, object]:
    """(compressed, shrunk, report, table): compress with the graph, bake, shrink."""
    table, graph = discover(dense, SHAPE)
    candidate = Candidate(choices)
    _, _, kept = structural_keep(dense, candidate, graph)
    compressed = compress_model(dense, candidate, None, graph).eval()
    baked = bake(compress_model(dense, candidate, None, graph)).eval()
    shrunk, report = shrink_model(baked, candidate, table, graph, kept,
                                  example_input(dense, SHAPE))
    return compressed, shrunk.eval(), report, table


def assert_same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...] = SHAPE) -> None:
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got = a(x), b(x)
    assert want.shape == got.shape
    assert (want - got).abs().max() <= RELATIVE * want.abs().max()


def assert_counts(shrunk: nn.Module, report: ShrinkReport, table, choices) -> None:
    predicted = predicted_parameters(table, Candidate(choices))
    assert n_params(shrunk) == report.parameters_after == report.parameters_predicted == predicted
    modules = dict(shrunk.named_modules())
    for name, shape in expected_shapes(table, Candidate(choices)).items():
        assert tuple(modules[name].weight.shape) == shape, name


# -------------------------------------------------------------------------------- ResNet


RESNET = {
    "stem": channel(0.5, 8),                     # stage 1: stem + blocks.0/1.conv2 (residual)
    "blocks.2.conv2": channel(0.25),             # stage 2: conv2 + 1x1 shortcut + blocks.3.conv2
    "blocks.0.conv1": channel(0.5, 4),           # inner convs
    "blocks.4.conv1": channel(0.5),
    "blocks.1.conv1": LayerChoice.make("unstructured", 0.6, 8),
    "blocks.3.conv1": LayerChoice.make("2:4", 0, 8),
    "fc": LayerChoice.make("unstructured", 0.5, 8),
}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    dense = trained_like(DigitsResNet(1, 10))
    return dense, *shrink(dense, RESNET)


def test_resnet_shrinks_to_what_was_compressed(resnet):
    dense, compressed, shrunk, report, table = resnet
    assert_same_outputs(compressed, shrunk)
    assert_counts(shrunk, report, table, RESNET)
    assert report.parameters_before == n_params(dense) > report.parameters_after
    assert report.shrunk == ("stem", "blocks.0.conv1", "blocks.2.conv2", "blocks.4.conv1")
    assert (report.group("stem").channels_before, report.group("stem").channels_after) == (16, 8)
    assert report.group("blocks.2.conv2").channels_after == 24
    assert dense.stem.weight.shape == (16, 1, 3, 3), "the input model is untouched"


def test_resnet_residual_stages_stay_consistent(resnet):
    _, _, s, report, _ = resnet
    stage1 = [s.stem, s.blocks[0].conv2, s.blocks[1].conv2]
    assert {m.out_channels for m in stage1} == {8}
    assert {m.num_features for m in (s.bn, s.blocks[0].bn2, s.blocks[1].bn2)} == {8}
    assert {s.blocks[0].conv1.in_channels, s.blocks[1].conv1.in_channels,
            s.blocks[2].conv1.in_channels, s.blocks[2].shortcut[0].in_channels} == {8}
    stage2 = [s.blocks[2].conv2, s.blocks[2].shortcut[0], s.blocks[3].conv2]
    assert {m.out_channels for m in stage2} == {24}
    assert s.blocks[2].shortcut[1].num_features == 24
    assert s.blocks[4].conv1.in_channels == s.blocks[4].shortcut[0].in_channels == 24
    assert (s.blocks[0].conv1.out_channels, s.blocks[0].conv2.in_channels) == (8, 8)
    assert set(report.group("stem").producers) == {"stem", "blocks.0.conv2", "blocks.1.conv2"}
    with torch.no_grad():  # the adds still work at every batch size
        assert s(torch.randn(3, *SHAPE)).shape == (3, 10)


def test_output_layer_is_never_shrunk(resnet):
    dense, _, shrunk, _, table = resnet
    assert (shrunk.fc.out_features, shrunk.fc.in_features) == (10, 64)
    with pytest.raises(ValueError, match="'fc' cannot be channel-pruned.*output"):
        pruned_by_group(table, Candidate({"fc": channel()}))
    last = {"blocks.4.conv2": channel(0.5)}  # the last stage feeds fc's columns, not its rows
    compressed, small, report, table = shrink(dense, last)
    assert (small.fc.out_features, small.fc.in_features) == (10, 32)
    assert_same_outputs(compressed, small)
    assert_counts(small, report, table, last)


def test_predicted_parameters_by_hand():
    """stem 0.5 of 16 channels: its 8 rows, 8 columns of four readers, 8 of three batch norms."""
    table, _ = discover(DigitsResNet(1, 10).eval(), SHAPE)
    choices = Candidate({"stem": channel(0.5)})
    dense = predicted_parameters(table, Candidate({}))
    saved = 8 * 9 + 2 * 8 * 16 * 9 + 2 * 16 * 8 * 9 + 32 * 8 * 9 + 32 * 8 + 3 * 2 * 8
    assert dense == n_params(DigitsResNet(1, 10))
    assert predicted_parameters(table, choices) == dense - saved
    shapes = expected_shapes(table, choices)
    assert shapes["stem"] == (8, 1, 3, 3) and shapes["blocks.2.shortcut.0"] == (32, 8, 1, 1)
    assert shapes["blocks.0.conv1"] == (16, 8, 3, 3) and shapes["fc"] == (10, 64)


# -------------------------------------------------------------------------------- DigitsCNN


def test_digits_cnn_every_leader_shrinks():
    torch.manual_seed(0)
    dense = DigitsCNN(1, 8, 8, 10).eval()
    choices = {name: channel(0.5, 8) for name in ("conv1", "conv2", "conv3", "fc1")}
    compressed, small, report, table = shrink(dense, choices)
    assert (small.conv1.out_channels, small.conv2.in_channels) == (8, 8)
    assert (small.conv2.out_channels, small.conv3.in_channels) == (16, 16)
    assert (small.conv3.out_channels, small.fc1.in_features) == (16, 16 * 16)  # flatten: H*W
    assert (small.fc1.out_features, small.fc2.in_features, small.fc2.out_features) == (32, 32, 10)
    expected = (1 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 16 * 9 + 16) + (256 * 32 + 32) \
        + (32 * 10 + 10)
    assert n_params(small) == expected
    assert_counts(small, report, table, choices)
    assert report.group("conv3").consumers == ("fc1",)
    assert_same_outputs(compressed, small)


def test_no_channel_choice_shrinks_nothing():
    dense = DigitsCNN(1, 8, 8, 10).eval()
    choices = {"conv2": LayerChoice.make("unstructured", 0.7, 4)}
    compressed, small, report, _ = shrink(dense, choices)
    assert report.groups == () and report.parameters_after == report.parameters_before
    assert "no channel group pruned" in report.describe()
    assert_same_outputs(compressed, small)


# -------------------------------------------------------------------------------- depthwise


def _conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """MobileNetV2-style: stem, 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN,
    residual add, pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 8, 3), nn.ReLU6())
        self.expand = nn.Sequential(*_conv_bn(8, 32, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(*_conv_bn(32, 32, 3, groups=32), nn.ReLU6())
        self.project = nn.Sequential(*_conv_bn(32, 8, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_depthwise_block_shrinks():
    torch.manual_seed(0)
    dense = trained_like(InvertedResidual())
    choices = {"expand.0": channel(0.5, 8), "stem.0": channel(0.5),
               "project.0": LayerChoice.make("unstructured", 0.5, 8)}
    compressed, small, report, table = shrink(dense, choices)
    assert set(report.group("expand.0").producers) == {"expand.0", "depthwise.0"}
    assert small.expand[0].out_channels == small.depthwise[0].out_channels == 16
    assert small.depthwise[0].groups == small.depthwise[0].in_channels == 16
    assert small.depthwise[1].num_features == small.expand[1].num_features == 16
    assert small.project[0].in_channels == 16
    # the residual stage: stem and project tied, the head reads 4 channels
    assert small.stem[0].out_channels == small.project[0].out_channels == small.fc.in_features == 4
    assert_counts(small, report, table, choices)
    assert_same_outputs(compressed, small)


# -------------------------------------------------------------------------------- attention


class TinyViT(nn.Module):
    """A one-layer transformers ViT whose forward returns the logits tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = ViTForImageClassification(ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=4, intermediate_size=64, num_labels=10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x).logits


def test_attention_heads_and_mlp_shrink():
    torch.manual_seed(0)
    dense = TinyViT().eval()
    layer = "vit.vit.layers.0"
    choices = {f"{layer}.attention.q_proj": channel(0.5, 8), f"{layer}.mlp.fc1": channel(0.5, 4)}
    compressed, small, report, table = shrink(dense, choices)
    heads = report.group(f"{layer}.attention.q_proj")
    assert (heads.unit, heads.channels_before, heads.channels_after) == (8, 32, 16)  # 2 of 4 heads
    attention = small.vit.vit.layers[0].attention
    assert {attention.q_proj.out_features, attention.k_proj.out_features,
            attention.v_proj.out_features, attention.o_proj.in_features} == {16}
    assert attention.o_proj.out_features == 32, "the residual width is untouched"
    mlp = small.vit.vit.layers[0].mlp
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (32, 32)
    assert_counts(small, report, table, choices)
    assert_same_outputs(compressed, small)


# -------------------------------------------------------------------------------- errors


def test_shrink_refuses_what_would_not_be_the_scored_model():
    torch.manual_seed(0)
    dense = DigitsCNN(1, 8, 8, 10).eval()
    table, graph = discover(dense, SHAPE)
    candidate = Candidate({"conv2": channel(0.5)})
    _, _, kept = structural_keep(dense, candidate, graph)
    example = example_input(dense, SHAPE)
    parametrized = compress_model(dense, candidate, None, graph)
    with pytest.raises(ValueError, match="baked model"):
        shrink_model(parametrized, candidate, table, graph, kept, example)
    baked = bake(parametrized)
    with pytest.raises(ShrinkError, match="no kept-channel mask for the pruned groups conv2"):
        shrink_model(baked, candidate, table, graph, {}, example)
    other = {"conv2": kept["conv2"].roll(1)}  # not the channels the model was compressed with
    with pytest.raises(ShrinkError, match="conv2.*nonzero weights"):
        shrink_model(baked, candidate, table, graph, other, example)
    fewer = {"conv2": kept["conv2"].clone()}
    fewer["conv2"][torch.nonzero(kept["conv2"])[0]] = False
    with pytest.raises(ShrinkError, match="removes 17 channels, the candidate prunes 16"):
        shrink_model(baked, candidate, table, graph, fewer, example)


def test_report_serialises():
    dense = DigitsCNN(1, 8, 8, 10).eval()
    _, _, report, _ = shrink(dense, {"conv1": channel(0.5)})
    data = report.to_dict()
    assert data["groups"][0] == {"name": "conv1", "leader": "conv1", "producers": ["conv1"],
                                 "consumers": ["conv2"], "through": [], "channels_before": 16,
                                 "channels_after": 8, "unit": 1}
    assert data["parameters_after"] == data["parameters_predicted"]
    assert "conv1: 16 -> 8 channels in conv1; read by conv2" in report.describe()
