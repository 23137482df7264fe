"""nn.Embedding and transformers' Conv1D (GPT-2's transposed Linear) are discovered and searched
for bits and unstructured sparsity: compressed, counted and packed like any other layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autosparse.compress.apply import bake, compress_model, layer_sparsity
from autosparse.compress.footprint import model_footprint
from autosparse.compress.storage import model_zeros
from autosparse.config.space_rules import SpaceConfig
from autosparse.export.packed import load_packed, save_packed
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover
from autosparse.space.search_space import SearchSpace

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

torch.set_num_threads(1)


class TokenNet(nn.Module):
    """Float input binned into 32 token ids, embedded, a GPT-2 style Conv1D, then a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mix = Conv1D(24, 16)  # nf=24 outputs from nx=16 inputs: weight stored (16, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.flatten(1).sigmoid() * 31.999).long()
        return self.head(torch.relu(self.mix(self.embed(ids))).mean(dim=1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TokenNet().eval()


def test_discovered_with_their_kinds_and_costs(net):
    table, _ = discover(net, (1, 8, 8))
    assert [(l.name, l.kind) for l in table.layers] == [
        ("embed", "Embedding"), ("mix", "Conv1D"), ("head", "Linear")]
    assert table["embed"].macs == 0 and table["embed"].input_elements == 64  # a lookup
    assert table["mix"].weight_shape == (16, 24) and table["mix"].macs == 64 * 24 * 16


def test_space_offers_bits_and_unstructured_but_not_nm_or_channel(net):
    table, _ = discover(net, (1, 8, 8))
    config = SpaceConfig.model_validate({"default": {
        "patterns": ["unstructured", "2:4", "channel"], "sparsity": [0.0, 0.5], "bits": [4, 32]}})
    space = SearchSpace.build(config, table)
    patterns = {d.name: d.patterns for d in space.decisions}
    assert patterns["embed"] == patterns["mix"] == ("unstructured",)
    assert any("2:4 not possible for embed (Embedding weights are not stored (out, in))" in n
               for n in space.notes)
    assert any(n.startswith("channel not offered for mix") for n in space.notes)


def test_compressed_and_packed_exactly_as_counted(net, tmp_path):
    table, _ = discover(net, (1, 8, 8))
    candidate = Candidate({"embed": LayerChoice.make("unstructured", 0.5, 4),
                           "mix": LayerChoice.make("unstructured", 0.75, 8),
                           "head": LayerChoice.make("dense", 0.0, 8)})
    baked = bake(compress_model(net, candidate))
    assert layer_sparsity(baked, "embed") == 0.5 and layer_sparsity(baked, "mix") == 0.75
    info = save_packed(baked, candidate, tmp_path / "m.packed", table=table)
    zeros = model_zeros(baked, table, candidate)
    assert info.payload_bits - info.other_param_bits == sum(
        layer.total_bits for layer in model_footprint(table, candidate, zeros).layers)
    loaded = load_packed(tmp_path / "m.packed", TokenNet())
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), baked(x), rtol=1e-5, atol=1e-6)
