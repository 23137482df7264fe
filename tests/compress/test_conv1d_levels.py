"""transformers' Conv1D (GPT-2's layers, weight stored [in, out]) in the one-shot path: its
calibration statistics, level entries (RTN, GPTQ, SparseGPT, Wanda, magnitude) and GGUF bytes are
exactly those of the equivalent nn.Linear, and a tiny GPT-2's level database round-trips:
weights read back, stitched and assembled into the Conv1D layers, the dense model restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from autosparse.compress.oneshot.calibration import collect_layer_stats
from autosparse.compress.oneshot.database import LevelDatabase, assemble, build_level_database
from autosparse.compress.oneshot.gguf_grids import grid_for_bits
from autosparse.compress.oneshot.layer_weights import (
    is_conv1d,
    is_oneshot_layer,
    layer_weight,
    swap_layer_weight,
)
from autosparse.compress.oneshot.levels import Level, compress_weight
from autosparse.compress.oneshot.search_levels import (
    OneShotScoring,
    check_linear,
    stitched,
    stored_bytes,
)
from autosparse.config.sections import OneShotConfig
from autosparse.config.validation import ConfigError
from autosparse.space.candidate import LayerChoice
from autosparse.workload.task_builtins import tiny_gpt2

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
pytestmark = pytest.mark.usefixtures("one_thread")

# block-32 types only (the layers are 64 wide): GPTQ and RTN Q8_0, Q5_0, SparseGPT+GPTQ Q4_0,
# Wanda and magnitude sparsity (F32 values)
LEVELS = [Level(bits=8), Level(bits=8, method="rtn"), Level(bits=5, method="rtn"),
          Level(sparsity=0.5, bits=4), Level(sparsity=0.5, method="wanda"),
          Level(sparsity=0.5, pattern="2:4", method="magnitude")]


class TwoLayer(nn.Module):
    """Embedding -> layer 64->128 -> GELU -> layer 128->64 -> logits, with either nn.Linear or
    Conv1D layers holding the same weights."""

    def __init__(self, conv: bool, source: TwoLayer | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(256, 64)
        self.up = Conv1D(128, 64) if conv else nn.Linear(64, 128)
        self.down = Conv1D(64, 128) if conv else nn.Linear(128, 64)
        if source is not None:
            with torch.no_grad():
                self.embed.weight.copy_(source.embed.weight)
                for mine, theirs in ((self.up, source.up), (self.down, source.down)):
                    layer_weight(mine).copy_(layer_weight(theirs))
                    mine.bias.copy_(theirs.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(self.embed(ids)))) @ self.embed.weight.T


def windows() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


def test_helpers_read_and_write_out_in():
    linear = TwoLayer(conv=False)
    conv = TwoLayer(conv=True, source=linear)
    assert is_conv1d(conv.up) and not is_conv1d(linear.up) and is_oneshot_layer(conv.up)
    assert not is_oneshot_layer(conv.embed) and not is_oneshot_layer(None)
    assert layer_weight(conv.up).shape == linear.up.weight.shape == (128, 64)
    assert torch.equal(layer_weight(conv.up), linear.up.weight)
    ids = windows()
    assert torch.allclose(conv(ids), linear(ids), atol=1e-5)
    new = torch.randn(128, 64)
    old = swap_layer_weight(conv.up, new)
    assert torch.equal(layer_weight(conv.up), new) and conv.up.weight.is_contiguous()
    conv.up.weight.data = old
    assert torch.equal(layer_weight(conv.up), linear.up.weight)
    with pytest.raises(ValueError, match="Embedding is not a Linear or transformers Conv1D"):
        layer_weight(conv.embed)


def test_conv1d_compresses_bit_for_bit_as_the_equivalent_linear(tmp_path: Path):
    linear = TwoLayer(conv=False)
    conv = TwoLayer(conv=True, source=linear)
    names = ["up", "down"]
    s_lin = collect_layer_stats(linear, names, windows().split(4))
    s_conv = collect_layer_stats(conv, names, windows().split(4))
    for name in names:
        assert s_conv[name].in_features == s_lin[name].in_features
        assert torch.allclose(s_conv[name].hessian, s_lin[name].hessian, rtol=1e-5, atol=1e-6)
    # on the same statistics, every compressor gives the same weights from either layout
    for level in LEVELS:
        grids = lambda bits, lv=level: grid_for_bits(bits, exact_zero=lv.sparsity > 0)  # noqa: E731
        same = compress_weight(layer_weight(conv.down).detach().contiguous(), s_lin["down"],
                               level, grids)
        assert torch.equal(same, compress_weight(linear.down.weight.detach(), s_lin["down"],
                                                 level, grids)), level.key

    dbs = {}
    for kind, model in (("linear", linear), ("conv", conv)):
        build_level_database(model, names, LEVELS, windows(), tmp_path / kind, batch_size=4)
        dbs[kind] = LevelDatabase(tmp_path / kind, model=model, calibration_windows=windows())
    for name in names:
        assert dbs["conv"].shape(name) == dbs["linear"].shape(name) == tuple(
            linear.get_submodule(name).weight.shape)
        for level in [Level(), *LEVELS]:
            w_conv, w_lin = dbs["conv"].weight(name, level), dbs["linear"].weight(name, level)
            assert dbs["conv"].stored_bytes(name, level) == dbs["linear"].stored_bytes(name, level)
            # "down"'s input comes out of a Conv1D matmul vs a Linear one, which a BLAS may
            # round differently in the last bit: its Hessian-driven levels are only close
            if name == "up" or level.method in ("none", "rtn", "magnitude"):
                assert torch.equal(w_conv, w_lin), (name, level.key)
                assert dbs["conv"].packed(name, level) == dbs["linear"].packed(name, level)
            else:
                assert (w_conv - w_lin).abs().max() <= 0.05 * w_lin.abs().max(), level.key


def test_tiny_gpt2_level_database_round_trip(tmp_path: Path):
    model = tiny_gpt2(vocab=256, length=32, width=64, layers=2, heads=2)
    names = [n for n, m in model.named_modules() if is_conv1d(m)]
    assert len(names) == 8
    check_linear(model, names)  # accepted
    with pytest.raises(ConfigError, match="not a Linear"):
        check_linear(model, ["transformer.wte"])
    levels = {n: [Level(bits=8), Level(sparsity=0.5, bits=4)] for n in names}
    info = build_level_database(model, names, levels, windows(), tmp_path, batch_size=4)
    assert info.built == 16
    db = LevelDatabase(tmp_path, model=model, calibration_windows=windows())
    modules = dict(model.named_modules())
    for name in names:
        assert db.shape(name) == tuple(modules[name].weight.shape[::-1])  # [out, in]
        assert torch.equal(db.weight(name, Level()), modules[name].weight.T)

    assignment = {n: levels[n][i % 2] for i, n in enumerate(names)}
    candidate = stitched(model, db, assignment)
    stitched_modules = dict(candidate.named_modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = windows()[:2]
    with torch.no_grad(), assemble(model, db, assignment):
        for name, level in assignment.items():
            assert torch.equal(layer_weight(modules[name]), db.weight(name, level))
            assert torch.equal(layer_weight(stitched_modules[name]), db.weight(name, level))
        inside = model(ids).logits
    with torch.no_grad():
        assert torch.allclose(inside, candidate(ids).logits, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the sensitivity's swap-in tensors are in the module's own [in, out] layout
    scoring = OneShotScoring(db, OneShotConfig(bits_method="gptq"), None, None)
    swapped = scoring.layer_tensors(names[:1], LayerChoice.make("dense", 0.0, 8))[names[0]]
    assert swapped["weight"].shape == modules[names[0]].weight.shape
    assert torch.equal(swapped["weight"].t(), db.weight(names[0], Level(bits=8)))
    # the GGUF size: packed levels + every other parameter at F32 (the tied head once)
    searched = sum(db.stored_bytes(n, lv) for n, lv in assignment.items())
    others = sum(p.numel() * 4 for n, p in model.named_parameters()
                 if n.removesuffix(".weight") not in assignment)
    assert stored_bytes(model, db, assignment) == searched + others
