"""Layer discovery: hand-computed MACs and activation sizes, other params, global magnitude."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autosparse.config.sections import ModelConfig
from autosparse.space.discovery import (
    discover_layers,
    global_magnitude_allocation,
    unused_layers,
)
from autosparse.space.layers import LayerTable
from autosparse.workload.models import build_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)  # 1x5x5 -> 2x3x3
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(18, 4)
        self.spare = nn.Linear(4, 4, bias=False)  # never called

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


def test_tiny_conv_linear_by_hand():
    table = discover_layers(Tiny(), (1, 5, 5))
    assert table.names == ["conv", "fc", "spare"]
    conv, fc, spare = table.layers
    assert (conv.kind, conv.weight_shape, conv.has_bias) == ("Conv2d", (2, 1, 3, 3), True)
    assert conv.macs == 18 * 9 == 162
    assert (conv.input_elements, conv.output_elements) == (25, 18)
    assert (fc.kind, fc.macs, fc.input_elements, fc.output_elements) == ("Linear", 72, 18, 4)
    assert (spare.macs, spare.has_bias, spare.weight_count) == (0, False, 16)
    assert unused_layers(table) == ["spare"]
    assert table.other_params == 4  # batch norm weight + bias (running stats are buffers)
    assert table.input_shape == (1, 5, 5)


def test_conv1d_and_grouped_conv():
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1),  # 3x10 -> 4x10
        nn.Conv1d(4, 8, 5, groups=2, stride=2, bias=False),  # 4x10 -> 8x3
    )
    table = discover_layers(model, (3, 10))
    first, second = table.layers
    assert (first.kind, first.macs, first.output_elements) == ("Conv1d", 40 * 3 * 3, 40)
    assert (second.groups, second.weight_shape, second.has_bias) == (2, (8, 2, 5), False)
    assert second.macs == 8 * 3 * 2 * 5
    assert (second.input_elements, second.output_elements) == (40, 24)


def test_depthwise_and_grouped_conv2d():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),  # 4x6x6 -> 8x6x6
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
    )
    grouped, depthwise = discover_layers(model, (4, 6, 6)).layers
    assert grouped.macs == 8 * 36 * 2 * 9
    assert depthwise.macs == 8 * 36 * 1 * 9 and depthwise.groups == 8


def test_linear_on_sequences_counts_every_position():
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    first, second = discover_layers(model, (5, 6)).layers
    assert (first.macs, first.input_elements, first.output_elements) == (5 * 3 * 6, 30, 15)
    assert second.macs == 5 * 2 * 3


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.emb_scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fc(self.fc(x) * self.emb_scale)


def test_shared_layer_adds_up_calls_and_other_params():
    table = discover_layers(Shared(), (4,))
    assert table["fc"].macs == 2 * 16
    assert table.other_params == 4


def test_train_eval_mode_restored_per_module():
    model = Tiny()
    model.train()
    model.bn.eval()  # a deliberately frozen batch norm
    running_mean = model.bn.running_mean.clone()
    discover_layers(model, (1, 5, 5))
    assert model.training and model.conv.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)
    model.eval()
    discover_layers(model, (1, 5, 5))
    assert not model.training and not model.conv.training


def test_no_hooks_left_behind():
    model = Tiny()
    discover_layers(model, (1, 5, 5))
    assert all(not m._forward_hooks for m in model.modules())


def test_digits_cnn_table():
    model = build_model(ModelConfig(builtin="digits-cnn"), (1, 8, 8), 10)
    table = discover_layers(model, (1, 8, 8))
    assert table.names == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    macs = {layer.name: layer.macs for layer in table.layers}
    assert macs == {
        "conv1": 16 * 64 * 9,
        "conv2": 32 * 64 * 16 * 9,
        "conv3": 32 * 16 * 32 * 9,
        "fc1": 512 * 64,
        "fc2": 64 * 10,
    }
    assert table.other_params == 0
    assert LayerTable.from_dict(table.to_dict()) == table


def test_global_magnitude_by_hand():
    weights = {
        "a": torch.tensor([1.0, -2.0, 3.0, -4.0]),
        "b": torch.arange(5.0, 13.0),
    }
    allocation = global_magnitude_allocation(weights, (0.0, 0.25, 0.5))
    assert allocation[0.0] == {"a": 0.0, "b": 0.0}
    assert allocation[0.25] == {"a": 0.75, "b": 0.0}  # 3 smallest of 12
    assert allocation[0.5] == {"a": 1.0, "b": 0.25}  # 6 smallest: 1..4 and 5, 6


def test_global_magnitude_shares_ties_in_proportion():
    weights = {"a": torch.zeros(10), "b": torch.zeros(30)}
    allocation = global_magnitude_allocation(weights, (0.5,))
    assert allocation[0.5] == {"a": 0.5, "b": 0.5}


def test_global_magnitude_sums_to_target_on_a_real_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(builtin="digits-cnn"), (1, 8, 8), 10)
    targets = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    table = discover_layers(model, (1, 8, 8), global_targets=targets)
    assert sorted(table.global_magnitude) == list(targets)
    total = sum(layer.weight_count for layer in table.layers)
    for target, allocation in table.global_magnitude.items():
        pruned = sum(allocation[layer.name] * layer.weight_count for layer in table.layers)
        assert pruned / total == pytest.approx(target, abs=1e-3)
        assert all(0.0 <= s <= 1.0 for s in allocation.values())
    # fc1 holds most small weights (fan-in 512 -> small init), so it is pruned hardest
    allocation = table.global_magnitude[0.5]
    assert allocation["fc1"] == max(allocation.values())


def test_searchable_limits_the_allocation():
    torch.manual_seed(0)
    model = build_model(ModelConfig(builtin="digits-cnn"), (1, 8, 8), 10)
    table = discover_layers(model, (1, 8, 8), global_targets=(0.5,), searchable=["conv2", "fc1"])
    assert table.names == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    allocation = table.global_magnitude[0.5]
    assert set(allocation) == {"conv2", "fc1"}
    counts = {"conv2": table["conv2"].weight_count, "fc1": table["fc1"].weight_count}
    pruned = sum(allocation[n] * c for n, c in counts.items())
    assert pruned / sum(counts.values()) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="not discovered layers"):
        discover_layers(model, (1, 8, 8), searchable=["conv9"])


def test_bad_targets():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        global_magnitude_allocation({"a": torch.ones(3)}, (1.0,))


def test_with_searchable_equals_discovering_again_with_searchable():
    """prepare() narrows the global allocation without tracing the model a second time."""
    from autosparse.space.discovery import discover, with_searchable
    from autosparse.workload.models import DigitsCNN

    model = DigitsCNN(1, 8, 8, 10).eval()
    table, _ = discover(model, (1, 8, 8))
    again, _ = discover(model, (1, 8, 8), searchable=["conv2", "fc1"])
    assert with_searchable(table, model, ["conv2", "fc1"]) == again
    assert with_searchable(table, model, ["conv2", "fc1"]).global_magnitude != table.global_magnitude
