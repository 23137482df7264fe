"""The hardware cost model: hand-checked numbers, physics properties on every built-in profile,
and the headline claims each profile exists to make."""

import copy
import random

import pytest

from autosparse.config.hardware import builtin_profiles, load_profile, parse_profile
from autosparse.cost.estimate import cost_metrics, estimate_cost
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.layers import LayerInfo, LayerTable

US = 1e-6
PJ = 1e-12

# --- (a) a two-layer table on a round-number profile, every figure worked out by hand ------------

HAND = {
    "name": "hand",
    "sources": ["round numbers for a hand-checked test"],
    "precisions": [
        {"bits": 32, "kind": "float", "macs_per_second": 1e9, "energy_pj_per_mac": 4.0,
         "layer_overhead_us": 1.0},
        {"bits": 8, "kind": "int", "macs_per_second": 4e9, "energy_pj_per_mac": 1.0,
         "layer_overhead_us": 2.0},
    ],
    "kind_efficiency": {"Conv2d": 0.5},  # Linear: 1
    "sparsity": [
        {"pattern": "2:4", "efficiency": 0.8, "max_speedup": 2.0, "precisions": [8]},
        {"pattern": "unstructured", "min_sparsity": 0.6, "efficiency": 0.5, "max_speedup": 4.0},
    ],
    "memory": [
        {"name": "sram", "capacity_bytes": 1500, "bandwidth_bytes_per_second": 1e9,
         "energy_pj_per_byte": 1.0},
        {"name": "dram", "capacity_bytes": None, "bandwidth_bytes_per_second": 1e8,
         "energy_pj_per_byte": 20.0},
    ],
    "model_overhead_us": 10.0,
    "conversion_overhead_us": 3.0,
    "static_power_watts": 0.001,
}

# conv: 8 output channels x 16-long rows (128 weights, 2:4 fits), bias; fc: 10 x 32, no bias.
HAND_TABLE = LayerTable(layers=(
    LayerInfo("conv", "Conv2d", (8, 4, 2, 2), True, macs=100_000, input_elements=200,
              output_elements=300),
    LayerInfo("fc", "Linear", (10, 32), False, macs=320, input_elements=32, output_elements=10),
))


def _hand(**changes):
    return parse_profile({**copy.deepcopy(HAND), **changes})


def _cand(**layers) -> Candidate:
    return Candidate({name: LayerChoice.make(*args) for name, args in layers.items()})


def _check_layer(cost, latency, compute, memory, overhead, bound, level_w, level_a,
                 e_compute_pj, e_memory_pj):
    assert cost.latency_s == pytest.approx(latency * US)
    assert cost.compute_s == pytest.approx(compute * US)
    assert cost.memory_s == pytest.approx(memory * US)
    assert cost.overhead_s == pytest.approx(overhead * US)
    assert cost.bound == bound
    assert (cost.weight_level, cost.activation_level) == (level_w, level_a)
    assert cost.compute_energy_j == pytest.approx(e_compute_pj * PJ)
    assert cost.memory_energy_j == pytest.approx(e_memory_pj * PJ)
    assert cost.static_energy_j == pytest.approx(0.001 * latency * US)


def test_hand_dense_fp32():
    m = estimate_cost(HAND_TABLE, Candidate({}), _hand())
    conv, fc = m.layers
    # weights: conv 128 x 32 bit + bias 8 x 32 bit = 4352 bit = 544 B; fc 320 x 32 = 1280 B.
    # 1824 B > 1500 B of sram -> all weights in dram.
    assert (conv.weight_bytes, fc.weight_bytes) == (544, 1280)
    # conv: compute 1e5 / (1e9 x 0.5) = 200 us; activations (200 + 300) x 4 B = 2000 B -> dram;
    # memory (544 + 2000) / 1e8 = 25.44 us; + 1 us overhead, no precision switch (fp32 input).
    _check_layer(conv, 201.0, 200.0, 25.44, 1.0, "compute", "dram", "dram",
                 e_compute_pj=1e5 * 4, e_memory_pj=(544 + 2000) * 20)
    # fc: compute 320 / 1e9 = 0.32 us; activations (32 + 10) x 4 = 168 B -> sram;
    # memory 1280 / 1e8 + 168 / 1e9 = 12.8 + 0.168 us; + 1 us.
    _check_layer(fc, 13.968, 0.32, 12.968, 1.0, "memory", "dram", "sram",
                 e_compute_pj=320 * 4, e_memory_pj=1280 * 20 + 168 * 1)
    assert m.fixed_s == pytest.approx(10 * US)  # model overhead; output already fp32
    assert m.latency_s == pytest.approx((201.0 + 13.968 + 10) * US)
    dynamic_pj = 1e5 * 4 + (544 + 2000) * 20 + 320 * 4 + 1280 * 20 + 168
    assert m.energy_j == pytest.approx(dynamic_pj * PJ + 0.001 * (201.0 + 13.968 + 10) * US)
    assert cost_metrics(HAND_TABLE, Candidate({}), _hand()) == pytest.approx(
        {"latency_ms": (201.0 + 13.968 + 10) / 1000, "energy_uj": m.energy_j * 1e6})
    assert (conv.precision, conv.native, conv.accelerated) == ("fp32", True, None)


def test_hand_int8_everywhere():
    m = estimate_cost(HAND_TABLE, _cand(conv=("dense", 0, 8), fc=("dense", 0, 8)), _hand())
    conv, fc = m.layers
    # weights: conv 128 x 8 + scales 8 x 32 + bias 8 x 32 = 1536 bit = 192 B;
    # fc 320 x 8 + scales 10 x 32 = 2880 bit = 360 B; 552 B fit sram.
    assert (conv.weight_bytes, fc.weight_bytes) == (192, 360)
    # conv: 1e5 / (4e9 x 0.5) = 50 us; activations 500 x 1 B -> sram; memory (192+500)/1e9;
    # overhead 2 us + 3 us conversion (fp32 input -> int8 activations).
    _check_layer(conv, 55.0, 50.0, 0.692, 5.0, "compute", "sram", "sram",
                 e_compute_pj=1e5 * 1, e_memory_pj=692)
    # fc: 320 / 4e9 = 0.08 us; memory (360 + 42) / 1e9 = 0.402 us; overhead 2 us dominates.
    _check_layer(fc, 2.402, 0.08, 0.402, 2.0, "overhead", "sram", "sram",
                 e_compute_pj=320, e_memory_pj=402)
    assert m.fixed_s == pytest.approx(13 * US)  # 10 us + dequantize back to the fp32 output
    assert m.latency_s == pytest.approx((55.0 + 2.402 + 13) * US)
    assert m.fixed_energy_j == pytest.approx(0.001 * 13 * US)


def test_hand_int4_runs_on_int8_exactly_like_int8():
    int4 = estimate_cost(HAND_TABLE, _cand(conv=("dense", 0, 4), fc=("dense", 0, 4)), _hand())
    int8 = estimate_cost(HAND_TABLE, _cand(conv=("dense", 0, 8), fc=("dense", 0, 8)), _hand())
    assert int4.latency_s == int8.latency_s and int4.energy_j == int8.energy_j
    assert int4.layers[0].precision == "int8" and "int4 runs on int8" in int4.layers[0].note


def test_hand_channel_pruning_and_the_weight_level():
    # 50 %: conv keeps 4 rows: 4 x 16 x 32 + 4 x 32 = 2176 bit = 272 B; total 272 + 1280 = 1552 B
    # still > 1500 -> dram. MACs 5e4 -> 100 us; activations (200 + 150) x 4 = 1400 B -> sram;
    # memory 272 / 1e8 + 1400 / 1e9 = 2.72 + 1.4 us.
    m = estimate_cost(HAND_TABLE, _cand(conv=("channel", 0.5, 32)), _hand())
    conv, fc = m.layers
    _check_layer(conv, 101.0, 100.0, 4.12, 1.0, "compute", "dram", "sram",
                 e_compute_pj=5e4 * 4, e_memory_pj=272 * 20 + 1400)
    assert fc.latency_s == pytest.approx(13.968 * US)  # fc untouched
    assert conv.accelerated is True
    # 75 %: 2 rows: 2 x 16 x 32 + 2 x 32 = 1088 bit = 136 B; total 1416 B now fits sram, so the
    # fc weights come from sram too: memory (1280 + 168) / 1e9 = 1.448 us > compute 0.32 us.
    m = estimate_cost(HAND_TABLE, _cand(conv=("channel", 0.75, 32)), _hand())
    conv, fc = m.layers
    # conv: 25000 MACs -> 50 us; activations (200 + 75) x 4 = 1100 B; memory (136 + 1100) / 1e9
    _check_layer(conv, 51.0, 50.0, 1.236, 1.0, "compute", "sram", "sram",
                 e_compute_pj=25000 * 4, e_memory_pj=136 + 1100)
    _check_layer(fc, 2.448, 0.32, 1.448, 1.0, "memory", "sram", "sram",
                 e_compute_pj=320 * 4, e_memory_pj=1280 + 168)
    assert m.latency_s == pytest.approx((51.0 + 2.448 + 10) * US)


def test_hand_accelerated_2_4_at_int8_and_conversion_back():
    m = estimate_cost(HAND_TABLE, _cand(conv=("2:4", 0.5, 8)), _hand())
    conv, fc = m.layers
    # conv: 64 kept values x 8 + index 64 x 2 bit + scales 256 + bias 256 = 1152 bit = 144 B;
    # total 144 + 1280 = 1424 B -> sram. Compute fraction max(0.5 / 0.8, 1 / 2) = 0.625:
    # 62500 MACs / (4e9 x 0.5) = 31.25 us; memory (144 + 500) / 1e9; overhead 2 + 3 (switch).
    assert conv.weight_bytes == 144 and conv.macs == pytest.approx(62500)
    _check_layer(conv, 36.25, 31.25, 0.644, 5.0, "compute", "sram", "sram",
                 e_compute_pj=62500 * 1, e_memory_pj=644)
    assert conv.accelerated is True
    # fc back at fp32: a dequantize (3 us) on top of its 1 us; weights now in sram.
    _check_layer(fc, 1.448 + 1 + 3, 0.32, 1.448, 4.0, "overhead", "sram", "sram",
                 e_compute_pj=320 * 4, e_memory_pj=1280 + 168)
    assert m.fixed_s == pytest.approx(10 * US)  # the output is fp32 already
    assert m.latency_s == pytest.approx((36.25 + 5.448 + 10) * US)


def test_hand_2_4_at_fp32_is_not_accelerated_here():
    dense = estimate_cost(HAND_TABLE, Candidate({}), _hand())
    m = estimate_cost(HAND_TABLE, _cand(conv=("2:4", 0.5, 32)), _hand())
    assert m.layers[0].accelerated is False and "not accelerated at fp32" in m.layers[0].note
    for layer, reference in zip(m.layers, dense.layers):
        assert (layer.latency_s, layer.energy_j, layer.weight_bytes) == (
            reference.latency_s, reference.energy_j, reference.weight_bytes)
    assert m.latency_s == dense.latency_s and m.energy_j == dense.energy_j


def test_hand_unstructured_below_and_above_min_sparsity():
    dense = estimate_cost(HAND_TABLE, Candidate({}), _hand())
    below = estimate_cost(HAND_TABLE, _cand(conv=("unstructured", 0.5, 32)), _hand())
    assert below.latency_s == dense.latency_s and below.energy_j == dense.energy_j
    assert below.layers[0].accelerated is False and "below 0.6" in below.layers[0].note
    # 80 %: kept 128 - round(102.4) = 26; index min(bitmask 128, CSR 26 x 4 + 8 x 5 = 144) = 128;
    # weights 26 x 32 + 128 + bias 256 = 1216 bit = 152 B; total 1432 B -> sram.
    # fraction max(0.2 / 0.5, 1 / 4) = 0.4 -> 40000 MACs / 0.5e9 = 80 us; activations 2000 B
    # -> dram: memory 152 / 1e9 + 2000 / 1e8 = 0.152 + 20 us.
    above = estimate_cost(HAND_TABLE, _cand(conv=("unstructured", 0.8, 32)), _hand())
    conv, fc = above.layers
    _check_layer(conv, 81.0, 80.0, 20.152, 1.0, "compute", "sram", "dram",
                 e_compute_pj=40000 * 4, e_memory_pj=152 + 2000 * 20)
    assert conv.accelerated is True
    assert fc.latency_s == pytest.approx(2.448 * US)  # its weights moved to sram as well
    # 95 %: the ideal 20x is capped by max_speedup 4: fraction 0.25 -> 25000 MACs -> 50 us.
    capped = estimate_cost(HAND_TABLE, _cand(conv=("unstructured", 0.95, 32)), _hand())
    assert capped.layers[0].compute_s == pytest.approx(50 * US)


def test_hand_sparse_kernel_slower_than_dense_falls_back():
    # An unstructured kernel with no speed-up at 10 %: int8 values + bitmask index are bigger
    # (288 x 8 + 320 + scales 320 = 2944 bit = 368 B) than dense int8 (360 B) -> runs dense.
    profile = _hand(sparsity=[{"pattern": "unstructured", "efficiency": 0.1}])
    m = estimate_cost(HAND_TABLE, _cand(conv=("dense", 0, 8), fc=("unstructured", 0.1, 8)), profile)
    fc = m.layers[1]
    assert fc.accelerated is False and "slower than dense" in fc.note
    # dense int8 fc: memory (360 + 42) / 1e9, overhead 2 us (no switch after int8 conv)
    assert fc.weight_bytes == 360 and fc.latency_s == pytest.approx(2.402 * US)


def test_hand_not_native_precision_is_flagged():
    int_only = _hand(precisions=[HAND["precisions"][1]], sparsity=[])
    m = estimate_cost(HAND_TABLE, Candidate({}), int_only)
    assert all(not layer.native and layer.precision == "int8" for layer in m.layers)
    assert "no 32-bit arithmetic" in m.layers[0].note


def test_integer_weights_on_a_float_only_device_cost_no_more_than_float():
    profile = _hand(sparsity=[])  # fp32 + int8: 16-bit weights run on fp32 (native)
    fp32 = estimate_cost(HAND_TABLE, Candidate({}), profile)
    int16 = estimate_cost(HAND_TABLE, _cand(conv=("dense", 0, 16), fc=("dense", 0, 16)), profile)
    assert int16.layers[0].precision == "fp32"
    assert int16.energy_j <= fp32.energy_j


# --- (b) physics properties on every built-in profile ---------------------------------------------

DIGITS = LayerTable(layers=(
    LayerInfo("conv1", "Conv2d", (16, 1, 3, 3), True, macs=9216, input_elements=64,
              output_elements=1024),
    LayerInfo("conv2", "Conv2d", (32, 16, 3, 3), True, macs=294912, input_elements=1024,
              output_elements=2048),
    LayerInfo("conv3", "Conv2d", (32, 32, 3, 3), True, macs=147456, input_elements=512,
              output_elements=512),
    LayerInfo("fc1", "Linear", (64, 512), True, macs=32768, input_elements=512, output_elements=64),
    LayerInfo("fc2", "Linear", (10, 64), True, macs=640, input_elements=64, output_elements=10),
))

BITS = [2, 3, 4, 6, 8, 12, 16, 32]
SPARSITIES = [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
PROFILES = builtin_profiles()
DRAWS = 40


def _random_choice(rng: random.Random, layer: LayerInfo, patterns=None) -> LayerChoice:
    options = patterns or ["dense", "channel", "unstructured", "2:4"]
    options = [p for p in options if layer.supports(p)]
    pattern = rng.choice(options)
    sparsity = 0.5 if pattern == "2:4" else (0.0 if pattern == "dense" else rng.choice(SPARSITIES))
    return LayerChoice.make(pattern, sparsity, rng.choice(BITS))


def _random_candidate(rng: random.Random, table: LayerTable, patterns=None) -> Candidate:
    return Candidate({layer.name: _random_choice(rng, layer, patterns) for layer in table.layers})


def _with(candidate: Candidate, name: str, choice: LayerChoice) -> Candidate:
    return Candidate({**candidate, name: choice})


def _dynamic_j(model) -> float:
    return sum(layer.compute_energy_j + layer.memory_energy_j for layer in model.layers)


def _leq(a: float, b: float) -> bool:
    return a <= b * (1 + 1e-12) + 1e-18


@pytest.mark.parametrize("name", PROFILES)
def test_more_channel_sparsity_never_costs_more(name):
    profile = load_profile(name)
    rng = random.Random(f"channel-{name}")
    for _ in range(DRAWS):
        base = _random_candidate(rng, DIGITS)
        layer = rng.choice(DIGITS.layers)
        bits = rng.choice(BITS)
        low, high = sorted(rng.sample([0.0] + SPARSITIES, 2))
        less = estimate_cost(DIGITS, _with(base, layer.name, LayerChoice.make("channel", low, bits)), profile)
        more = estimate_cost(DIGITS, _with(base, layer.name, LayerChoice.make("channel", high, bits)), profile)
        assert _leq(more.latency_s, less.latency_s), (name, layer.name, low, high, bits)
        assert _leq(more.energy_j, less.energy_j), (name, layer.name, low, high, bits)


@pytest.mark.parametrize("name", PROFILES)
def test_uniformly_fewer_bits_never_cost_more_energy(name):
    """All layers together to fewer bits, on candidates that prune only densely (dense or channel).

    Dynamic (arithmetic + memory) energy never rises. Total energy also charges static power over
    the latency, and a precision switch costs a conversion step, which on a tiny model can outweigh
    the arithmetic saved (a real effect: batch-1 GPU quantize kernels); with conversions free, total
    energy and latency never rise either. Sparse patterns are left out on purpose: a narrower width
    may lose a sparse kernel (XNNPACK's sparse path is fp32-only), which can cost more, truly.
    Only widths the device runs natively are compared (fp32 on an int-only accelerator is
    emulated)."""
    profile = load_profile(name)
    free_switch = profile.model_copy(update={"conversion_overhead_us": 0.0})
    native = [b for b in BITS if profile.precision_for(b)[1]]
    rng = random.Random(f"bits-{name}")
    compared = 0
    for _ in range(DRAWS):
        shape = _random_candidate(rng, DIGITS, patterns=["dense", "channel"])
        wide, narrow = sorted(rng.sample(native, 2), reverse=True)

        def at(bits, prof):
            cand = Candidate({n: LayerChoice.make(c.pattern, c.sparsity, bits) for n, c in shape.items()})
            return estimate_cost(DIGITS, cand, prof)

        assert _leq(_dynamic_j(at(narrow, profile)), _dynamic_j(at(wide, profile))), (name, wide, narrow)
        a, b = at(narrow, free_switch), at(wide, free_switch)
        assert _leq(a.energy_j, b.energy_j), (name, wide, narrow)
        assert _leq(a.latency_s, b.latency_s), (name, wide, narrow)
        compared += 1
    assert compared == DRAWS


def _threshold(profile, pattern, bits):
    """min_sparsity where the pattern is accelerated at this width, or None when it never is."""
    entry = profile.acceleration(pattern)
    precision, _ = profile.precision_for(bits)
    if entry is None or (entry.precisions is not None and precision.bits not in entry.precisions):
        return None
    return entry.min_sparsity


@pytest.mark.parametrize("name", PROFILES)
def test_unaccelerated_sparsity_changes_nothing(name):
    """Unstructured below the threshold, or any pattern the device does not accelerate at that
    width, costs exactly what the dense layer costs (time and energy)."""
    profile = load_profile(name)
    rng = random.Random(f"unaccelerated-{name}")
    checked = 0
    for _ in range(DRAWS * 3):
        base = _random_candidate(rng, DIGITS)
        layer = rng.choice(DIGITS.layers)
        bits = rng.choice(BITS)
        pattern = rng.choice([p for p in ("unstructured", "2:4") if layer.supports(p)])
        sparsity = 0.5 if pattern == "2:4" else rng.choice(SPARSITIES)
        threshold = _threshold(profile, pattern, bits)
        if threshold is not None and sparsity >= threshold:
            continue
        sparse = estimate_cost(DIGITS, _with(base, layer.name, LayerChoice.make(pattern, sparsity, bits)), profile)
        dense = estimate_cost(DIGITS, _with(base, layer.name, LayerChoice.make("dense", 0, bits)), profile)
        assert sparse.latency_s == dense.latency_s, (name, layer.name, pattern, sparsity, bits)
        assert sparse.energy_j == dense.energy_j
        index = DIGITS.names.index(layer.name)
        assert sparse.layers[index].accelerated is False
        checked += 1
    assert checked >= DRAWS


@pytest.mark.parametrize("name", PROFILES)
def test_an_accelerated_pattern_never_makes_a_layer_slower(name):
    profile = load_profile(name)
    rng = random.Random(f"accelerated-{name}")
    for _ in range(DRAWS):
        base = _random_candidate(rng, DIGITS)
        layer = rng.choice(DIGITS.layers)
        choice = _random_choice(rng, layer, patterns=["unstructured", "2:4"])
        sparse = estimate_cost(DIGITS, _with(base, layer.name, choice), profile)
        dense = estimate_cost(DIGITS, _with(base, layer.name, LayerChoice.make("dense", 0, choice.bits)), profile)
        index = DIGITS.names.index(layer.name)
        assert _leq(sparse.layers[index].latency_s, dense.layers[index].latency_s)
        assert _leq(sparse.latency_s, dense.latency_s)


@pytest.mark.parametrize("name", PROFILES)
def test_totals_are_sums_and_bound_names_the_largest_term(name):
    profile = load_profile(name)
    rng = random.Random(f"totals-{name}")
    for _ in range(DRAWS):
        candidate = _random_candidate(rng, DIGITS)
        m = estimate_cost(DIGITS, candidate, profile)
        last_bits = profile.precision_for(candidate.get_choice("fc2").bits)[0].act_bits
        fixed_us = profile.model_overhead_us + (profile.conversion_overhead_us if last_bits != 32 else 0)
        assert m.fixed_s == pytest.approx(fixed_us * US)
        assert m.latency_s == pytest.approx(sum(layer.latency_s for layer in m.layers) + m.fixed_s)
        assert m.energy_j == pytest.approx(sum(layer.energy_j for layer in m.layers)
                                           + profile.static_power_watts * m.fixed_s)
        for layer in m.layers:
            assert layer.latency_s == pytest.approx(max(layer.compute_s, layer.memory_s) + layer.overhead_s)
            terms = {"compute": layer.compute_s, "memory": layer.memory_s, "overhead": layer.overhead_s}
            assert terms[layer.bound] == max(terms.values())
            assert layer.energy_j > 0 and layer.latency_s > 0


# --- (c) the headline claims of the profiles ------------------------------------------------------

# A 4096 x 4096 Linear over 1024 positions (a transformer projection at sequence length 1024;
# at 256 positions the int8 GEMM takes ~6 us, less than its launch + quantize overhead).
BIG_LINEAR = LayerTable(layers=(
    LayerInfo("proj", "Linear", (4096, 4096), False, macs=4096 * 4096 * 1024,
              input_elements=1024 * 4096, output_elements=1024 * 4096),
))
# A ResNet-style 3x3 convolution, 256 -> 256 channels on 56 x 56.
BIG_CONV = LayerTable(layers=(
    LayerInfo("conv", "Conv2d", (256, 256, 3, 3), True, macs=256 * 256 * 9 * 56 * 56,
              input_elements=256 * 56 * 56, output_elements=256 * 56 * 56),
))


def _one(table, name, pattern, sparsity, bits, profile):
    candidate = Candidate({table.layers[0].name: LayerChoice.make(pattern, sparsity, bits)})
    return estimate_cost(table, candidate, profile).layers[0]


@pytest.mark.parametrize("bits", [16, 8])
def test_h100_2_4_speeds_up_a_compute_bound_layer(bits):
    h100 = load_profile("gpu-h100")
    dense = _one(BIG_LINEAR, "proj", "dense", 0, bits, h100)
    sparse = _one(BIG_LINEAR, "proj", "2:4", 0.5, bits, h100)
    assert dense.bound == "compute" and sparse.accelerated is True
    speedup = dense.latency_s / sparse.latency_s
    assert 1.2 <= speedup < 2.0  # below the 2x of the math, about 1.2-1.5x end to end
    assert sparse.energy_j < dense.energy_j


def test_h100_2_4_does_nothing_at_fp32_and_unstructured_nothing_anywhere():
    h100 = load_profile("gpu-h100")
    dense = _one(BIG_LINEAR, "proj", "dense", 0, 32, h100)
    assert _one(BIG_LINEAR, "proj", "2:4", 0.5, 32, h100).latency_s == dense.latency_s
    for bits in (32, 16, 8):
        base = _one(BIG_LINEAR, "proj", "dense", 0, bits, h100)
        assert _one(BIG_LINEAR, "proj", "unstructured", 0.9, bits, h100).latency_s == base.latency_s


def test_h100_tiny_model_is_launch_bound():
    m = estimate_cost(DIGITS, Candidate({}), load_profile("gpu-h100"))
    assert all(layer.bound == "overhead" for layer in m.layers)


def test_x86_sparsity_patterns_change_nothing_channel_and_int8_do():
    x86 = load_profile("x86-server-vnni")
    fp32 = _one(BIG_CONV, "conv", "dense", 0, 32, x86)
    assert fp32.bound == "compute"
    for bits in (32, 8):
        dense = _one(BIG_CONV, "conv", "dense", 0, bits, x86)
        for pattern, sparsity in [("2:4", 0.5), ("unstructured", 0.5), ("unstructured", 0.95)]:
            sparse = _one(BIG_CONV, "conv", pattern, sparsity, bits, x86)
            assert sparse.latency_s == dense.latency_s and sparse.energy_j == dense.energy_j
    half = _one(BIG_CONV, "conv", "channel", 0.5, 32, x86)
    assert half.latency_s / fp32.latency_s == pytest.approx(0.5, abs=0.02)
    int8 = _one(BIG_CONV, "conv", "dense", 0, 8, x86)
    assert int8.bound == "compute"
    assert 0.2 <= int8.latency_s / fp32.latency_s <= 0.5  # VNNI: 2-4x over fp32
    assert int8.energy_j < fp32.energy_j


def test_cpus_gain_from_channel_pruning_and_int8_on_the_small_cnn():
    for name in ("x86-server-vnni", "edge-arm-a76"):
        profile = load_profile(name)

        def total(pattern, sparsity, bits):
            cand = Candidate({n: LayerChoice.make(pattern, sparsity, bits) for n in DIGITS.names})
            return estimate_cost(DIGITS, cand, profile).latency_s

        dense = total("dense", 0, 32)
        assert total("channel", 0.5, 32) < dense
        assert total("dense", 0, 8) < dense
        assert total("unstructured", 0.5, 32) == dense


POINTWISE = LayerTable((LayerInfo("pw", "Conv2d", (512, 512, 1, 1), True, 512 * 512 * 56 * 56,
                                  512 * 56 * 56, 512 * 56 * 56),))


def test_a76_unstructured_helps_only_above_two_thirds_at_fp32_on_pointwise_convs():
    a76 = load_profile("edge-arm-a76")
    dense = _one(POINTWISE, "pw", "dense", 0, 32, a76)
    assert _one(POINTWISE, "pw", "unstructured", 0.6, 32, a76).latency_s == dense.latency_s
    sparse = _one(POINTWISE, "pw", "unstructured", 0.9, 32, a76)
    assert sparse.accelerated and sparse.latency_s < 0.6 * dense.latency_s
    int8 = _one(POINTWISE, "pw", "dense", 0, 8, a76)
    assert _one(POINTWISE, "pw", "unstructured", 0.9, 8, a76).latency_s == int8.latency_s
    # XNNPACK's sparse path covers 1x1 convolutions only: a 3x3 conv keeps the dense kernel
    dense3 = _one(BIG_CONV, "conv", "dense", 0, 32, a76)
    sparse3 = _one(BIG_CONV, "conv", "unstructured", 0.9, 32, a76)
    assert sparse3.latency_s == dense3.latency_s and sparse3.accelerated is False
    assert "not accelerated for this Conv2d" in sparse3.note


def test_bitfusion_fewer_bits_cut_latency_and_energy():
    bitfusion = load_profile("accel-bitfusion")
    results = []
    for bits in (16, 8, 4, 2):
        cand = Candidate({n: LayerChoice.make("dense", 0, bits) for n in DIGITS.names})
        results.append(estimate_cost(DIGITS, cand, bitfusion))
    for wide, narrow in zip(results, results[1:]):
        assert narrow.latency_s < wide.latency_s
        assert narrow.energy_j < wide.energy_j
    # on a compute-bound layer halving the width gives ~4x the throughput
    c8 = _one(BIG_CONV, "conv", "dense", 0, 8, bitfusion)
    c4 = _one(BIG_CONV, "conv", "dense", 0, 4, bitfusion)
    assert c8.bound == "compute" and c8.compute_s / c4.compute_s == pytest.approx(4.0)


def test_mcu_reads_weights_from_flash():
    mcu = load_profile("mcu-cortex-m7")
    m = estimate_cost(DIGITS, Candidate({}), mcu)
    assert {layer.weight_level for layer in m.layers} == {"flash"}
    assert all(layer.activation_level != "flash" for layer in m.layers)
    int8 = estimate_cost(DIGITS, Candidate({n: LayerChoice.make("dense", 0, 8) for n in DIGITS.names}), mcu)
    assert int8.latency_s < m.latency_s and int8.energy_j < m.energy_j


# --- ops between weight layers, depthwise kind, per-precision efficiency -----------------------

from autosparse.space.layers import OpInfo  # noqa: E402

OPS_TABLE = LayerTable(layers=HAND_TABLE.layers, ops=(
    OpInfo("add", 600, after_layer="conv"),  # a residual add on conv's 300 outputs: 2 reads + 1 write
    OpInfo("pool", 50, after_layer=None),    # before any layer: at the float input's precision
))


def test_ops_between_layers_are_charged_overhead_plus_bytes_over_bandwidth():
    profile = _hand(precisions=[{**HAND["precisions"][0], "op_overhead_us": 0.5},
                                {**HAND["precisions"][1], "op_overhead_us": 0.25}])
    plain = estimate_cost(HAND_TABLE, Candidate({}), profile)
    m = estimate_cost(OPS_TABLE, Candidate({}), profile)
    add, pool = m.ops
    # add: 600 elements x 4 B = 2400 B > 1500 B of sram -> dram at 1e8 B/s: 24 us, + 0.5 us
    assert (add.precision, add.level, add.activation_bytes) == ("fp32", "dram", 2400)
    assert add.latency_s == pytest.approx(24.5 * US)
    # pool: 50 x 4 B = 200 B in sram at 1e9 B/s: 0.2 us, + 0.5 us
    assert pool.latency_s == pytest.approx(0.7 * US)
    assert m.latency_s == pytest.approx(plain.latency_s + 25.2 * US)
    assert m.energy_j > plain.energy_j
    # int8 conv: the add follows it at 8-bit activations and the int8 op overhead
    int8 = estimate_cost(OPS_TABLE, _cand(conv=("dense", 0.0, 8)), profile)
    assert (int8.ops[0].precision, int8.ops[0].activation_bytes) == ("int8", 600)
    assert int8.ops[0].latency_s == pytest.approx((0.6 + 0.25) * US)  # 600 B in sram
    # channel pruning of the layer before it shrinks the op's elements by its kept share
    pruned = estimate_cost(OPS_TABLE, _cand(conv=("channel", 0.5, 32)), profile)
    assert pruned.ops[0].elements == pytest.approx(300)
    assert pruned.ops[1].elements == 50  # nothing before it was pruned


def test_a_table_without_ops_costs_what_it_did():
    for name in builtin_profiles():
        profile = load_profile(name)
        m = estimate_cost(HAND_TABLE, Candidate({}), profile)
        assert m.ops == () and m.ops_s == 0
        assert m.latency_s == pytest.approx(sum(c.latency_s for c in m.layers) + m.fixed_s)


def test_ops_survive_the_table_round_trip_and_old_tables_load():
    data = OPS_TABLE.to_dict()
    assert LayerTable.from_dict(data) == OPS_TABLE
    del data["ops"]
    assert LayerTable.from_dict(data).ops == ()
    with pytest.raises(ValueError, match="op kind 'gemm' not allowed"):
        OpInfo("gemm", 1)


DW = LayerInfo("dw", "Conv2d", (16, 1, 3, 3), False, macs=16 * 9 * 64, input_elements=1024,
               output_elements=1024, groups=16)


def test_a_depthwise_conv_has_its_own_efficiency_and_falls_back_to_conv2d():
    table = LayerTable(layers=(DW,))
    assert DW.cost_kind == "DepthwiseConv2d" and DW.kind == "Conv2d"
    assert LayerInfo("g", "Conv2d", (16, 4, 3, 3), False, macs=1, groups=4).cost_kind == "Conv2d"
    compute = {}
    for label, efficiency in (("fallback", {"Conv2d": 0.5}),
                              ("own", {"Conv2d": 0.5, "DepthwiseConv2d": 0.1})):
        cost = estimate_cost(table, Candidate({}), _hand(kind_efficiency=efficiency)).layers[0]
        compute[label] = cost.compute_s
    assert compute["fallback"] == pytest.approx(16 * 9 * 64 / (1e9 * 0.5))
    assert compute["own"] == pytest.approx(5 * compute["fallback"])


def test_a_precision_can_override_a_kind_efficiency():
    profile = _hand(precisions=[HAND["precisions"][0],
                                {**HAND["precisions"][1], "kind_efficiency": {"Conv2d": 1.0}}])
    fp32 = estimate_cost(HAND_TABLE, Candidate({}), profile).layers[0]
    int8 = estimate_cost(HAND_TABLE, _cand(conv=("dense", 0.0, 8)), profile).layers[0]
    assert fp32.compute_s == pytest.approx(1e5 / (1e9 * 0.5))  # profile-wide Conv2d 0.5
    assert int8.compute_s == pytest.approx(1e5 / (4e9 * 1.0))  # int8's own Conv2d 1.0
    with pytest.raises(Exception, match="DepthwiseConv2d"):
        _hand(precisions=[{**HAND["precisions"][0], "kind_efficiency": {"Conv3d": 0.5}}])
