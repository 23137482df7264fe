"""The level database and the KL fitness: entries read back bitwise as ``compress_weight`` made
them (and as the GGUF bytes dequantize), stored sizes are the GGUF sizes, candidates assemble
and restore the dense model bitwise, a build killed with SIGKILL resumes with nothing rebuilt or
lost, a database for other weights refuses to open, and KL matches hand computations."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from torch import nn

from autosparse.compress.oneshot.calibration import collect_layer_stats
from autosparse.compress.oneshot.database import (
    DatabaseMismatch,
    LevelDatabase,
    assemble,
    build_level_database,
)
from autosparse.compress.oneshot.fitness import (
    CandidateScorer,
    DenseReference,
    kl_fitness,
    layer_sensitivity,
    successive_halving,
    token_stages,
)
from autosparse.compress.oneshot.gguf_grids import grid_for_bits, stored_bytes
from autosparse.compress.oneshot.levels import Level, compress_weight
from autosparse.workload.text_corpus import stdlib_root
from helpers import llm_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
BITS = {b: Level(bits=b, method="rtn") for b in (2, 4, 8)}
# every entry kind: GGUF with mins (Q4_K) and symmetric (Q4_0 for sparse, Q3_K), sparse F32
EXTRA = [Level(bits=4), Level(sparsity=0.5), Level(sparsity=0.5, bits=4),
         Level(sparsity=0.5, pattern="2:4", bits=3, method="wanda+rtn"),
         Level(sparsity=0.5, method="magnitude")]
# block-32 grids only, for the 64-wide model: Q8_0, Q5_0, sparse F32, sparse Q4_0
SMALL_LEVELS = [Level(bits=8), Level(bits=5, method="rtn"), Level(sparsity=0.5),
                Level(sparsity=0.5, bits=4)]




def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def byte_tokens(*names: str) -> torch.Tensor:
    data = b"\n\n".join((stdlib_root() / n).read_bytes() for n in names)
    return torch.tensor(list(data), dtype=torch.long)


def windows_of(tokens: torch.Tensor, count: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq, (count,), generator=g)
    return tokens[starts[:, None] + torch.arange(seq)]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


@pytest.fixture(scope="module")
def lm():
    """2 layers x 256 wide (K-quant blocks fit every input), trained 40 steps on stdlib text."""
    torch.set_num_threads(1)
    mod = llm_model()
    model = mod.build_model(mod.LMSpec(**{**mod.TINY, "hidden": 256, "intermediate": 256}))
    train = byte_tokens("argparse.py", "textwrap.py")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        batch = mod.random_batch(train, 64, 8, g)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calibration = windows_of(byte_tokens("json/encoder.py", "json/decoder.py"), 16, 64, seed=1)
    return model, calibration


@pytest.fixture(scope="module")
def db(lm, tmp_path_factory):
    model, calibration = lm
    names = linear_names(model)
    extra = {names[0], names[-1]}  # q_proj of block 0 and down_proj of block 1
    levels = {n: list(BITS.values()) + (EXTRA if n in extra else []) for n in names}
    root = tmp_path_factory.mktemp("levels")
    info = build_level_database(model, names, levels, calibration, root)
    assert info.built == info.entries == 3 * len(names) + 2 * len(EXTRA) and info.missing == 0
    return LevelDatabase(root, model=model, calibration_windows=calibration)


@pytest.fixture(scope="module")
def scorer(lm, db):
    model, calibration = lm
    return CandidateScorer(model, db, DenseReference(model, calibration, batch_size=8))


# ------------------------------------------------------------------------------ the database


def test_entries_read_back_bitwise_as_compressed_and_as_their_gguf_bytes(lm, db):
    model, calibration = lm
    modules = dict(model.named_modules())
    for name in (db.layers[0], db.layers[-1]):
        stats = collect_layer_stats(model, [name], calibration.split(8))[name]
        weight = modules[name].weight.detach()
        rows, cols = weight.shape
        for level in [*BITS.values(), *EXTRA]:
            sparse = level.sparsity > 0
            want = compress_weight(weight, stats, level, lambda b, s=sparse: grid_for_bits(b, exact_zero=s))
            got = db.weight(name, level)
            assert got.dtype == torch.float32 and bitwise_equal(got, want), (name, level.key)
            data, qtype = db.packed(name, level)
            assert db.stored_bytes(name, level) == len(data)
            read = dequantize(np.frombuffer(data, dtype=np.uint8).reshape(rows, -1), qtype)
            assert bitwise_equal(torch.from_numpy(np.array(read)), want)
            if level.bits is None:  # GGUF stores sparsity dense: the F32 tensor
                assert qtype.name == "F32" and len(data) == rows * cols * 4
                assert db.path(name, level).stat().st_size < rows * cols * 4 * 0.6  # mask + values
            else:
                grid = grid_for_bits(level.bits, exact_zero=sparse)
                assert qtype.name == grid.name == db.header(name, level)["ggml_type"]
                assert len(data) == stored_bytes(grid, rows, cols)
    assert db.header(db.layers[0], Level(sparsity=0.5, bits=4))["ggml_type"] == "Q4_0"  # exact zero
    dense, qtype = db.packed(db.layers[0], Level())
    assert qtype.name == "F32" and dense == modules[db.layers[0]].weight.detach().numpy().tobytes()


def test_fp16_model_stores_sparse_values_as_f16(tmp_path):
    mod = llm_model()
    model = mod.build_model(mod.LMSpec(**mod.TINY)).half()
    names = linear_names(model)[:2]
    windows = torch.zeros(2, 8, dtype=torch.long)
    level = Level(sparsity=0.5, method="magnitude")  # needs no statistics: no fp16 forward
    build_level_database(model, names, [level], windows, tmp_path)
    db = LevelDatabase(tmp_path, model=model)
    weight = dict(model.named_modules())[names[0]].weight.detach()
    rows, cols = weight.shape
    assert db.header(names[0], level)["values"] == "F16"
    assert bitwise_equal(db.weight(names[0], level), compress_weight(weight, None, level, None))
    data, qtype = db.packed(names[0], level)
    assert qtype.name == "F16" and len(data) == db.stored_bytes(names[0], level) == rows * cols * 2
    assert db.path(names[0], level).stat().st_size < rows * cols * 2 * 0.6 + 400  # + header
    assert db.stored_bytes(names[0], Level()) == rows * cols * 2


def test_sparse_two_bit_level_is_refused_before_any_work(lm, tmp_path):
    model, calibration = lm
    with pytest.raises(ValueError, match="no exact zero"):
        build_level_database(model, linear_names(model)[:1], [Level(sparsity=0.5, bits=2)],
                             calibration, tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_assemble_writes_levels_and_restores_the_dense_model_bitwise(lm, db):
    model, _ = lm
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    names = db.layers
    assignment = {names[0]: EXTRA[2], names[1]: BITS[2], names[2]: Level()}
    modules = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="inside"), assemble(model, db, assignment):
        assert bitwise_equal(modules[names[0]].weight, db.weight(names[0], EXTRA[2]))
        assert bitwise_equal(modules[names[1]].weight, db.weight(names[1], BITS[2]))
        assert not bitwise_equal(modules[names[1]].weight, before[f"{names[1]}.weight"][0])
        assert modules[names[2]].weight.data_ptr() == before[f"{names[2]}.weight"][1]
        raise RuntimeError("inside")
    for n, p in model.named_parameters():
        assert bitwise_equal(p, before[n][0]) and p.data_ptr() == before[n][1], n
    with pytest.raises(ValueError, match="not a Linear"):
        assemble(model, db, {"model.norm": BITS[4]})


def test_a_database_for_other_weights_or_tokens_refuses_to_open(lm, db, tmp_path):
    model, calibration = lm
    other = llm_model().build_model(llm_model().LMSpec(**{**llm_model().TINY, "hidden": 256,
                                                          "intermediate": 256}))
    other.load_state_dict(model.state_dict())
    name = "model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        other.get_parameter(name).mul_(1.01)
    with pytest.raises(DatabaseMismatch, match=r"weights differ: model\.layers\.1\.mlp\.up_proj"):
        LevelDatabase(db.root, model=other)
    with pytest.raises(DatabaseMismatch, match="calibration tokens"):
        LevelDatabase(db.root, model=model, calibration_windows=calibration[:8])
    with pytest.raises(DatabaseMismatch, match="percdamp 0.01 -> 0.1"):
        build_level_database(model, db.layers[:1], [BITS[4]], calibration, db.root, percdamp=0.1)
    with pytest.raises(DatabaseMismatch, match="weights differ"):
        build_level_database(other, db.layers[:1], [BITS[4]], calibration, db.root)
    with pytest.raises(FileNotFoundError, match="no level database"):
        LevelDatabase(tmp_path)


CHILD = """
import importlib.util, sys, time, torch
torch.set_num_threads(1)
repo, root, state = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("bench_llm", repo + "/benchmarks/llm_model.py")
lm = sys.modules["bench_llm"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm)
from autosparse.compress.oneshot.database import build_level_database
from autosparse.compress.oneshot.levels import Level
saved = torch.load(state)
model = lm.build_model(lm.LMSpec(**lm.TINY)); model.load_state_dict(saved["model"])
def progress(done, total, layer, level, seconds):
    if done == 5:
        print("KILLME", total, flush=True)
        time.sleep(300)
levels = [Level.from_key(k) for k in saved["levels"]]
build_level_database(model, saved["names"], levels, saved["windows"], root, layers_at_once=2,
                     progress=progress)
"""


def test_a_killed_build_resumes_with_nothing_rebuilt_or_lost(tmp_path):
    mod = llm_model()
    model = mod.build_model(mod.LMSpec(**mod.TINY)).eval()
    names = linear_names(model)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    torch.save({"model": model.state_dict(), "windows": windows, "names": names,
                "levels": [lv.key for lv in SMALL_LEVELS]}, tmp_path / "state.pt")
    root = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(root),
                              str(tmp_path / "state.pt")], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    guard = threading.Timer(120, child.kill)
    guard.start()
    try:
        line = child.stdout.readline()
        assert line.startswith("KILLME"), line
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        guard.cancel()
        child.stdout.close()
    total = len(names) * len(SMALL_LEVELS)
    assert int(line.split()[1]) == total
    entries = sorted((root / "entries").rglob("*.lvl"))
    assert len(entries) == 5
    mtimes = {p: p.stat().st_mtime_ns for p in entries}
    db = LevelDatabase(root, model=model, calibration_windows=windows)
    assert len(db.missing()) == total - 5
    with pytest.raises(KeyError, match="not built"):
        db.weight(names[-1], SMALL_LEVELS[0])
    stale = entries[0].parent / f".{entries[0].name}.999999.tmp"
    stale.write_bytes(b"half an entry")

    info = build_level_database(model, names, SMALL_LEVELS, windows, root, layers_at_once=2)
    assert info.built == total - 5 and info.entries == total and info.missing == 0
    assert {p: p.stat().st_mtime_ns for p in entries} == mtimes and not stale.exists()
    again = build_level_database(model, names, SMALL_LEVELS, windows, root)
    assert again.built == 0 and again.stats_seconds == 0

    whole = build_level_database(model, names, SMALL_LEVELS, windows, tmp_path / "whole")
    assert whole.entries == total and whole.stored_bytes == info.stored_bytes
    resumed = LevelDatabase(root, model=model)
    fresh = LevelDatabase(tmp_path / "whole", model=model)
    for name in names:
        for level in SMALL_LEVELS:
            assert resumed.packed(name, level) == fresh.packed(name, level), (name, level.key)
            assert bitwise_equal(resumed.weight(name, level), fresh.weight(name, level))


# ---------------------------------------------------------------------------------- fitness


class Table(nn.Module):
    """A 'language model' whose logits depend only on the position: ``table[seq, vocab]``."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(probs).log())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[: ids.shape[1]].expand(ids.shape[0], -1, -1)


def test_kl_matches_a_hand_computation_and_skips_the_last_position():
    p = [[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]
    q = [[0.25, 0.5, 0.25], [0.2, 0.3, 0.5], [0.25, 0.5, 0.25], [0.25, 0.5, 0.25], [1e-6, 0.5, 0.5]]
    windows = torch.zeros(3, 5, dtype=torch.long)  # 4 predicted tokens a window
    # KL([.5,.25,.25] || [.25,.5,.25]) = .5 ln 2 + .25 ln .5 = .25 ln 2 at 3 of 4 positions
    expect = 3 / 4 * 0.25 * math.log(2)
    reference = DenseReference(Table(p), windows, batch_size=2)
    assert kl_fitness(Table(q), reference) == pytest.approx(expect, rel=1e-6)
    assert kl_fitness(Table(q), reference, n_windows=1) == pytest.approx(expect, rel=1e-6)
    assert kl_fitness(Table(p), reference) == 0.0
    # top-1 + rest: bins (token 0, other) = (.5, .5) vs (.25, .75)
    top1 = DenseReference(Table(p), windows, batch_size=2, top_k=1)
    coarse = 3 / 4 * (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert kl_fitness(Table(q), top1) == pytest.approx(coarse, rel=1e-6)
    assert top1.nbytes == 3 * 4 * (4 + 4 + 4) and reference.nbytes == 3 * 4 * 3 * 4
    with pytest.raises(ValueError, match="n_windows"):
        kl_fitness(Table(q), reference, n_windows=4)


def test_kl_is_zero_for_dense_and_grows_as_bits_fall(scorer, db):
    assert scorer.score({}) == 0.0
    assert scorer.score({n: Level() for n in db.layers}) == 0.0
    kl = {b: scorer.score({n: level for n in db.layers}) for b, level in BITS.items()}
    assert kl[2] > kl[4] > kl[8] > 0, kl
    evaluations, tokens = scorer.evaluations, scorer.tokens
    assert scorer.score({n: BITS[4] for n in db.layers}) == kl[4]  # cached
    assert (scorer.evaluations, scorer.tokens) == (evaluations, tokens) and scorer.cache_hits >= 1
    top = DenseReference(scorer.model, scorer.reference.windows, batch_size=8, top_k=8)
    with assemble(scorer.model, db, {n: BITS[2] for n in db.layers}):
        coarse = kl_fitness(scorer.model, top)
    assert 0 < coarse <= kl[2]  # the (k + 1)-bin KL is a lower bound


class KnownScorer:
    """KL = the candidate's true value + an error that shrinks with the tokens scored."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def score(self, assignment, n_windows=None):
        name = assignment["id"]
        self.calls.append((name, n_windows))
        true, noise = {"a": (1.0, 0.0), "b": (2.0, -1.5), "c": (3.0, 0.0), "d": (1.5, 0.0),
                       "e": (4.0, 0.0), "f": (1.2, 0.5)}[name]
        return true + noise / n_windows


def test_successive_halving_keeps_the_best_of_a_known_set():
    scorer = KnownScorer()
    candidates = [{"id": c} for c in "abcdef"]
    # stage 1 (1 window): b 0.5, a 1.0, d 1.5, f 1.7, c 3, e 4 -> keep b, a, d, f
    # stage 2 (4 windows): a 1.0, f 1.325, d 1.5, b 1.625 -> keep a, f; stage 3: a
    result = successive_halving(scorer, candidates, stages=((1, 4), (4, 2), (16, 1)))
    assert result == [({"id": "a"}, 1.0)]
    assert [n for _, n in scorer.calls] == [1] * 6 + [4] * 4 + [16] * 2
    assert token_stages(65, 512) == ((32, 16), (256, 4), (512, 1))
    with pytest.raises(ValueError, match="stages"):
        successive_halving(scorer, candidates, stages=((0, 1),))


def test_successive_halving_on_real_candidates_and_layer_sensitivity_resumes(scorer, db, tmp_path):
    names = db.layers
    candidates = [{n: BITS[2] for n in names}, {n: BITS[8] for n in names},
                  {n: BITS[4] for n in names}, {names[0]: BITS[2]}]
    best = successive_halving(scorer, candidates, stages=((8, 2), (16, 1)))
    assert best[0][0] == candidates[1]

    path = tmp_path / "sensitivity.json"
    layers = names[:2]
    fresh = CandidateScorer(scorer.model, db, scorer.reference)
    kl = layer_sensitivity(fresh, layers, [Level(), BITS[2], BITS[4]], 8, path=path)
    assert set(kl) == {(n, lv.key) for n in layers for lv in (Level(), BITS[2], BITS[4])}
    assert fresh.evaluations == 4 and all(kl[(n, "dense")] == 0.0 for n in layers)
    assert all(kl[(n, BITS[2].key)] > kl[(n, BITS[4].key)] > 0 for n in layers)
    saved = json.loads(path.read_text())
    saved["kl"] = saved["kl"][:-1]  # as if killed before the last score was written
    path.write_text(json.dumps(saved))
    again = CandidateScorer(scorer.model, db, scorer.reference)
    assert layer_sensitivity(again, layers, [Level(), BITS[2], BITS[4]], 8, path=path) == kl
    assert again.evaluations == 1
    with pytest.raises(ValueError, match="another database, reference or n_windows"):
        layer_sensitivity(again, layers, [BITS[2]], 16, path=path)
