"""One-shot compressors (GPTQ, SparseGPT, Wanda, magnitude), their calibration statistics and the
``Level`` dispatch: error against the simple baselines on correlated inputs, exact masks and
counts, values on the grid, and the argument checks."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

from autosparse.compress.oneshot.calibration import LayerStats, collect_layer_stats
from autosparse.compress.oneshot.gptq import gptq
from autosparse.compress.oneshot.grid import UniformGrid, round_to_nearest
from autosparse.compress.oneshot.levels import Level, compress_weight
from autosparse.compress.oneshot.magnitude import magnitude_mask
from autosparse.compress.oneshot.sparsegpt import sparsegpt
from autosparse.compress.oneshot.wanda import wanda_mask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The column loops are many small ops: on a busy 2-core machine, intra-op threads cost more
    than they give (6x slower here); restored after this file."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_layer(seed: int, rows: int = 32, cols: int = 128, tokens: int = 512):
    """Weight, inputs ``X = Z A`` (Z with a few loud directions, A a random mixing) and
    ``H = 2/n X^T X``: the setting where using H pays."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=g) * torch.logspace(1, -1, cols)
    x = z @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    w = torch.randn(rows, cols, generator=g)
    return w, x, 2.0 / tokens * x.T @ x


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - q).T) ** 2).sum())


class RecordingGrid(UniformGrid):
    """A ``UniformGrid`` that remembers the parameters of every fit, in order."""

    def __init__(self, bits: int, group_size: int) -> None:
        super().__init__(bits, group_size)
        self.fits: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fit(self, w):
        params = super().fit(w)
        self.fits.append(params)
        return params


def assert_on_fitted_grid(q: torch.Tensor, grid: RecordingGrid) -> None:
    """Every block of ``q`` is a fixed point of rounding with the parameters fitted for it."""
    blocks = q.shape[1] // grid.block
    assert len(grid.fits) == blocks
    for b, params in enumerate(grid.fits):
        part = q[:, b * grid.block : (b + 1) * grid.block]
        assert torch.equal(grid.quantize_block(part, params), part), f"block {b} is off the grid"


def assert_nm(keep: torch.Tensor, n: int, m: int, rounded: bool = False) -> None:
    """Exactly ``n`` kept of every ``m``; at most ``n`` non-zeros once ``rounded`` (a kept weight
    may round to 0 on the grid)."""
    counts = keep.reshape(keep.shape[0], -1, m).sum(dim=2)
    ok = counts <= n if rounded else counts == n
    assert torch.all(ok), f"not {n}:{m}: group counts {counts.unique().tolist()}"


# --- quality against the baselines, correlated inputs --------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(seed, bits):
    w, x, h = correlated_layer(seed)
    grid = UniformGrid(bits, 32)
    rtn = output_error(w, round_to_nearest(w, grid), x)
    ours = output_error(w, gptq(w, h, grid), x)
    ordered = output_error(w, gptq(w, h, grid, act_order=True), x)
    assert ours < 0.8 * rtn, (ours, rtn)
    assert ordered < 0.8 * rtn, (ordered, rtn)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda(seed, pattern):
    w, x, h = correlated_layer(seed)
    stats = LayerStats(w.shape[1], dtype=torch.float64)
    stats.add_batch(x)
    magnitude = output_error(w, w * magnitude_mask(w, 0.5, pattern), x)
    wanda = output_error(w, w * wanda_mask(w, stats.input_norm, 0.5, pattern), x)
    ours = output_error(w, sparsegpt(w, h, 0.5, pattern), x)
    assert ours < 0.8 * magnitude, (ours, magnitude)
    assert ours < 0.8 * wanda, (ours, wanda)


# --- masks ----------------------------------------------------------------------------------

# Scores |W_ij| * norm_j worked out by hand (no ties, closest pair 2.4 / 2.5):
#   row 0: 3    2    2.5  2.4 | 1.5  0.6  0.9  3.5
#   row 1: 0.5  8    0.6  0.4 | 6    1.2  2    0.7
#   row 2: 2    0.6  4    2.8 | 0.9  3    0.5  0.1
HAND_W = torch.tensor([
    [3.0, -1.0, 5.0, 0.6, -1.5, 0.2, 9.0, 0.35],
    [-0.5, 4.0, 1.2, 0.1, 6.0, -0.4, -20.0, 0.07],
    [2.0, 0.3, -8.0, 0.7, 0.9, 1.0, 5.0, -0.01],
])
HAND_NORM = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0, 3.0, 0.1, 10.0])


def test_wanda_mask_matches_a_hand_computation():
    # 50 % unstructured, per output row: the 4 lowest scores of each row go
    expected = torch.tensor([
        [1, 0, 1, 1, 0, 0, 0, 1],
        [0, 1, 0, 0, 1, 1, 1, 0],
        [1, 0, 1, 1, 0, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(wanda_mask(HAND_W, HAND_NORM, 0.5, "unstructured"), expected)
    # 2:4: the 2 highest scores of each group of 4
    expected_24 = torch.tensor([
        [1, 0, 1, 0, 1, 0, 0, 1],
        [0, 1, 1, 0, 1, 0, 1, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(wanda_mask(HAND_W, HAND_NORM, 0.5, "2:4"), expected_24)
    # magnitude alone (|W|) keeps other weights in row 0: the input norms matter
    assert magnitude_mask(HAND_W[:1], 0.5)[0].tolist() == [True, False, True, False, True, False,
                                                           True, False]


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_masks_are_nm(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    sparsity = 1 - n / m
    w, x, h = correlated_layer(3, rows=32, cols=128, tokens=256)
    assert_nm(magnitude_mask(w, sparsity, pattern), n, m)
    assert_nm(wanda_mask(w, x.norm(dim=0), sparsity, pattern), n, m)
    pruned = sparsegpt(w, h, sparsity, pattern)
    assert_nm(pruned != 0, n, m)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_counts_are_exact(sparsity):
    w, x, h = correlated_layer(4, rows=30, cols=128, tokens=256)  # 3840 weights
    expected = round(sparsity * w.numel())
    assert int((~magnitude_mask(w, sparsity)).sum()) == expected
    assert int((sparsegpt(w, h, sparsity, "unstructured", blocksize=32) == 0).sum()) == expected
    per_row = (~wanda_mask(w, x.norm(dim=0), sparsity)).sum(dim=1)
    assert torch.all(per_row == round(sparsity * w.shape[1]))


def test_magnitude_prunes_the_smallest():
    w = torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -3.0]])
    assert magnitude_mask(w, 0.5).tolist() == [[False, True, False, True], [False, False, True, True]]


# --- joint sparsity + bits ------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_joint_keeps_zeros_and_grid_values(pattern):
    w, x, h = correlated_layer(5, rows=32, cols=128, tokens=512)
    grid = RecordingGrid(3, 32)
    q = sparsegpt(w, h, 0.5, pattern, grid=grid, blocksize=64)
    assert int((q == 0).sum()) >= w.numel() // 2
    if pattern == "2:4":
        assert_nm(q != 0, 2, 4, rounded=True)
    assert_on_fitted_grid(q, grid)
    # and it is better than pruning then rounding
    plain = sparsegpt(w, h, 0.5, pattern)
    naive = torch.where(plain != 0, round_to_nearest(plain, UniformGrid(3, 32)), 0.0)
    assert output_error(w, q, x) < output_error(w, naive, x)


def test_gptq_with_mask_keeps_zeros_and_grid_values():
    w, x, h = correlated_layer(6, rows=32, cols=128, tokens=512)
    keep = wanda_mask(w, x.norm(dim=0), 0.5, "2:4")
    grid = RecordingGrid(3, 32)
    q = gptq(w, h, grid, mask=keep)
    assert torch.all(q[~keep] == 0)
    assert_on_fitted_grid(q, grid)
    masked_rtn = torch.where(keep, round_to_nearest(w * keep, UniformGrid(3, 32)), 0.0)
    assert output_error(w, q, x) < 0.8 * output_error(w, masked_rtn, x)


def test_act_order_keeps_grid_blocks_in_the_original_column_order():
    w, _, h = correlated_layer(7, rows=16, cols=128, tokens=512)
    h = h * torch.linspace(0.1, 3.0, 128).flip(0).roll(37).sqrt().outer(
        torch.linspace(0.1, 3.0, 128).flip(0).roll(37).sqrt())  # a scrambled diagonal order
    q = gptq(w, h, UniformGrid(2, 32), act_order=True)
    # each (row, original block of 32) holds at most 2^2 distinct values: one grid per block
    distinct = [len(q[r, b * 32 : (b + 1) * 32].unique()) for r in range(16) for b in range(4)]
    assert max(distinct) <= 4


# --- sanity ----------------------------------------------------------------------------------


def test_gptq_on_a_diagonal_hessian_is_rtn():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(8))
    grid = UniformGrid(4, 32)
    assert torch.equal(gptq(w, torch.eye(128), grid), round_to_nearest(w, grid))
    assert torch.equal(gptq(w, torch.diag(torch.rand(128) + 0.5), grid, act_order=True),
                       round_to_nearest(w, grid))


def test_dead_inputs_give_no_nan():
    w, x, _ = correlated_layer(9, rows=32, cols=128, tokens=512)
    x[:, [3, 50, 127]] = 0.0
    h = 2.0 / x.shape[0] * x.T @ x
    grid = UniformGrid(4, 32)
    for out in (gptq(w, h, grid), gptq(w, h, grid, act_order=True), sparsegpt(w, h, 0.5, "2:4"),
                sparsegpt(w, h, 0.5, "unstructured", grid=grid)):
        assert torch.isfinite(out).all()
        assert torch.all(out[:, [3, 50, 127]] == 0)  # a weight on a dead input is set to 0
    assert output_error(w, gptq(w, h, grid), x) < output_error(w, round_to_nearest(w, grid), x)
    # a Hessian that is all zero (the layer never saw input) still factorizes
    assert torch.isfinite(gptq(w, torch.zeros(128, 128), grid)).all()


# --- calibration statistics ------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.up = nn.Linear(8, 12)
        self.drop = nn.Dropout(0.5)
        self.down = nn.Linear(12, 8)

    def forward(self, ids):
        return self.down(self.drop(torch.relu(self.up(self.embed(ids)))))


def test_collect_layer_stats_matches_a_hand_computation():
    torch.manual_seed(10)
    model = Tiny().train()
    batches = [torch.randint(0, 16, (2, 5)) for _ in range(3)]
    seen: dict[str, list[torch.Tensor]] = {"up": [], "down": []}
    for name, inputs in seen.items():
        model.get_submodule(name).register_forward_hook(
            lambda _m, inp, _o, into=inputs: into.append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
    stats = collect_layer_stats(model, ["up", "down"], batches, lambda m, b: m(b))
    assert model.training  # mode restored; it ran in eval (no dropout)
    for name in ("up", "down"):
        x = torch.cat(seen[name]).double()
        assert stats[name].tokens == 30
        assert torch.allclose(stats[name].hessian.double(), 2.0 / 30 * x.T @ x, rtol=1e-5, atol=1e-6)
        assert torch.allclose(stats[name].input_norm.double(), x.norm(dim=0), rtol=1e-5)
        assert stats[name].hessian.device == model.get_submodule(name).weight.device
    # a subset at a time gives the same, and the hooks are gone afterwards
    only = collect_layer_stats(model, ["down"], batches)
    assert list(only) == ["down"]
    assert torch.allclose(only["down"].hessian, stats["down"].hessian, rtol=1e-5, atol=1e-6)
    assert len(model.up._forward_hooks) == 1 and len(model.down._forward_hooks) == 1


def test_running_average_equals_one_batch():
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(11))
    one, many = LayerStats(6, dtype=torch.float64), LayerStats(6, dtype=torch.float64)
    one.add_batch(x)
    for part in x:
        many.add_batch(part)
    assert torch.allclose(one.hessian, many.hessian)
    flat = x.reshape(-1, 6).double()
    assert torch.allclose(one.hessian, 2.0 / 21 * flat.T @ flat)


def test_collect_layer_stats_rejects_bad_names():
    model = Tiny()
    with pytest.raises(ValueError, match="layer_names.*'nope'"):
        collect_layer_stats(model, ["nope"], [torch.zeros(1, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="layer_names.*Embedding"):
        collect_layer_stats(model, ["embed"], [torch.zeros(1, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="no calibration input"):
        collect_layer_stats(model, ["up"], [])


# --- levels ----------------------------------------------------------------------------------


def test_level_key_examples_and_normalisation():
    assert Level(0.5, "unstructured", 4, "sparsegpt+gptq").key == "s0.50-unstructured-sparsegpt+b4-gptq"
    assert Level(0.5, "2:4", None, "wanda").key == "s0.50-2of4-wanda"
    assert Level(bits=3, method="rtn").key == "b3-rtn"
    assert Level().key == "dense"
    assert Level(bits=4).method == "gptq" and Level(bits=4) == Level(bits=4, method="wanda+gptq")
    assert Level(0.25).method == "sparsegpt"


def test_level_keys_round_trip_and_are_unique():
    levels = [Level()]
    for s, pattern in [(0.1, "unstructured"), (0.5, "unstructured"), (0.505, "unstructured"),
                       (1e-05, "unstructured"), (0.5, "2:4"), (0.75, "1:4"), (0.5, "4:8"),
                       (2 / 3, "1:3")]:
        for sm in ("magnitude", "wanda", "sparsegpt"):
            levels.append(Level(s, pattern, None, sm))
            for bits, bm in itertools.product((2, 4, 8), ("rtn", "gptq")):
                levels.append(Level(s, pattern, bits, f"{sm}+{bm}"))
    levels += [Level(bits=b, method=m) for b in (2, 3, 4, 8) for m in ("rtn", "gptq")]
    keys = [level.key for level in levels]
    assert len(set(keys)) == len(keys)
    for level, key in zip(levels, keys):
        assert re.fullmatch(r"[a-z0-9.+-]+", key), key
        assert Level.from_key(key) == level
    assert Level(1 - 1 / 3, "1:3").key == Level(2 / 3, "1:3").key


@pytest.mark.parametrize("kwargs, argument", [
    ({"sparsity": 1.2}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": 0.3, "pattern": "2:4"}, "sparsity"),
    ({"sparsity": 0.5, "pattern": "2-4"}, "pattern"),
    ({"sparsity": 0.5, "pattern": "4:2"}, "pattern"),
    ({"bits": 0}, "bits"),
    ({"bits": 4.0}, "bits"),
    ({"bits": 4, "method": "obs"}, "method"),
    ({"bits": 4, "method": "wanda"}, "method"),
    ({"sparsity": 0.5, "method": "gptq"}, "method"),
    ({"sparsity": 0.5, "method": "wanda+magnitude"}, "method"),
])
def test_bad_level_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Level(**kwargs)


def test_bad_compressor_arguments_name_the_argument():
    w = torch.randn(8, 32)
    grid = UniformGrid(4, 16)
    with pytest.raises(ValueError, match="key"):
        Level.from_key("s0.5-unstructured-wanda")  # not canonical: 0.50
    with pytest.raises(ValueError, match="key"):
        Level.from_key("junk")
    with pytest.raises(ValueError, match="pattern"):
        magnitude_mask(w, 0.5, "2:3:4")
    with pytest.raises(ValueError, match="pattern"):
        magnitude_mask(torch.randn(8, 30), 0.5, "2:4")  # 30 columns: not a multiple of 4
    with pytest.raises(ValueError, match="input_norm"):
        wanda_mask(w, torch.ones(31), 0.5, "unstructured")
    with pytest.raises(ValueError, match="hessian"):
        gptq(w, torch.eye(16), grid)
    with pytest.raises(ValueError, match="mask"):
        gptq(w, torch.eye(32), grid, mask=torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="percdamp"):
        sparsegpt(w, torch.eye(32), 0.5, "unstructured", percdamp=0.0)
    with pytest.raises(ValueError, match="block"):
        gptq(w, torch.eye(32), UniformGrid(4, 64))
    with pytest.raises(ValueError, match="stats"):
        compress_weight(w, None, Level(bits=4), lambda b: grid)
    with pytest.raises(ValueError, match="grid_for_bits"):
        compress_weight(w, None, Level(bits=4, method="rtn"), None)
    with pytest.raises(ValueError, match="level"):
        compress_weight(w, None, "b4-rtn", lambda b: grid)


def test_compress_weight_dispatches_every_combination():
    w, x, _ = correlated_layer(12, rows=16, cols=64, tokens=256)
    stats = LayerStats(64)
    stats.add_batch(x)
    grids: dict[int, RecordingGrid] = {}

    def grid_for_bits(bits: int) -> RecordingGrid:
        grids[bits] = RecordingGrid(bits, 32)
        return grids[bits]

    assert torch.equal(compress_weight(w, None, Level(), grid_for_bits), w)
    for pattern, sm, bm in itertools.product(("unstructured", "2:4"), ("magnitude", "wanda",
                                                                       "sparsegpt"), ("rtn", "gptq")):
        level = Level(0.5, pattern, 4, f"{sm}+{bm}")
        q = compress_weight(w, stats, level, grid_for_bits)
        assert torch.isfinite(q).all() and q.dtype == torch.float32
        assert int((q == 0).sum()) >= w.numel() // 2, level.key
        if pattern == "2:4":
            assert_nm(q != 0, 2, 4, rounded=True)
        assert_on_fitted_grid(q, grids[4])
        sparse_only = compress_weight(w, stats, Level(0.5, pattern, None, sm), grid_for_bits)
        assert int((sparse_only == 0).sum()) == w.numel() // 2
    keep = magnitude_mask(w, 0.5, "unstructured")
    assert torch.equal(compress_weight(w, None, Level(0.5, method="magnitude"), None),
                       torch.where(keep, w, 0.0))
    assert torch.equal(compress_weight(w, stats, Level(bits=3), grid_for_bits),
                       gptq(w, stats.hessian, UniformGrid(3, 32)))
    assert torch.equal(compress_weight(w, None, Level(bits=3, method="rtn"), grid_for_bits),
                       round_to_nearest(w, UniformGrid(3, 32)))
    assert torch.equal(compress_weight(w, stats, Level(0.5, bits=4), grid_for_bits),
                       sparsegpt(w, stats.hessian, 0.5, grid=UniformGrid(4, 32)))


def test_rtn_fast_path_equals_the_column_loop():
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(13)) * 3
    grid = UniformGrid(3, 32)
    by_column = torch.empty_like(w)
    for start in range(0, 96, 32):
        params = grid.fit(w[:, start : start + 32])
        for i in range(32):
            by_column[:, start + i] = grid.quantize_column(w[:, start + i], params, i)
    assert torch.equal(round_to_nearest(w, grid), by_column)
