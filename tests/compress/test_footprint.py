"""Size, MACs and BOPs against hand-computed cases (see the README's size formula)."""

import pytest

from autosparse.compress.footprint import (
    footprint_metrics,
    layer_footprint,
    model_footprint,
)
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.layers import LayerInfo, LayerTable

FC = LayerInfo("fc", "Linear", (10, 64), True, macs=640)


@pytest.mark.parametrize(
    "choice, bits, macs",
    [
        # values + index + scales + bias
        (LayerChoice.make("dense", 0, 32), 640 * 32 + 0 + 0 + 320, 640),
        (LayerChoice.make("dense", 0, 8), 640 * 8 + 0 + 320 + 320, 640),
        # 160 kept; CSR = 160*6 + 10*7 = 1030 > bitmask 640 -> bitmask
        (LayerChoice.make("unstructured", 0.75, 8), 160 * 8 + 640 + 320 + 320, 160),
        # 2:4 keeps 320, 2 bits of position each
        (LayerChoice.make("2:4", 0, 4), 320 * 4 + 640 + 320 + 320, 320),
        # 5 of 10 rows kept, a 10-bit channel mask, scales and bias for kept rows only
        (LayerChoice.make("channel", 0.5, 8), 320 * 8 + 10 + 160 + 160, 320),
    ],
)
def test_layer_size_hand_computed(choice, bits, macs):
    fp = layer_footprint(FC, choice)
    assert fp.total_bits == bits
    assert fp.macs == macs
    assert fp.bops == macs * choice.bits * 32


def test_csr_index_wins_when_very_sparse():
    fp = layer_footprint(FC, LayerChoice.make("unstructured", 0.95, 8))
    kept = 640 - 608
    assert fp.kept_weights == kept
    assert fp.index_bits == kept * 6 + 10 * 7 < 640


def test_model_totals_include_other_params():
    table = LayerTable((FC,), other_params=100)
    dense = model_footprint(table, Candidate({}))
    assert dense.total_bits == 640 * 32 + 320 + 100 * 32
    assert dense.size_kb == pytest.approx(dense.total_bits / 8000)
    metrics = footprint_metrics(table, Candidate({"fc": LayerChoice.make("2:4", 0, 4)}))
    assert metrics["compression"] == pytest.approx(dense.total_bits / (2560 + 3200))
    assert metrics["weight_sparsity"] == pytest.approx(0.5)


def test_fewer_bits_or_more_sparsity_never_grow_size(small_table):
    layer = small_table["conv2"]
    for pattern in ("unstructured", "channel", "dense"):
        sizes = [layer_footprint(layer, LayerChoice.make(pattern, 0.5, b)).total_bits
                 for b in (2, 4, 8, 16, 32)]
        assert sizes == sorted(sizes)
    sizes = [layer_footprint(layer, LayerChoice.make("unstructured", s, 8)).total_bits
             for s in (0.0, 0.25, 0.5, 0.75, 0.9)]
    assert sizes == sorted(sizes, reverse=True)
