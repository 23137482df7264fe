"""The table's model against hand-made tables: 2-D channel interpolation with the in/out
interaction, clamping, the deploy rule (a candidate with some int8 layers is its fp32 file, an
all-int8 one the whole-model int8 entry), and the refusal of an older format. No timing: every
expected figure is worked out by hand."""

import json

import pytest

from autosparse.candidate import Candidate, LayerChoice
from autosparse.hardware import load_profile
from autosparse.latency_table import FP32 as FP32_FILE
from autosparse.latency_table import INT8 as INT8_FILE  # the file scored; INT8 below: a choice
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


def us(lt: LatencyTable, choices: dict, scored: str | None = None) -> float:
    result = table_latency(lt, MLP, Candidate(choices), PROFILE)
    assert set(result.source.values()) == {TABLE}
    assert scored is None or result.format == scored
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


UNIFORM = dict(uniform=(Point(0.25, -8.0), Point(0.5, -6.0)), uniform_layers=("a", "b"),
               whole_int8=(Point(0.5, 1.0), Point(1.0, 7.0)))


def test_a_candidate_with_some_int8_layers_is_exactly_its_fp32_file():
    lt = table(**UNIFORM)
    for choices in ({"a": channel(0.5, 8), "b": channel(0.5)},
                    {"a": channel(0.625, 8), "b": channel(0.5, 4),
                     "c": LayerChoice.make("dense", 0.0, 16)},  # c not <= 8 bits: fp32 file
                    {"a": channel(0.75), "b": channel(0.25, 8)}):
        fp32 = {name: channel(c.sparsity) for name, c in choices.items() if c.pattern == "channel"}
        assert us(lt, choices, FP32_FILE) == pytest.approx(us(lt, fp32, FP32_FILE),
                                                           abs=1e-12), choices
    # the interaction fitted on the shrinks applies as for fp32: 94 at both groups 8 kept
    assert us(lt, {"a": channel(0.5, 8), "b": channel(0.5)}) == pytest.approx(94.0)
    # no channel change: the dense fp32 file, whatever the bits of a and b
    assert us(lt, {"a": INT8, "b": INT8}, FP32_FILE) == pytest.approx(100.0)


def test_whole_model_int8_is_its_own_entry_at_each_uniform_share():
    lt = table(uniform=(Point(0.5, -6.0),), uniform_layers=("a", "b"),
               whole_int8=(Point(0.5, 1.0), Point(1.0, 7.0)))
    every = {"a": INT8, "b": INT8, "c": INT8}
    assert us(lt, every, INT8_FILE) == pytest.approx(107.0)  # dense + the full-width entry
    assert us(lt, {"a": channel(0.5, 8), "b": channel(0.5, 8), "c": INT8},
              INT8_FILE) == pytest.approx(101.0)  # the 50 % shrink's whole-int8 entry
    # 4 bits run on onnxruntime's int8 kernels too: the same file
    assert us(lt, {"a": LayerChoice.make("dense", 0.0, 4), "b": INT8, "c": INT8}) == \
        pytest.approx(107.0)
    # one layer at 16 bits: export ships the fp32 file, so no int8 entry at all
    assert us(lt, {"a": INT8, "b": INT8, "c": LayerChoice.make("dense", 0.0, 16)},
              FP32_FILE) == pytest.approx(100.0)


def test_whole_int8_is_spread_over_the_layers_by_kernel_work():
    lt = table(whole_int8=(Point(1.0, 7.0),))
    every = Candidate({"a": INT8, "b": INT8, "c": INT8})
    dense = table_latency(lt, MLP, Candidate({}), PROFILE)
    result = table_latency(lt, MLP, every, PROFILE)
    extra = {n: result.layer_us[n] - dense.layer_us[n] for n in MLP.names}
    assert sum(extra.values()) == pytest.approx(7.0)
    assert all(v > 0 for v in extra.values())


def test_json_round_trip_keeps_the_new_parts_and_an_old_format_is_refused():
    lt = table(uniform=(Point(0.5, -6.0),), uniform_layers=("a", "b"),
               whole_int8=(Point(1.0, 7.0),))
    assert LatencyTable.from_json(lt.to_json()) == lt
    # a format-2 file written before the deploy rule also holds per-layer int8 points: they are
    # skipped (nothing deploys that file), the rest reads and scores the same
    earlier = json.loads(lt.to_json())
    earlier["all_int8_us"] = 104.0
    earlier["entries"]["a"].update(int8=[0, 4.0, 0.0], int8_context=[0, 0.0, 0.0])
    assert LatencyTable.from_json(json.dumps(earlier)) == lt
    old = json.loads(lt.to_json())
    old["format"] = 1
    with pytest.raises(ConfigError, match=r"format 1, this autosparse reads format 2.*"
                                          r"calibrate --config"):
        LatencyTable.from_json(json.dumps(old), "runs/x/latency-table.json")
