"""GGUF grids: the weights a grid rounds to are, bit for bit, what llama.cpp's GGUF reader
(``gguf.quants.dequantize``) gets back from the bytes ``pack`` writes, for RTN and for a
GPTQ-like pass whose blocks are fitted on weights error feedback has already moved."""

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from autosparse.compress.oneshot.gguf_grids import (
    GRIDS,
    RecordingGrid,
    check_shape,
    ggml_type,
    grid_for_bits,
    pack,
    quantize_weight_rtn,
    stored_bytes,
)
from autosparse.compress.oneshot.grid import round_to_nearest

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["F16", "Q8_0", "Q6_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K"]
BITS_PER_WEIGHT = {"F16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_0": 5.5, "Q4_K": 4.5, "Q4_0": 4.5,
                   "Q3_K": 3.4375, "Q2_K": 2.625}
SYMMETRIC = ["Q8_0", "Q6_K", "Q5_0", "Q4_0", "Q3_K"]


def weights(rows: int = 40, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus the awkward cases: outliers, all-zero blocks and sub-blocks, one-signed
    rows, a constant row, and magnitudes whose scales are fp16 subnormals."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[1, 3], w[2, cols - 3] = 0.8, -1.5
    w[3, :256] = 0
    w[4, 32:64] = 0
    w[4, cols - 32:cols - 16] = 0
    w[5] = -w[5].abs()
    w[6] = w[6].abs()
    w[7] = 0.01
    w[8] *= 1e-4
    w[9, ::3] = 0  # sparse
    return w


def bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(t, dtype=np.float32).view(np.int32)


def read_back(data: bytes, grid, rows: int) -> np.ndarray:
    """What a GGUF reader dequantizes from the tensor data."""
    return dequantize(np.frombuffer(data, dtype=np.uint8).reshape(rows, -1), ggml_type(grid))


@pytest.mark.parametrize("name", NAMES)
def test_rtn_bytes_read_back_as_the_scored_weights(name):
    grid = GRIDS[name]()
    w = weights()
    recorder = RecordingGrid(grid)
    scored = round_to_nearest(w, recorder)
    data = recorder.pack(scored)
    assert len(data) == stored_bytes(grid, *w.shape) == w.numel() * grid.bits_per_weight / 8
    np.testing.assert_array_equal(bits(read_back(data, grid, w.shape[0])), bits(scored))
    # the vectorised path is the same rounding; its bytes keep the reference quantizer's codes
    # where a block's fp16 scale underflowed to 0 (any code reads as 0 there), pack's hold 0
    fast, fast_data = quantize_weight_rtn(grid, w)
    np.testing.assert_array_equal(bits(fast), bits(scored))
    np.testing.assert_array_equal(bits(read_back(fast_data, grid, w.shape[0])), bits(scored))


@pytest.mark.parametrize("name", NAMES)
def test_gptq_like_pass_packs_exactly_with_the_recorded_parameters(name):
    """Each block fitted on weights already moved by earlier columns' errors, each column
    pushed by the previous one's error: the final weight is re-derivable only from the
    parameters recorded at fit time, and packs exactly."""
    grid = GRIDS[name]()
    w = weights(rows=24, cols=512, seed=1)
    recorder = RecordingGrid(grid)
    work = w.clone()
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], grid.block):
        params = recorder.fit(work[:, start:start + grid.block])
        for i in range(grid.block):
            col = start + i
            out[:, col] = recorder.quantize_column(work[:, col], params, i)
            if col + 1 < w.shape[1]:
                work[:, col + 1:col + 5] += 0.2 * (work[:, col] - out[:, col])[:, None]
    data = recorder.pack(out)
    np.testing.assert_array_equal(bits(read_back(data, grid, w.shape[0])), bits(out))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0"])
def test_legacy_types_write_the_same_bytes_as_gguf_py(name):
    """For the types gguf-py can quantize, RTN here is its reference quantizer byte for byte."""
    grid = GRIDS[name]()
    w = weights()
    _, data = quantize_weight_rtn(grid, w)
    assert quantize(w.numpy(), ggml_type(grid)).tobytes() == data


@pytest.mark.parametrize("name", NAMES)
def test_quantize_column_is_idempotent_on_grid_values(name):
    grid = GRIDS[name]()
    w = weights(rows=16)
    w = w[torch.arange(16) != 8]  # subnormal fp16 scales round codes with the unrounded 1/d
    for start in range(0, w.shape[1], grid.block):
        params = grid.fit(w[:, start:start + grid.block])
        for i in range(0, grid.block, 7):
            once = grid.quantize_column(w[:, start + i], params, i)
            twice = grid.quantize_column(once, params, i)
            np.testing.assert_array_equal(bits(twice), bits(once))


def test_error_falls_as_bits_rise():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    errors = [(quantize_weight_rtn(grid_for_bits(b), w)[0] - w).square().mean().item()
              for b in (2, 3, 4, 5, 6, 8, 16)]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 1e-9


def test_bits_map_to_gguf_types_and_their_sizes():
    expect = {2: T.Q2_K, 3: T.Q3_K, 4: T.Q4_K, 5: T.Q5_0, 6: T.Q6_K, 8: T.Q8_0, 16: T.F16}
    for b, qtype in expect.items():
        grid = grid_for_bits(b)
        assert ggml_type(grid) == qtype and grid.name == qtype.name
        assert grid.bits_per_weight == BITS_PER_WEIGHT[qtype.name]
    assert ggml_type(grid_for_bits(4, exact_zero=True)) == T.Q4_0
    assert ggml_type(grid_for_bits(3, exact_zero=True)) == T.Q3_K
    with pytest.raises(ValueError, match="no exact zero"):
        grid_for_bits(2, exact_zero=True)
    with pytest.raises(ValueError, match="no GGUF grid for 7 bits"):
        grid_for_bits(7)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_types_keep_pruned_weights_exactly_zero(name):
    w = weights()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    w = w * mask
    scored, _ = quantize_weight_rtn(GRIDS[name](), w)
    assert (scored[~mask] == 0).all()


def test_asymmetric_k_quants_do_not_keep_zeros_in_general():
    """The reason ``exact_zero`` exists: Q4_K/Q2_K subtract a min, so a pruned weight moves."""
    w = weights() * (torch.rand(40, 512, generator=torch.Generator().manual_seed(4)) < 0.5)
    for name in ("Q4_K", "Q2_K"):
        scored, _ = quantize_weight_rtn(GRIDS[name](), w)
        assert (scored[w == 0] != 0).any()
    assert [n for n in NAMES if not GRIDS[n]().exact_zero] == ["Q4_K", "Q2_K"]


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match=r"q_proj of shape \[64, 320\] cannot be stored as Q4_K"):
        check_shape(grid_for_bits(4), (64, 320), layer="q_proj")
    with pytest.raises(ValueError, match=r"\[8, 48\].*32-value block"):
        quantize_weight_rtn(grid_for_bits(8), torch.zeros(8, 48))
    check_shape(grid_for_bits(8), (64, 320))  # 320 = 10 blocks of 32


def test_a_weight_off_the_grid_is_refused():
    grid = grid_for_bits(4)
    w = weights(rows=12, cols=256)
    recorder = RecordingGrid(grid)
    round_to_nearest(w, recorder)
    with pytest.raises(ValueError, match="not on the Q4_K grid"):
        recorder.pack(w)
    with pytest.raises(ValueError, match="2 recorded parameter sets"):
        pack(grid, torch.zeros(12, 256), recorder.params * 2)
    with pytest.raises(ValueError, match="not on the F16 grid"):
        pack(grid_for_bits(16), w, [])


def test_params_survive_a_torch_save_round_trip(tmp_path):
    """GPTQ's recorded parameters can be written out and the layer packed later."""
    grid = grid_for_bits(3)
    w = weights(rows=12, cols=256)
    recorder = RecordingGrid(grid)
    scored = round_to_nearest(w, recorder)
    torch.save(recorder.params, tmp_path / "params.pt")
    loaded = torch.load(tmp_path / "params.pt", weights_only=False)
    assert pack(grid, scored, loaded) == recorder.pack(scored)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q2_K"])
def test_a_768x256_layer_rounds_quickly(name):
    w = torch.randn(768, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    grid = GRIDS[name]()
    start = time.perf_counter()
    round_to_nearest(w, grid)
    assert time.perf_counter() - start < 2.0  # ~0.3 s on one busy core; the margin is for CI


def _gptq_case(seed: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a Hessian whose diagonal grows along the input, so ``act_order`` fits the
    grid blocks right to left."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 512, generator=g) * 0.02
    x = torch.randn(256, 512, generator=g) * torch.linspace(0.2, 2.0, 512)
    return w, 2 * x.T @ x


@pytest.mark.parametrize("name,act_order", [("Q4_K", True), ("Q8_0", True), ("Q3_K", False)])
def test_gptq_output_packs_exactly(name, act_order):
    from autosparse.compress.oneshot.gptq import gptq

    w, hessian = _gptq_case()
    recorder = RecordingGrid(GRIDS[name]())
    out = gptq(w, hessian, recorder, act_order=act_order)
    np.testing.assert_array_equal(bits(read_back(recorder.pack(out), recorder, 32)), bits(out))
    if act_order:  # the fits came right to left: block order is recovered by matching
        assert pack(recorder.grid, out, recorder.params[::-1]) == recorder.pack(out)


def test_sparse_gptq_needs_a_grid_with_an_exact_zero():
    from autosparse.compress.oneshot.gptq import gptq

    w, hessian = _gptq_case(7)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(8)) < 0.5
    recorder = RecordingGrid(grid_for_bits(4, exact_zero=True))
    out = gptq(w, hessian, recorder, mask=mask)
    np.testing.assert_array_equal(bits(read_back(recorder.pack(out), recorder, 32)), bits(out))
    recorder = RecordingGrid(grid_for_bits(4))
    out = gptq(w, hessian, recorder, mask=mask)
    with pytest.raises(ValueError, match="no exact zero"):
        recorder.pack(out)
