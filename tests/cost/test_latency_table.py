"""The measured latency table: lookup, interpolation, fallback, refusal, the deploy rule (the
file export ships is the one scored), and one real measurement."""

import math
from pathlib import Path

import pytest

from autosparse.config.hardware import load_profile
from autosparse.config.validation import ConfigError
from autosparse.cost.calibration.machine import fingerprint, this_machine
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.latency_table import (
    ANALYTIC,
    FP32,
    INT8,
    TABLE,
    LatencyTable,
    LayerEntry,
    Point,
    analytic_delta_us,
    find_latency_table,
    interpolate,
    model_digest,
    ships_int8,
    table_latency,
)
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.layers import LayerInfo, LayerTable

PROFILE = load_profile("x86-server-vnni")
LAYERS = LayerTable((
    LayerInfo("a", "Linear", (8, 16), True, 128, 16, 8),
    LayerInfo("b", "Linear", (4, 8), True, 32, 8, 4),
))


def hand_table(**overrides) -> LatencyTable:
    entries = {"a": LayerEntry(channels=(Point(2, -6.0), Point(4, -4.0), Point(8, 0.0))),
               "b": LayerEntry(patterns={"unstructured": (Point(0.9, 0.5),)})}
    fields = dict(model_digest=model_digest(LAYERS), layers=tuple(LAYERS.names), machine="cpu X",
                  onnxruntime="1.0", profile=PROFILE.name, dense_us=100.0, dense_spread=0.01,
                  entries=entries)
    return LatencyTable(**{**fields, **overrides})


def channel(sparsity, bits=32):
    return LayerChoice.make("channel", sparsity, bits)


def test_dense_candidate_is_the_measured_dense_total():
    result = table_latency(hand_table(), LAYERS, Candidate({}), PROFILE)
    assert result.total_ms == pytest.approx(0.1)
    assert set(result.source.values()) == {TABLE}
    assert sum(result.layer_us.values()) < 100.0  # the rest is the model's fixed share


def test_exact_at_measured_channel_counts():
    lt = hand_table()
    for sparsity, kept_delta in ((0.5, -4.0), (0.75, -6.0)):  # 4 and 2 of 8 channels kept
        result = table_latency(lt, LAYERS, Candidate({"a": channel(sparsity)}), PROFILE)
        assert result.total_ms * 1e3 == pytest.approx(100.0 + kept_delta)
        assert result.source["a"] == TABLE


def test_linear_between_measured_counts_and_clamped_outside():
    points = (Point(2, -6.0), Point(4, -4.0), Point(8, 0.0))
    assert interpolate(points, 3) == pytest.approx(-5.0)
    assert interpolate(points, 6) == pytest.approx(-2.0)
    assert interpolate(points, 1) == -6.0 and interpolate(points, 12) == 0.0
    # 3 of 8 kept (sparsity 0.625 -> 5 pruned) lies halfway between the measured 2 and 4
    result = table_latency(hand_table(), LAYERS, Candidate({"a": channel(0.625)}), PROFILE)
    assert result.total_ms * 1e3 == pytest.approx(95.0)


def test_some_int8_layers_ship_as_fp32_and_are_scored_as_the_fp32_file():
    lt = hand_table()
    for bits in (8, 4, 16):  # b stays fp32: export ships model.onnx, low bits only in .packed
        mixed = table_latency(lt, LAYERS, Candidate({"a": channel(0.5, bits)}), PROFILE)
        fp32 = table_latency(lt, LAYERS, Candidate({"a": channel(0.5)}), PROFILE)
        assert mixed == fp32 and mixed.format == FP32
        assert mixed.total_ms * 1e3 == pytest.approx(96.0) and set(mixed.source.values()) == {TABLE}
    only_bits = table_latency(lt, LAYERS, Candidate({"a": LayerChoice.make("dense", 0, 8)}),
                              PROFILE)
    assert only_bits.total_ms * 1e3 == pytest.approx(100.0)  # the dense fp32 file


def test_the_scored_file_follows_exports_deploy_rule():
    from autosparse.cost.measured_latency import deployable_format

    int8, fp32 = LayerChoice.make("dense", 0, 8), LayerChoice.make("dense", 0, 32)
    for choices in ({}, {"a": int8}, {"a": int8, "b": LayerChoice.make("2:4", 0.5, 4)},
                    {"a": channel(0.5, 8), "b": LayerChoice.make("dense", 0, 16)},
                    {"a": int8, "b": fp32}):
        candidate = Candidate(choices)
        assert (INT8 if ships_int8(LAYERS, candidate) else FP32) == \
            deployable_format(candidate, LAYERS), choices


def test_missing_entry_falls_back_to_the_analytic_delta_at_fp32():
    lt = hand_table()
    candidate = Candidate({"b": channel(0.5, 8)})  # b: no channel entry, a fp32: ships fp32
    result = table_latency(lt, LAYERS, candidate, PROFILE)
    assert result.source == {"a": TABLE, "b": ANALYTIC}
    expected = analytic_delta_us(LAYERS, Candidate({"b": channel(0.5)}), "b", PROFILE)
    int8_delta = analytic_delta_us(LAYERS, candidate, "b", PROFILE)
    assert expected != 0 and abs(int8_delta - expected) > 1.0  # the profile's int8 is not used
    assert result.total_ms * 1e3 == pytest.approx(100.0 + expected, abs=1e-9)
    assert result.counts() == {TABLE: 1, ANALYTIC: 1}


def test_all_int8_without_a_whole_model_entry_is_the_profiles_delta_per_layer():
    lt = hand_table()  # no whole_int8 points measured (the space did not allow it)
    int8 = LayerChoice.make("dense", 0, 8)
    candidate = Candidate({"a": int8, "b": int8})
    result = table_latency(lt, LAYERS, candidate, PROFILE)
    assert result.format == INT8 and result.counts() == {TABLE: 0, ANALYTIC: 2}
    expected = sum(analytic_delta_us(LAYERS, candidate, n, PROFILE) for n in ("a", "b"))
    assert expected > 1.0
    assert result.total_ms * 1e3 == pytest.approx(100.0 + expected)


def test_pattern_entries_interpolate_from_zero():
    lt = hand_table()
    half = Candidate({"b": LayerChoice.make("unstructured", 0.45, 32)})
    assert table_latency(lt, LAYERS, half, PROFILE).total_ms * 1e3 == pytest.approx(100.25)


def test_another_model_is_refused_with_a_clear_error():
    other = LayerTable((LayerInfo("a", "Linear", (8, 32), True, 256, 32, 8),
                        LayerInfo("b", "Linear", (4, 8), True, 32, 8, 4)))
    with pytest.raises(ConfigError, match="measured on another model.*different kinds or weight"):
        table_latency(hand_table(), other, Candidate({}), PROFILE)
    renamed = LayerTable((LAYERS.layers[0],))
    with pytest.raises(ConfigError, match=r"only in the table: \['b'\]"):
        hand_table().check_model(renamed)


def test_json_round_trip_and_loading_rules(tmp_path: Path):
    here = this_machine()["cpu"]
    lt = hand_table(machine=here)
    again = LatencyTable.from_json(lt.to_json())
    assert again == lt
    assert find_latency_table(tmp_path, LAYERS, PROFILE, here) == (None, None)
    lt.save(tmp_path / "latency-table.json")
    found, note = find_latency_table(tmp_path, LAYERS, PROFILE, here)
    assert found == lt and "measured table" in note
    other, note = find_latency_table(tmp_path, LAYERS, load_profile("edge-arm-a76"), here)
    assert other is None and "built beside profile 'x86-server-vnni'" in note
    elsewhere, note = find_latency_table(tmp_path, LAYERS, PROFILE, machine="another CPU")
    assert elsewhere is None and "this machine is 'another CPU'" in note


def test_table_machine_is_the_fingerprint_cpu_from_a_cpuinfo_file(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Fancy CPU @ 3 GHz\nflags\t: avx2\n")
    assert fingerprint(info)["cpu"] == "Fancy CPU @ 3 GHz"


def test_objective_metrics_take_latency_from_the_table():
    from autosparse.search.objective import cost_metrics

    candidate = Candidate({"a": channel(0.5), "b": channel(0.5, 8)})
    metrics = cost_metrics(LAYERS, candidate, PROFILE, latency_table=hand_table())
    analytic = estimate_cost(LAYERS, candidate, PROFILE)
    assert metrics["latency_ms"] != pytest.approx(analytic.latency_ms)
    assert metrics["latency_ms"] == table_latency(hand_table(), LAYERS, candidate,
                                                  PROFILE).total_ms
    assert metrics["latency_source.table"] == 1 and metrics["latency_source.analytic"] == 1
    assert metrics["energy_uj"] == pytest.approx(analytic.energy_uj)


def test_profile_report_names_the_scored_file_and_each_layers_source():
    from autosparse.cost.report import format_cost_report

    lt = hand_table()
    mixed = format_cost_report(LAYERS, Candidate({"a": channel(0.5, 8), "b": channel(0.5)}),
                               PROFILE, lt)
    assert "measured table for 1 layers, analytic x86-server-vnni for 1" in mixed
    assert "the latency of model.onnx (fp32" in mixed
    int8 = LayerChoice.make("dense", 0, 8)
    assert "the latency of model.int8.onnx" in format_cost_report(
        LAYERS, Candidate({"a": int8, "b": int8}), PROFILE, lt)


def test_real_measurement_on_digits_cnn(tmp_path: Path):
    """One small real table of DigitsCNN (untrained weights: timing does not need training)."""
    from autosparse.config.space_rules import SpaceConfig
    from autosparse.cost.calibration.model_table import TableModel, build_latency_table
    from autosparse.space.discovery import discover
    from autosparse.space.search_space import SearchSpace
    from autosparse.workload.models import DigitsCNN

    model = DigitsCNN(1, 8, 8, 10).eval()
    table, graph = discover(model, (1, 8, 8))
    space = SearchSpace.build(SpaceConfig.model_validate(
        {"default": {"sparsity": [0.0, 0.5], "patterns": ["channel", "2:4"], "bits": [8, 32]}}),
        table)
    allowed = {name: (d.patterns, d.sparsities, d.bits)
               for d in space.decisions for name in d.layers}
    target = TableModel(model, table, graph, (1, 8, 8), allowed, "digits-cnn-test")
    lt = build_latency_table(target, PROFILE, rounds=2, calls=3, warmup=1, levels=(0.5,),
                             workdir=tmp_path, printer=lambda _: None)
    assert lt.dense_us > 0 and math.isfinite(lt.dense_us)
    lt.check_model(table)
    leaders = [g.producers[0] for g in table.channel_groups if g.blocked is None]
    for name in leaders:
        assert len(lt.entries[name].channels) == 2  # half the channels, and the full width
    # every layer may take 8 bits: the whole model in int8 at full width and at the shrink
    assert [p.x for p in lt.whole_int8] == [0.5, 1.0]
    assert all(math.isfinite(p.delta_us) for p in lt.whole_int8)
    assert any(e.patterns for e in lt.entries.values())
    result = table_latency(lt, table, Candidate({leaders[0]: channel(0.5, 8)}), PROFILE)
    assert math.isfinite(result.total_ms) and result.source[leaders[0]] == TABLE
    assert result == table_latency(lt, table, Candidate({leaders[0]: channel(0.5)}), PROFILE)
    every = Candidate({name: LayerChoice.make("dense", 0, 8) for name in table.names})
    int8 = table_latency(lt, table, every, PROFILE)
    assert int8.format == INT8
    assert int8.total_ms * 1e3 == pytest.approx(lt.dense_us + lt.whole_int8[-1].delta_us)
    # a real table holds the ops between layers (the pool): dense is the measured dense total
    assert table.ops
    assert table_latency(lt, table, Candidate({}), PROFILE).total_ms == \
        pytest.approx(lt.dense_us / 1e3)


def test_whole_model_int8_is_measured_only_where_every_layer_may_take_8_bits():
    """A layer outside the space, or one the space keeps above 8 bits, stays fp32: no candidate
    can then ship as model.int8.onnx, so calibrate does not time that file."""
    from autosparse.cost.calibration.model_table import TableModel, int8_everywhere

    both = (("dense",), (0.0,), (8, 32))
    model = lambda allowed: TableModel(None, LAYERS, None, (1, 8), allowed, "t")  # noqa: E731
    assert int8_everywhere(model({"a": both, "b": both}))
    assert not int8_everywhere(model({"a": both}))  # b is not searched
    assert not int8_everywhere(model({"a": both, "b": (("dense",), (0.0,), (16, 32))}))
