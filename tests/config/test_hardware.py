"""Hardware profiles: the built-ins load and are physically sane, bad profiles say what is wrong."""

import copy
import math

import pytest
import yaml

from autosparse.config.hardware import (
    HardwareProfile,
    builtin_profiles,
    horowitz_mac_pj,
    load_profile,
    parse_profile,
)
from autosparse.config.validation import ConfigError

SHIPPED = ["x86-server-vnni", "edge-arm-a76", "gpu-h100", "mcu-cortex-m7", "accel-bitfusion"]

MINIMAL = {
    "name": "mini",
    "sources": ["made up for a test"],
    "precisions": [
        {"bits": 32, "kind": "float", "macs_per_second": 1e9},
        {"bits": 8, "kind": "int", "macs_per_second": 4e9},
    ],
    "memory": [
        {"name": "sram", "capacity_bytes": 1024, "bandwidth_bytes_per_second": 1e10,
         "energy_pj_per_byte": 1.0},
        {"name": "dram", "capacity_bytes": None, "bandwidth_bytes_per_second": 1e9,
         "energy_pj_per_byte": 100.0},
    ],
}


def _profile(**changes) -> HardwareProfile:
    return parse_profile({**copy.deepcopy(MINIMAL), **changes})


# --- the built-in profiles ------------------------------------------------------------------------

def test_at_least_the_five_shipped_profiles_exist():
    names = builtin_profiles()
    assert len(names) >= 5
    assert set(SHIPPED) <= set(names)


@pytest.mark.parametrize("name", builtin_profiles())
def test_builtin_profile_loads_and_names_its_sources(name):
    profile = load_profile(name)
    assert profile.name == name  # the name is the file stem
    assert len(profile.sources) >= 1 and all(s.strip() for s in profile.sources)
    assert profile.description
    assert not profile.measured


@pytest.mark.parametrize("name", builtin_profiles())
def test_builtin_memory_hierarchy_is_physical(name):
    """Outwards, levels get bigger, slower and costlier per byte; only the last is unbounded."""
    levels = load_profile(name).memory
    capacities = [level.capacity_bytes for level in levels[:-1]]
    assert all(c is not None for c in capacities)
    assert capacities == sorted(capacities)
    bandwidths = [level.bandwidth_bytes_per_second for level in levels]
    assert bandwidths == sorted(bandwidths, reverse=True)
    energies = [level.energy_pj_per_byte for level in levels]
    assert energies == sorted(energies) and energies[0] > 0


@pytest.mark.parametrize("name", builtin_profiles())
def test_builtin_precisions_are_physical(name):
    """Narrower integers are never slower nor costlier per MAC than wider ones on one device,
    and every MAC costs between 0.001 and 10 pJ (Horowitz 45 nm fp32 is 4.6 pJ)."""
    profile = load_profile(name)
    ints = sorted((p for p in profile.precisions if p.kind == "int"), key=lambda p: p.bits)
    for narrow, wide in zip(ints, ints[1:]):
        assert narrow.macs_per_second >= wide.macs_per_second
        assert profile.mac_energy_pj(narrow) < profile.mac_energy_pj(wide)
    for precision in profile.precisions:
        assert 1e-3 < profile.mac_energy_pj(precision) < 10
        assert precision.layer_overhead_us < 100
    assert 0 < profile.technology_scale <= 1.0


def test_shipped_profiles_encode_their_defining_facts():
    x86 = load_profile("x86-server-vnni")
    peak = {p.label: p.macs_per_second for p in x86.precisions}
    assert peak["int8"] == pytest.approx(4 * peak["fp32"])  # vpdpbusd vs FMA
    assert x86.sparsity == []  # dense oneDNN kernels: neither unstructured nor 2:4

    a76 = load_profile("edge-arm-a76")
    unstructured = a76.acceleration("unstructured")
    assert unstructured is not None and unstructured.precisions == [32]
    assert unstructured.min_sparsity == pytest.approx(2 / 3, abs=0.01)  # XNNPACK's 2/3 rule
    assert a76.acceleration("2:4") is None
    assert {p.label for p in a76.precisions} == {"fp32", "fp16", "int8"}

    h100 = load_profile("gpu-h100")
    nm = h100.acceleration("2:4")
    assert nm is not None and sorted(nm.precisions) == [8, 16]
    assert 1.2 <= 1 / nm.compute_fraction(0.5) <= 2.0  # < 2x ideal, ~1.2-1.5x real
    assert h100.acceleration("unstructured") is None
    assert h100.memory[-1].bandwidth_bytes_per_second == pytest.approx(3.35e12)

    mcu = load_profile("mcu-cortex-m7")
    assert mcu.weights_level == "flash" and mcu.sparsity == []

    bitfusion = load_profile("accel-bitfusion")
    assert all(p.kind == "int" for p in bitfusion.precisions)
    by_bits = {p.bits: p for p in bitfusion.precisions}
    assert sorted(by_bits) == [2, 4, 8, 16]
    for bits, precision in by_bits.items():
        assert precision.macs_per_second == pytest.approx(by_bits[8].macs_per_second * (8 / bits) ** 2)
        assert precision.act_bits == bits
    assert bitfusion.technology_scale == 1.0  # 45 nm: the Horowitz node


def test_profile_round_trips_through_yaml():
    for name in builtin_profiles():
        profile = load_profile(name)
        again = parse_profile(yaml.safe_load(profile.to_yaml()))
        assert again == profile
    # defaults survive too, including an unbounded max_speedup
    profile = _profile(sparsity=[{"pattern": "2:4"}])
    again = parse_profile(yaml.safe_load(profile.to_yaml()))
    assert again == profile and math.isinf(again.sparsity[0].max_speedup)


def test_user_profile_loads_from_a_path(tmp_path):
    path = tmp_path / "my-board.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "name": "my-board"}))
    profile = load_profile(path)
    assert profile.name == "my-board" and profile.memory[0].capacity_bytes == 1024
    assert load_profile(str(path)) == profile


def test_missing_file_or_unknown_name_lists_the_builtins(tmp_path):
    for target in ["tpu-v9", str(tmp_path / "nope.yaml")]:
        with pytest.raises(ConfigError) as info:
            load_profile(target)
        message = str(info.value)
        assert "neither a built-in profile" in message
        for name in SHIPPED:
            assert name in message


def test_invalid_yaml_file_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(path)


def _memory(last_capacity=None, bandwidth=1e9):
    return [
        {"name": "sram", "capacity_bytes": 1024, "bandwidth_bytes_per_second": 1e10,
         "energy_pj_per_byte": 1.0},
        {"name": "dram", "capacity_bytes": last_capacity, "bandwidth_bytes_per_second": bandwidth,
         "energy_pj_per_byte": 100.0},
    ]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"clock_ghz": 3.0}, ["clock_ghz", "unknown field"]),
        ({"memory": _memory(bandwidth=-1.0)}, ["memory[1].bandwidth_bytes_per_second", "greater than 0", "-1"]),
        ({"sparsity": [{"pattern": "channel"}]}, ["sparsity[0].pattern", "'channel' not allowed", "unstructured", "'2:4'"]),
        ({"sparsity": [{"pattern": "2:4", "precisions": [4, 8]}]}, ["'2:4'", "[4]", "listed: [8, 32]"]),
        ({"memory": _memory(last_capacity=1e9)}, ["last memory level must be unbounded", "capacity_bytes: null"]),
        ({"weights_level": "flash"}, ["weights_level 'flash'", "not a memory level", "sram, dram"]),
        ({"precisions": MINIMAL["precisions"] + [{"bits": 8, "kind": "int", "macs_per_second": 1e9}]},
         ["same kind and bits twice", "('int', 8)"]),
        ({"kind_efficiency": {"Conv3d": 0.5}}, ["kind_efficiency", "Conv3d", "allowed: Conv1d, Conv2d, DepthwiseConv2d, Linear"]),
        ({"kind_efficiency": {"Linear": 1.5}}, ["kind_efficiency", "(0, 1]"]),
        ({"precisions": [{"bits": 8, "kind": "posit", "macs_per_second": 1e9}]}, ["precisions[0].kind", "'int' or 'float'", "posit"]),
        ({"sparsity": [{"pattern": "2:4"}, {"pattern": "2:4"}]}, ["pattern twice"]),
        ({"sparsity": [{"pattern": "unstructured", "kinds": ["Conv3d"]}]}, ["sparsity[0].kinds", "Conv3d", "allowed: Conv1d, Conv2d, DepthwiseConv2d, Linear"]),
        ({"sparsity": [{"pattern": "unstructured", "max_kernel_elements": 0}]}, ["sparsity[0].max_kernel_elements", "greater than or equal to 1"]),
        ({"sources": []}, ["sources", "at least 1"]),
    ],
)
def test_bad_profile_names_field_and_allowed_values(changes, expected):
    with pytest.raises(ConfigError) as info:
        _profile(**changes)
    message = str(info.value)
    for piece in expected:
        assert piece in message, message


@pytest.mark.parametrize("data", [["a", "list"], "text", None, 3])
def test_non_mapping_top_level_is_rejected(data):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_profile(data, "x.yaml")


# --- what the cost model asks ---------------------------------------------------------------------

def test_precision_for_picks_the_narrowest_fitting_integer():
    x86 = load_profile("x86-server-vnni")
    precision, native = x86.precision_for(4)
    assert (precision.label, native) == ("int8", True)  # int4 runs on int8: saves memory only
    precision, native = x86.precision_for(8)
    assert (precision.label, native) == ("int8", True)
    precision, native = x86.precision_for(12)
    assert (precision.label, native) == ("int16", True)
    bitfusion = load_profile("accel-bitfusion")
    assert bitfusion.precision_for(3)[0].label == "int4"
    assert bitfusion.precision_for(2)[0].label == "int2"


def test_precision_for_float_weights_takes_the_widest_float():
    a76 = load_profile("edge-arm-a76")  # fp32 and fp16: never narrow a float model
    precision, native = a76.precision_for(32)
    assert (precision.label, native) == ("fp32", True)


def test_precision_for_marks_not_native_when_nothing_fits():
    bitfusion = load_profile("accel-bitfusion")  # no float at all
    precision, native = bitfusion.precision_for(32)
    assert (precision.label, native) == ("int16", False)
    int8_only = _profile(precisions=[{"bits": 8, "kind": "int", "macs_per_second": 1e9}])
    precision, native = int8_only.precision_for(16)
    assert (precision.label, native) == ("int8", False)


def test_horowitz_table_matches_design_md():
    # ../shared/DESIGN.md: int8 mult 0.2 + add 0.03; fp32 mult 3.7 + add 0.9; fp16 1.1 + 0.4
    assert horowitz_mac_pj(8, "int") == pytest.approx(0.23)
    assert horowitz_mac_pj(32, "float") == pytest.approx(4.6)
    assert horowitz_mac_pj(16, "float") == pytest.approx(1.5)
    # int32: Horowitz 3.1 + 0.1 pJ; the bits^2 extrapolation lands within 5 %
    assert horowitz_mac_pj(32, "int") == pytest.approx(3.2, rel=0.05)
    ints = [horowitz_mac_pj(bits, "int") for bits in range(1, 33)]
    assert all(a < b for a, b in zip(ints, ints[1:]))
    assert horowitz_mac_pj(16, "float") < horowitz_mac_pj(24, "float") < horowitz_mac_pj(32, "float")


def test_mac_energy_uses_technology_scale_unless_given():
    profile = _profile(technology_scale=0.25)
    fp32, int8 = profile.precisions
    assert profile.mac_energy_pj(fp32) == pytest.approx(4.6 * 0.25)
    assert profile.mac_energy_pj(int8) == pytest.approx(0.23 * 0.25)
    given = _profile(precisions=[{"bits": 8, "kind": "int", "macs_per_second": 1e9,
                                  "energy_pj_per_mac": 0.5}], technology_scale=0.25)
    assert given.mac_energy_pj(given.precisions[0]) == 0.5


def test_level_holding_picks_the_closest_level_that_fits():
    profile = _profile()
    assert profile.level_holding(1024).name == "sram"
    assert profile.level_holding(1025).name == "dram"
    assert profile.level_holding(1e15).name == "dram"
