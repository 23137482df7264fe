"""The table's model against hand-made tables: 2-D channel interpolation with the in/out
interaction, clamping, the int8 kernel and Q/DQ boundary terms, whole-model int8, and the
refusal of an older format. No timing: every expected figure is worked out by hand."""

import json

import pytest

from autosparse.candidate import Candidate, LayerChoice
from autosparse.hardware import load_profile
from autosparse.latency_table import (TABLE, LatencyTable, LayerEntry, Point, model_digest,
                                      table_latency)
from autosparse.layers import ChannelGroup, LayerInfo, LayerTable
from autosparse.validation import ConfigError

PROFILE = load_profile("x86-server-vnni")
# a -> b -> c, three Linear layers; a's 16 outputs (group ga) feed b, b's 16 (gb) feed c
MLP = LayerTable(
    layers=(LayerInfo("a", "Linear", (16, 8), True, 128, 8, 16),
            LayerInfo("b", "Linear", (16, 16), True, 256, 16, 16),
            LayerInfo("c", "Linear", (4, 16), True, 64, 16, 4)),
    channel_groups=(ChannelGroup("ga", ("a",), (("b", 1),), 16),
                    ChannelGroup("gb", ("b",), (("c", 1),), 16)))
CHANNELS = {"a": (Point(4, -6.0), Point(8, -4.0), Point(16, 0.0)),
            "b": (Point(4, -5.0), Point(8, -3.0), Point(16, 0.0))}


def table(entries=None, **fields) -> LatencyTable:
    entries = entries or {name: LayerEntry(channels=points) for name, points in CHANNELS.items()}
    base = dict(model_digest=model_digest(MLP), layers=tuple(MLP.names), machine="cpu X",
                onnxruntime="1.0", profile=PROFILE.name, dense_us=100.0, dense_spread=0.0,
                entries=entries)
    return LatencyTable(**{**base, **fields})


def us(lt: LatencyTable, choices: dict) -> float:
    result = table_latency(lt, MLP, Candidate(choices), PROFILE)
    assert set(result.source.values()) == {TABLE}
    return result.total_ms * 1e3


def channel(sparsity: float, bits: int = 32) -> LayerChoice:
    return LayerChoice.make("channel", sparsity, bits)


INT8 = LayerChoice.make("dense", 0.0, 8)


def test_single_groups_are_their_measured_deltas_and_clamp_outside():
    lt = table()
    assert us(lt, {"a": channel(0.5)}) == pytest.approx(96.0)  # 8 of 16 kept: measured
    assert us(lt, {"a": channel(0.625)}) == pytest.approx(95.0)  # 6 kept: halfway 4..8
    assert us(lt, {"a": channel(0.9)}) == pytest.approx(94.0)  # 2 kept: clamped to 4's
    # without uniform shrinks measured there is no interaction: the deltas add
    assert us(lt, {"a": channel(0.5), "b": channel(0.5)}) == pytest.approx(93.0)


def test_uniform_shrinks_are_exact_and_fix_the_interaction_of_inputs_and_outputs():
    # both groups at 8 kept: singles -4 - 3 = -7, measured -6: b's c_in * c_out term gives 1 back
    lt = table(uniform=(Point(0.25, -8.0), Point(0.5, -6.0)), uniform_layers=("a", "b"))
    assert us(lt, {"a": channel(0.5), "b": channel(0.5)}) == pytest.approx(94.0)
    assert us(lt, {"a": channel(0.75), "b": channel(0.75)}) == pytest.approx(92.0)
    # off the grid: b keeps 6/16 of its inputs and 8/16 of its outputs, so the missing share is
    # (1 - 0.375)(1 - 0.5); gamma per unit of that share is interpolated between the grid
    # points by the layer's mean keep sqrt(0.375 * 0.5)
    w = 1.0  # the layer weights cancel: only b interacts, so gamma * w is what the grid fixes
    g_quarter, g_half = 3.0 / (0.75 * 0.75 * w), 1.0 / (0.5 * 0.5 * w)  # (measured - singles)/p
    keep = (0.375 * 0.5) ** 0.5
    gamma = g_quarter + (keep - 0.25) / 0.25 * (g_half - g_quarter)
    expected = 100.0 - 5.0 - 3.0 + gamma * w * 0.625 * 0.5
    assert us(lt, {"a": channel(0.625), "b": channel(0.5)}) == pytest.approx(expected)
    # one group alone touches no layer on both sides: its single delta, no interaction
    assert us(lt, {"b": channel(0.5)}) == pytest.approx(97.0)


def int8_entries() -> dict[str, LayerEntry]:
    # kernel = mean of alone and in context, boundaries = half their difference
    return {"a": LayerEntry(channels=CHANNELS["a"], int8=Point(0, 4.0), int8_context=Point(0, 0.0)),
            "b": LayerEntry(channels=CHANNELS["b"], int8=Point(0, 5.0), int8_context=Point(0, -1.0)),
            "c": LayerEntry(int8=Point(0, 3.0), int8_context=Point(0, 1.0))}


def test_int8_kernels_and_qdq_boundaries_per_edge():
    lt = table(int8_entries())
    assert lt.entries["b"].int8_kernel_us == 2.0 and lt.entries["b"].int8_boundary_us == 3.0
    # per edge: a's 2 on its one edge, b's 3 over two edges, c's 1 on one; an edge's cost is
    # the mean of its two ends' estimates: (a,b) 1.75, (b,c) 1.25
    assert us(lt, {"a": INT8}) == pytest.approx(100 + 2 + 1.75)
    assert us(lt, {"b": INT8}) == pytest.approx(100 + 2 + 1.75 + 1.25)
    assert us(lt, {"a": INT8, "b": INT8}) == pytest.approx(100 + 4 + 1.25)  # (a,b) is inside
    # no whole-model entry: all three int8 is the kernels alone, no edge cut
    assert us(lt, {"a": INT8, "b": INT8, "c": INT8}) == pytest.approx(106.0)
    # channels scale the kernel by k_in k_out and the edge by its group's kept share
    assert us(lt, {"a": channel(0.5, 8)}) == pytest.approx(100 - 4 + 2 * 0.5 + 1.75 * 0.5)


def test_whole_model_int8_is_its_own_entry_at_each_uniform_share():
    lt = table(int8_entries(), uniform=(Point(0.5, -6.0),), uniform_layers=("a", "b"),
               whole_int8=(Point(0.5, 1.0), Point(1.0, 7.0)))
    every = {"a": INT8, "b": INT8, "c": INT8}
    assert us(lt, every) == pytest.approx(107.0)  # not the per-layer 106
    assert us(lt, {"a": channel(0.5, 8), "b": channel(0.5, 8), "c": INT8}) == pytest.approx(101.0)
    assert us(lt, {"a": INT8, "b": INT8}) == pytest.approx(105.25)  # c fp32: per layer again


def test_json_round_trip_keeps_the_new_parts_and_an_old_format_is_refused():
    lt = table(int8_entries(), uniform=(Point(0.5, -6.0),), uniform_layers=("a", "b"),
               whole_int8=(Point(1.0, 7.0),))
    assert LatencyTable.from_json(lt.to_json()) == lt
    old = json.loads(lt.to_json())
    old["format"] = 1
    with pytest.raises(ConfigError, match=r"format 1, this autosparse reads format 2.*"
                                          r"calibrate --config"):
        LatencyTable.from_json(json.dumps(old), "runs/x/latency-table.json")
