"""Channel groups: traced by Torch-Pruning, offered on leaders only, exact, and counted right.

The promise under test: a channel choice is scored on exactly the model export deploys. So the
fine-tuned (masked) model and the physically shrunk one compute the same outputs, and the size
formula's parameter count is the shrunk model's real one, for residual stages with trained
batch norm, depthwise convs and attention heads.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from autosparse.compress.apply import bake, compress_model, structural_keep
from autosparse.compress.footprint import model_footprint
from autosparse.config.hardware import load_profile
from autosparse.config.space_rules import SpaceConfig
from autosparse.cost.estimate import estimate_cost
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover, find_layers
from autosparse.space.graph import remove_channels, trace_channel_groups
from autosparse.space.search_space import SearchSpace
from autosparse.space.structure import (
    channel_blocker,
    layer_structures,
    parameter_count,
)
from autosparse.workload.models import DigitsCNN, DigitsResNet

torch.set_num_threads(1)
SHAPE = (1, 8, 8)


def channel(sparsity: float, bits: int = 32) -> LayerChoice:
    return LayerChoice.make("channel", sparsity, bits)


def trained_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with nonzero shifts and non-unit statistics, like a trained model's."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 linear project, residual add."""

    def __init__(self, channels: int = 8, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.stem_bn(self.stem(x)))
        h = nn.functional.relu6(self.expand_bn(self.expand(x)))
        h = nn.functional.relu6(self.depthwise_bn(self.depthwise(h)))
        x = x + self.project_bn(self.project(h))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, num_labels=10)

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = transformers.ViTForImageClassification(config)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(pixel_values=x).logits

    torch.manual_seed(0)
    return Logits().eval()


def groups_by_leader(table):
    return {g.name: g for g in table.channel_groups}


def test_residual_stage_is_one_group_with_its_batch_norms_and_the_head_is_blocked():
    table, _ = discover(DigitsResNet(1, 10).eval(), SHAPE)
    groups = groups_by_leader(table)
    stage = groups["stem"]
    assert stage.producers == ("stem", "blocks.0.conv2", "blocks.1.conv2")
    assert dict(stage.consumers) == {"blocks.0.conv1": 1, "blocks.1.conv1": 1,
                                     "blocks.2.conv1": 1, "blocks.2.shortcut.0": 1}
    assert stage.through == ("bn", "blocks.0.bn2", "blocks.1.bn2")
    assert stage.other_params == 6  # three batch norms' scale and shift per channel
    assert stage.blocked is None and stage.step == 4
    inner = groups["blocks.0.conv1"]
    assert inner.producers == ("blocks.0.conv1",) and dict(inner.consumers) == {"blocks.0.conv2": 1}
    assert "model's output" in groups["fc"].blocked
    assert channel_blocker(table, "fc") == groups["fc"].blocked
    assert "follow 'stem'" in channel_blocker(table, "blocks.0.conv2")
    assert channel_blocker(table, "stem") is None


def test_flatten_consumer_counts_columns_per_channel():
    table, _ = discover(DigitsCNN(1, 8, 8, 10).eval(), SHAPE)
    conv3 = groups_by_leader(table)["conv3"]
    assert conv3.consumers == (("fc1", 16),)  # 4x4 positions per channel after the pool


def test_space_offers_channel_on_leaders_only_and_says_why_not():
    table, _ = discover(DigitsResNet(1, 10).eval(), SHAPE)
    config = SpaceConfig.model_validate({"default": {"patterns": ["unstructured", "channel"],
                                                     "sparsity": [0.0, 0.5]}})
    space = SearchSpace.build(config, table)
    patterns = {d.name: d.patterns for d in space.decisions}
    assert "channel" in patterns["stem"] and "channel" in patterns["blocks.0.conv1"]
    assert "channel" not in patterns["fc"] and "channel" not in patterns["blocks.0.conv2"]
    assert any(note.startswith("channel not offered for fc: its channels are the model's output")
               for note in space.notes)
    excluded = SpaceConfig.model_validate({"default": {"patterns": ["unstructured", "channel"]},
                                           "exclude": ["blocks.1.conv2"]})
    space = SearchSpace.build(excluded, table)
    assert "channel" not in next(d for d in space.decisions if d.name == "stem").patterns
    assert any("blocks.1.conv2, which the config excludes" in n for n in space.notes)


def test_attention_heads_go_whole_and_the_residual_stream_is_not_offered():
    model = tiny_vit()
    table, _ = discover(model, SHAPE)
    groups = groups_by_leader(table)
    heads = groups["vit.vit.layers.0.attention.q_proj"]
    assert heads.unit == 8 and heads.units == 4 and heads.blocked is None
    assert set(heads.producers) == {f"vit.vit.layers.0.attention.{p}_proj" for p in "qkv"}
    assert dict(heads.consumers) == {"vit.vit.layers.0.attention.o_proj": 1}
    assert groups["vit.vit.layers.0.mlp.fc1"].blocked is None
    stream = groups["vit.vit.embeddings.patch_embeddings.projection"]
    assert stream.blocked is not None  # LayerNorm statistics and the position embedding
    assert heads.pruned_channels(0.5) == 16 and heads.pruned_channels(0.99) == 24


def _masked_equals_removed(model: nn.Module, candidate: Candidate, tolerance: float = 1e-5):
    """Compress (masks), bake, remove the channels physically: same outputs, predicted params."""
    table, graph = discover(model, SHAPE)
    compressed = bake(compress_model(model, candidate, graph=graph))
    _, _, kept = structural_keep(model, candidate, graph)
    removed = {name: [int(i) for i in torch.nonzero(~keep).flatten()] for name, keep in kept.items()}
    shrunk = copy.deepcopy(compressed)
    remove_channels(shrunk, torch.randn(1, *SHAPE), removed)
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = compressed.eval()(x), shrunk.eval()(x)
    assert (want - got).abs().max() <= tolerance * want.abs().max()
    assert sum(p.numel() for p in shrunk.parameters()) == parameter_count(table, candidate)
    return table, shrunk


def test_residual_stage_with_trained_batch_norm_shrinks_exactly():
    model = trained_batch_norm(DigitsResNet(1, 10))
    candidate = Candidate({"stem": channel(0.5), "blocks.0.conv1": channel(0.75),
                           "blocks.2.conv2": channel(0.25, bits=8),
                           "blocks.4.conv1": channel(0.5), "blocks.3.conv1":
                           LayerChoice.make("unstructured", 0.5, 4)})
    table, shrunk = _masked_equals_removed(model, candidate)
    modules = dict(shrunk.named_modules())
    for name in ("stem", "blocks.0.conv2", "blocks.1.conv2"):  # the stage stays consistent
        assert modules[name].out_channels == 8
    assert modules["blocks.2.conv1"].in_channels == 8 and modules["blocks.0.conv2"].in_channels == 4
    assert modules["blocks.2.shortcut.0"].out_channels == 24 == modules["blocks.3.conv2"].out_channels
    assert modules["fc"].out_features == 10


def test_depthwise_block_shrinks_exactly():
    model = trained_batch_norm(InvertedResidual())
    table, _ = discover(model, SHAPE)
    group = groups_by_leader(table)["expand"]
    assert group.producers == ("expand", "depthwise") and dict(group.consumers) == {"project": 1}
    candidate = Candidate({"expand": channel(0.5, bits=8), "stem": channel(0.5),
                           "depthwise": LayerChoice.make("unstructured", 0.5, 8)})
    _, shrunk = _masked_equals_removed(model, candidate)
    assert shrunk.depthwise.groups == shrunk.depthwise.out_channels == 16


def test_attention_heads_and_mlp_hidden_shrink_exactly():
    model = tiny_vit()
    prefix = "vit.vit.layers.0."
    candidate = Candidate({prefix + "attention.q_proj": channel(0.5),
                           prefix + "mlp.fc1": channel(0.25, bits=8)})
    _, shrunk = _masked_equals_removed(model, candidate, tolerance=1e-4)
    modules = dict(shrunk.named_modules())
    assert modules[prefix + "attention.v_proj"].out_features == 16
    assert modules[prefix + "attention.o_proj"].in_features == 16
    assert modules[prefix + "mlp.fc2"].in_features == 48


def test_lenet_style_size_counts_the_consumers_narrower_inputs():
    """The issue's LeNet case: 50 % channels on four layers; the size formula used to charge the
    kept rows at full input width (2x off). Now weights follow the shrunk shapes exactly."""
    model = DigitsCNN(1, 8, 8, 10).eval()
    table, _ = discover(model, SHAPE)
    candidate = Candidate({n: channel(0.5) for n in ("conv1", "conv2", "conv3", "fc1")})
    structures = layer_structures(table, candidate)
    assert (structures["conv2"].kept_rows, structures["conv2"].kept_columns) == (16, 8)
    assert (structures["fc1"].kept_rows, structures["fc1"].kept_columns) == (32, 16 * 16)
    assert (structures["fc2"].kept_rows, structures["fc2"].kept_columns) == (10, 32)
    footprint = model_footprint(table, candidate)
    weights = sum(layer.kept_weights for layer in footprint.layers)
    biases = sum(s.kept_rows for s in structures.values())
    assert weights + biases == parameter_count(table, candidate)
    _masked_equals_removed(model, candidate)
    dense = model_footprint(table, Candidate({}))
    assert footprint.macs < 0.3 * dense.macs  # both sides of every layer shrink: about 1/4


def test_consumer_latency_falls_with_its_producers_channels():
    table, _ = discover(DigitsCNN(1, 8, 8, 10).eval(), SHAPE)
    profile = load_profile("edge-arm-a76")
    dense = {c.name: c for c in estimate_cost(table, Candidate({}), profile).layers}
    pruned = {c.name: c for c in estimate_cost(table, Candidate({"conv1": channel(0.5)}),
                                               profile).layers}
    assert pruned["conv2"].macs == pytest.approx(dense["conv2"].macs / 2)
    bias = 32 * 4  # conv2 keeps all 32 rows: only its weights read half the inputs
    assert pruned["conv2"].weight_bytes == pytest.approx((dense["conv2"].weight_bytes - bias) / 2
                                                         + bias)


def test_channel_choice_on_a_follower_or_the_output_is_an_error():
    table, _ = discover(DigitsResNet(1, 10).eval(), SHAPE)
    with pytest.raises(ValueError, match="follow 'stem'"):
        layer_structures(table, Candidate({"blocks.0.conv2": channel(0.5)}))
    with pytest.raises(ValueError, match="model's output"):
        layer_structures(table, Candidate({"fc": channel(0.5)}))


def test_nm_consumer_of_pruned_channels_must_still_fit():
    table, _ = discover(DigitsCNN(1, 8, 8, 10).eval(), SHAPE)
    groups = groups_by_leader(table)
    assert groups["conv2"].pruned_channels(0.7) % 4 == 0  # channels go in fours: 2:4 still fits
    layer_structures(table, Candidate({"conv2": channel(0.7), "conv3": LayerChoice.make("2:4", 0, 8)}))


def test_untraceable_model_offers_no_channel_and_says_why():
    model = DigitsCNN(1, 8, 8, 10).eval()
    graph = trace_channel_groups(model, find_layers(model), torch.randn(1, 3, 5, 5))
    assert graph.groups == () and "RuntimeError" in graph.error
    table, _ = discover(model, SHAPE)
    broken = dataclasses.replace(table, channel_groups=(), graph_error=graph.error)
    assert channel_blocker(broken, "conv1").startswith("no dependency graph: RuntimeError")
    with pytest.raises(ValueError, match="no dependency graph"):
        layer_structures(broken, Candidate({"conv1": channel(0.5)}))
