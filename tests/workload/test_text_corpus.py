"""Token sets from local text (``workload.text_corpus``) and the LLM benchmark's trainer
(``benchmarks/llm_model.py``): splits by whole files and stable hashes, byte tokens, seeded
non-overlapping windows, hand-checked perplexity, and a few tiny training steps."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from autosparse.config.validation import ConfigError
from autosparse.workload.text_corpus import (
    DEFAULT_FRACTIONS,
    ByteTokenizer,
    load_tokenizer,
    next_token_logprobs,
    perplexity,
    read_tokens,
    split_files,
    stdlib_root,
    stdlib_source_files,
    text_token_sets,
    token_windows,
)
from helpers import llm_model

ROOT = Path(__file__).resolve().parents[2]




@pytest.fixture
def corpus(tmp_path: Path) -> list[Path]:
    """60 small files in nested folders, each a different length of Python-like text."""
    files = []
    for i in range(60):
        path = tmp_path / f"pkg{i % 4}" / f"mod_{i}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(20 + i)))
        files.append(path)
    return files


# ------------------------------------------------------------------------------- splitting


def test_splits_disjoint_covering_and_stable_under_reordering(corpus, tmp_path):
    splits = split_files(corpus, tmp_path)
    assert list(splits) == list(DEFAULT_FRACTIONS)
    seen = [p for files in splits.values() for p in files]
    assert sorted(seen) == sorted(corpus) and len(seen) == len(set(seen))  # each file once
    assert all(splits[name] for name in ("train", "test"))  # 60 files reach the big ones
    shuffled = corpus[:]
    random.Random(3).shuffle(shuffled)
    assert split_files(shuffled, tmp_path) == splits
    # a file's split is its own: dropping other files moves nothing
    fewer = split_files(corpus[::2], tmp_path)
    for name, files in fewer.items():
        assert set(files) <= set(splits[name])


def test_split_follows_the_relative_path_not_the_root(corpus, tmp_path):
    """The same tree at another place splits the same way (hash of the relative path)."""
    moved = tmp_path / "elsewhere"
    copies = []
    for path in corpus:
        target = moved / path.relative_to(tmp_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        copies.append(target)
    a = split_files(corpus, tmp_path)
    b = split_files(copies, moved)
    assert {k: [p.relative_to(tmp_path) for p in v] for k, v in a.items()} == \
        {k: [p.relative_to(moved) for p in v] for k, v in b.items()}


def test_split_fractions_are_checked(corpus, tmp_path):
    with pytest.raises(ConfigError, match="sum to 1"):
        split_files(corpus, tmp_path, {"train": 0.5, "test": 0.3})
    with pytest.raises(ConfigError, match="not inside"):
        split_files(corpus, tmp_path / "pkg0")
    everything = split_files(corpus, tmp_path, {"train": 1.0, "test": 0.0})
    assert len(everything["train"]) == len(corpus) and everything["test"] == []


def test_stdlib_files_exclude_installed_packages_and_tests():
    root = stdlib_root()
    files = stdlib_source_files()
    assert files and files == sorted(files, key=lambda p: p.relative_to(root).as_posix())
    for path in files:
        parts = path.relative_to(root).parts
        assert "site-packages" not in parts and "dist-packages" not in parts
        assert not {"test", "tests", "idle_test"} & set(parts[:-1])
    assert any(p.name == "os.py" for p in files)


# ------------------------------------------------------------------------- tokens and windows


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    text = "def naïve(x):\n    return 'π' * x  # ✓\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256 and len(tok) == 256
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # half a character: replaced, no error
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(b"x = 1\n")
    b.write_bytes(b"caf\xe9 = 2\n")  # latin-1: the byte tokenizer keeps it byte-exact
    tokens = read_tokens([a, b], tok)
    assert tokens.dtype == torch.long
    assert bytes(tokens.tolist()) == b"x = 1\n\n\ncaf\xe9 = 2\n"


def test_windows_deterministic_in_range_and_non_overlapping():
    tokens = torch.arange(10_000) % 256
    w = token_windows(tokens, seq_len=64, count=100, seed=7)
    assert w.shape == (100, 64) and w.dtype == torch.long
    assert torch.equal(w, token_windows(tokens, seq_len=64, count=100, seed=7))
    assert not torch.equal(w, token_windows(tokens, seq_len=64, count=100, seed=8))
    positions = torch.arange(10_000)
    starts = token_windows(positions, seq_len=64, count=100, seed=7)[:, 0]
    spans = token_windows(positions, seq_len=64, count=100, seed=7)
    assert torch.equal(spans, starts[:, None] + torch.arange(64))  # contiguous text
    assert int(spans.min()) >= 0 and int(spans.max()) < 10_000
    assert spans.flatten().unique().numel() == 100 * 64  # no token in two windows
    exact = token_windows(positions[:640], seq_len=64, count=10, seed=0)
    assert sorted(exact.flatten().tolist()) == list(range(640))  # a full fit still works


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"1,000 tokens, too short for 10 .* windows of 128"):
        token_windows(torch.zeros(1000, dtype=torch.long), seq_len=128, count=10, seed=0)


def test_text_token_sets_from_globs(corpus, tmp_path):
    sets = text_token_sets([str(tmp_path / "pkg*" / "*.py")], ByteTokenizer(), seq_len=32,
                           counts={"calibration": 2, "validation": 2, "test": 4}, seed=1,
                           fractions={"train": 0.4, "calibration": 0.2, "validation": 0.2,
                                      "test": 0.2})
    assert sets.calibration.shape == (2, 32) and sets.test.shape == (4, 32)
    assert sum(sets.files.values()) == len(corpus) and sets.vocab_size == 256
    assert sets.fingerprint
    with pytest.raises(ConfigError, match="test split"):
        text_token_sets([str(tmp_path / "pkg*" / "*.py")], ByteTokenizer(), seq_len=32,
                        counts={"calibration": 1, "validation": 1, "test": 10**6}, seed=1)
    with pytest.raises(ConfigError, match="matches no file"):
        text_token_sets([str(tmp_path / "nothing" / "*.py")], ByteTokenizer(), 32,
                        {"calibration": 1, "validation": 1, "test": 1})


# --------------------------------------------------------------------------------- tokenizers


def test_load_tokenizer_bytes_and_missing_tokenizer(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    empty = tmp_path / "model-without-tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model-without-tokenizer holds no tokenizer"):
        load_tokenizer(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    ByteTokenizer().save_pretrained(empty)
    assert isinstance(load_tokenizer(empty), ByteTokenizer)


# ------------------------------------------------------------------------------------ scoring


class _Uniform(torch.nn.Module):
    """Logits all equal: every next token has probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab) + 0 * self.anchor


def test_uniform_model_perplexity_is_the_vocabulary_size():
    windows = torch.randint(0, 256, (5, 17), generator=torch.Generator().manual_seed(0))
    model = _Uniform(256)
    model.train()
    # NLL = log 256 at every predicted token, so exp(mean NLL) = 256
    assert perplexity(model, windows, batch_size=2) == pytest.approx(256.0, rel=1e-6)
    assert model.training  # the caller's mode is restored
    logprobs = next_token_logprobs(model, windows, batch_size=3)
    assert logprobs.shape == (5, 17, 256)
    assert torch.allclose(logprobs, torch.full_like(logprobs, -math.log(256)))


def test_perplexity_by_hand_on_a_two_token_model():
    """A model certain of token 1 with probability 3/4 over a vocabulary of 2."""
    class Fixed(torch.nn.Module):
        def forward(self, ids):
            return torch.tensor([0.0, math.log(3.0)]).expand(*ids.shape, 2)

    windows = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    # predicted tokens: 1, 1, 0 and 1, 1, 1 -> five of p=3/4, one of p=1/4
    expected = math.exp(-(5 * math.log(0.75) + math.log(0.25)) / 6)
    assert perplexity(Fixed(), windows) == pytest.approx(expected)


# ----------------------------------------------------------------------- the benchmark's LM


def test_tiny_training_reduces_the_loss(one_thread):
    bench = llm_model()
    spec = bench.LMSpec(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, seq_len=32,
                        batch_size=8, lr=3e-3, warmup_steps=3, steps=30, minutes=None)
    text = ("def add(a, b):\n    return a + b\n\n" * 200).encode()
    tokens = torch.tensor(list(text))
    model = bench.build_model(spec)
    assert model.config.vocab_size == 256 and not model.config.tie_word_embeddings
    windows = token_windows(tokens, 32, 8, seed=0)
    before = perplexity(model, windows)
    figures = bench.train_model(model, tokens, spec, log=lambda _: None)
    after = perplexity(model, windows)
    assert figures["steps"] == 30 and figures["tokens"] == 30 * 8 * 32
    assert figures["loss_curve"][-1][3] < figures["loss_curve"][0][3]
    assert after < before / 2, (before, after)


def test_train_or_load_caches_a_loadable_folder(corpus, tmp_path, one_thread):
    bench = llm_model()
    spec = bench.LMSpec(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, seq_len=16,
                        batch_size=4, warmup_steps=1, steps=2, minutes=None, eval_windows=2,
                        source=(str(tmp_path / "pkg*" / "*.py"),))
    logs: list[str] = []
    folder, info = bench.train_or_load(spec, tmp_path / "runs", log=logs.append)
    assert not info["cached"] and info["train"]["steps"] == 2
    assert folder.parent.name == info["hash"] and (folder.parent / "train.json").is_file()
    assert json.loads((folder.parent / "train.json").read_text())["spec"] == spec.key()
    assert not (folder.parent / "checkpoint.pt").exists()
    assert isinstance(load_tokenizer(folder), ByteTokenizer)
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(folder)
    assert loaded.config.num_key_value_heads == 2
    again_folder, again = bench.train_or_load(spec, tmp_path / "runs", log=logs.append)
    assert again_folder == folder and again["cached"]
    assert again["test_perplexity"] == info["test_perplexity"]
    other, _ = bench.train_or_load(dataclasses.replace(spec, seed=1), tmp_path / "runs",
                                   log=logs.append)
    assert other != folder  # the seed is part of the hash


def test_full_config_fits_gguf_k_quants():
    """Every linear layer's input width of the benchmark's size is a multiple of 256."""
    bench = llm_model()
    config = bench.llama_config(bench.LMSpec())
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert widths and all(w % 256 == 0 for w in widths), widths
    assert config.max_position_embeddings >= 256 and config.vocab_size == 256


def test_learning_rate_warms_up_then_decays_to_the_floor():
    bench = llm_model()
    spec = bench.LMSpec(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, warmup_fraction=0.05)
    assert bench.learning_rate(spec, 0, 0.0) == pytest.approx(1e-5)  # step 1 of 100
    assert bench.learning_rate(spec, 99, 0.01) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * 0.01))))
    # a slow machine: 5% of the budget spent after 10 steps ends the warmup anyway
    assert bench.learning_rate(spec, 9, 0.05) > 0.99e-3
    assert bench.learning_rate(spec, 10_000, 1.0) == pytest.approx(1e-4)
