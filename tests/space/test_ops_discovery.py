"""Discovery records the ops between weight layers (adds, pooling, attention) as plain data."""

from collections import Counter

import torch
from torch import nn
from torch.nn import functional as F

from autosparse.space.discovery import discover_layers
from autosparse.workload.models import DigitsConv1d


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y)) + y  # residual add: two 8x6x6 tensors in, one out
        y = y * 0.5  # a scalar scale: not an op between layers
        y = F.max_pool2d(y, 2)  # 288 in, 72 out
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_residual_add_and_pooling_are_recorded_after_the_layer_they_follow():
    table = discover_layers(_Residual(), (4, 6, 6))
    add, pool, avg = table.ops
    assert (add.kind, add.elements, add.after_layer) == ("add", 3 * 288, "conv2")
    assert (pool.kind, pool.elements, pool.after_layer) == ("pool", 288 + 72, "conv2")
    assert (avg.kind, avg.elements) == ("pool", 72 + 8)
    assert table.names == ["conv1", "conv2", "fc"]  # the layers are what they were


def test_builtin_models_record_their_ops():
    table = discover_layers(DigitsConv1d(8, 8, 10), (1, 8, 8))
    assert Counter(op.kind for op in table.ops) == {"pool": 2}
    assert all(op.macs == 0 for op in table.ops)


def test_attention_matmuls_carry_their_macs():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):  # x: (1, 5 tokens, 8)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            scores = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            return scores @ v

    kinds = [(op.kind, op.macs) for op in discover_layers(Attention(), (5, 8)).ops]
    assert kinds == [("transpose", 0), ("matmul", 5 * 5 * 8), ("softmax", 0),
                     ("matmul", 5 * 8 * 5)]
