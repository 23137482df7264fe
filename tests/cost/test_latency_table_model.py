"""The table's model against hand-made tables: 2-D channel interpolation with the in/out
interaction, measured pairs of groups, clamping, the deploy rule (a candidate with some int8
layers is its fp32 file, an all-int8 one the whole-model int8 entry), and the refusal of an
older format. Every expected figure is worked out by hand; one tiny real calibration checks
which pairs are measured, and at which level."""

import json

import pytest

from autosparse.config.hardware import load_profile
from autosparse.config.validation import ConfigError
from autosparse.cost.latency_table import FP32 as FP32_FILE
from autosparse.cost.latency_table import (
    INT8 as INT8_FILE,  # the file scored; INT8 below: a choice
)
from autosparse.cost.latency_table import (
    TABLE,
    LatencyTable,
    LayerEntry,
    Pair,
    Point,
    linked_pairs,
    model_digest,
    table_latency,
)
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.layers import ChannelGroup, LayerInfo, LayerTable

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
    with pytest.raises(ConfigError, match=r"format 1, this autosparse reads format 3.*"
                                          r"calibrate --config"):
        LatencyTable.from_json(json.dumps(old), "runs/x/latency-table.json")
    # format 2 had no measured pairs and its gamma was fitted without them: refused as well
    old["format"] = 2
    with pytest.raises(ConfigError, match=r"format 2, .*no measured pairs.*calibrate --config"):
        LatencyTable.from_json(json.dumps(old), "runs/x/latency-table.json")


# b reads ga and writes gb: the one pair of groups a layer links. Measured with both groups at
# 8 of 16 kept: -5, against singles -4 and -3, so I = -5 - (-4 - 3) = +2
PAIR = Pair("a", "b", 8, 8, -5.0)


def test_the_pairs_measured_are_the_groups_a_layer_reads_and_writes():
    assert linked_pairs(MLP) == {("a", "b"): ("b",)}


def test_pair_terms_scale_bilinearly_and_vanish_when_either_group_is_unpruned():
    lt = table(pairs=(PAIR,))
    assert us(lt, {"a": channel(0.5), "b": channel(0.5)}) == pytest.approx(100 - 4 - 3 + 2)
    # a keeps 4 (d_a = 0.75), b 8 (0.5): I * (0.75 * 0.5) / (0.5 * 0.5) = 3
    assert us(lt, {"a": channel(0.75), "b": channel(0.5)}) == pytest.approx(100 - 6 - 3 + 3)
    # a keeps 12 (single interpolated: -2), b 4 (-5): I * (0.25 * 0.75) / 0.25 = 1.5
    assert us(lt, {"a": channel(0.25), "b": channel(0.75)}) == pytest.approx(100 - 2 - 5 + 1.5)
    # one group unpruned: (1 - k) = 0 on its side, so the single delta alone
    assert us(lt, {"a": channel(0.5)}) == pytest.approx(96.0)
    assert us(lt, {"b": channel(0.75)}) == pytest.approx(95.0)
    # narrower than any width measured (a keeps 2 < 4): clamped like the single delta
    assert us(lt, {"a": channel(0.875), "b": channel(0.5)}) == pytest.approx(100 - 6 - 3 + 3)
    # the pair term is the linking layer's: b carries it, a and c do not
    with_pair = table_latency(lt, MLP, Candidate({"a": channel(0.5), "b": channel(0.5)}), PROFILE)
    without = table_latency(table(), MLP, Candidate({"a": channel(0.5), "b": channel(0.5)}),
                            PROFILE)
    assert {n: round(with_pair.layer_us[n] - without.layer_us[n], 9) for n in MLP.names} == \
        {"a": 0.0, "b": 2.0, "c": 0.0}


def test_with_pairs_the_uniform_shrinks_stay_exact_and_gamma_fits_what_they_leave():
    uniform = dict(uniform=(Point(0.25, -8.0), Point(0.5, -6.0)), uniform_layers=("a", "b"))
    lt = table(pairs=(PAIR,), **uniform)
    assert us(lt, {"a": channel(0.5), "b": channel(0.5)}) == pytest.approx(94.0)
    assert us(lt, {"a": channel(0.75), "b": channel(0.75)}) == pytest.approx(92.0)
    # off the grid: pair term I (0.625 * 0.5) / 0.25 = 2.5, then gamma per unit of b's
    # (1 - k_in)(1 - k_out) from what the grid leaves after singles and pair terms:
    # 25 % kept: -8 - (-6 - 5) - 2 * 0.5625 / 0.25 = -1.5 over 0.5625; 50 %: -6 + 7 - 2 = -1 over
    # 0.25 (b's weight w cancels, as in the test without pairs)
    g_quarter, g_half = -1.5 / 0.5625, -1.0 / 0.25
    keep = (0.375 * 0.5) ** 0.5
    gamma = g_quarter + (keep - 0.25) / 0.25 * (g_half - g_quarter)
    expected = 100.0 - 5.0 - 3.0 + 2.5 + gamma * 0.625 * 0.5
    assert us(lt, {"a": channel(0.625), "b": channel(0.5)}) == pytest.approx(expected)
    # a pair entry no layer of this model links (b, c: c writes no group) is not read
    stray = table(pairs=(PAIR, Pair("b", "c", 8, 2, -50.0)), **uniform)
    assert us(stray, {"a": channel(0.625), "b": channel(0.5)}) == pytest.approx(expected)


def test_pairs_survive_the_json_round_trip():
    lt = table(pairs=(PAIR,), uniform=(Point(0.5, -6.0),), uniform_layers=("a", "b"))
    assert LatencyTable.from_json(lt.to_json()) == lt
    assert json.loads(lt.to_json())["pairs"] == [["a", "b", 8, 8, -5.0, 0.0]]


def test_calibration_measures_each_linked_pair_at_a_level_its_singles_were_measured_at(tmp_path):
    """A real (tiny, untimed-quality) table of DigitsCNN: conv2 reads conv1's group and writes
    its own, and so on down the chain; each such pair is one more model, shrunk at the level
    of ``levels`` nearest PAIR_KEEP, and scored through its measured interaction."""
    from autosparse.cost.calibration.model_table import TableModel, build_latency_table
    from autosparse.space.discovery import discover
    from autosparse.workload.models import DigitsCNN

    model = DigitsCNN(1, 8, 8, 10).eval()
    layers, graph = discover(model, (1, 8, 8))
    allowed = {name: (("dense", "channel"), (0.5,), (32,)) for name in layers.names}
    target = TableModel(model, layers, graph, (1, 8, 8), allowed, "digits-cnn-pairs")
    lt = build_latency_table(target, PROFILE, rounds=2, calls=3, warmup=1, levels=(0.5,),
                             int8=False, patterns=False, workdir=tmp_path, printer=lambda _: None)
    linked = linked_pairs(layers)
    assert {(p.a, p.b) for p in lt.pairs} == set(linked) == {
        ("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "fc1")}
    groups = {g.producers[0]: g for g in layers.channel_groups}
    for pair in lt.pairs:  # both at the 50 % level, as the singles
        assert (pair.kept_a, pair.kept_b) == (groups[pair.a].channels // 2,
                                              groups[pair.b].channels // 2)
        assert pair.kept_a in [p.x for p in lt.entries[pair.a].channels]
    # 3 dense copies + 4 singles + 1 uniform shrink + 3 pairs
    assert lt.settings["variants"] == 11
    candidate = Candidate({"conv1": channel(0.5), "conv2": channel(0.5)})
    result = table_latency(lt, layers, candidate, PROFILE)
    alone = table_latency(lt, layers, Candidate({"conv1": channel(0.5)}), PROFILE)
    assert result.total_ms > 0 and alone.total_ms > 0
