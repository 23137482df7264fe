"""Built-in data and models for the non-classification tasks: a regression MLP on sklearn's
diabetes data, and a tiny causal language model on token sequences generated here.

They exist so that a regression search and a language-model search run out of the box (and in
the tests, in seconds) with nothing downloaded; a user brings their own model and data through
``model.factory`` / ``data.factory``.

- ``data.source: sklearn-diabetes``: 442 patients, 10 standardised features; the target (disease
  progression) is standardised with the train split's mean and std, so ``mse`` 1.0 is what
  predicting the train mean scores.
- ``data.source: synthetic-tokens``: 1,200 sequences of 17 tokens over a vocabulary of 32 from a
  fixed random Markov chain (each token has 3 likely successors): x = tokens[:-1], y = tokens[1:].
  A model that learned the chain reaches a perplexity near 3; guessing uniformly scores 32.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from autosparse.config.sections import DataConfig
from autosparse.config.validation import ConfigError
from autosparse.workload.splits import DataSplits

TOKEN_VOCAB = 32
TOKEN_LENGTH = 16  # tokens a model sees (sequences are one longer: the last is only a target)
TOKEN_SEQUENCES = 1200
TOKEN_SUCCESSORS = 3
TOKEN_CHAIN_SEED = 1234  # the language itself never changes; split_seed only reshuffles


def _index_splits(n: int, cfg: DataConfig) -> list[np.ndarray]:
    """Random (unstratified) train/validation/test indices by the config's fractions."""
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    sizes = [int(round(cfg.split.train * n)), int(round(cfg.split.validation * n))]
    bounds = [0, sizes[0], sizes[0] + sizes[1], n]
    parts = [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(3)]
    if min(len(p) for p in parts) == 0:
        raise ConfigError(f"data.split: {n} samples are too few for the fractions "
                          f"{cfg.split.train:g}/{cfg.split.validation:g}/{cfg.split.test:g}")
    return parts


def _random_origin(raw: dict, parts: list[np.ndarray], cfg: DataConfig) -> dict:
    """``DataSplits.origin``: the indices into the raw samples each split used."""
    method = (f"random (unstratified): fractions {cfg.split.train:g}/{cfg.split.validation:g}/"
              f"{cfg.split.test:g} of numpy default_rng({cfg.split_seed}).permutation(N), each "
              "part sorted (autosparse.workload.task_builtins._index_splits)")
    return {"raw": raw, "method": method,
            "splits": {name: {"indices": idx.astype(np.int64)}
                       for name, idx in zip(("train", "validation", "test"), parts)}}


def load_diabetes_splits(cfg: DataConfig) -> DataSplits:
    """sklearn's diabetes regression data: features and target standardised on the train split."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.float32)
    parts = _index_splits(len(y), cfg)
    train_x, train_y = x[parts[0]], y[parts[0]]
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-8
    y_mean, y_std = float(train_y.mean()), float(train_y.std())
    datasets = [TensorDataset(torch.from_numpy((x[idx] - mean) / std),
                              torch.from_numpy((y[idx, None] - y_mean) / y_std))
                for idx in parts]
    raw = {"load": "sklearn.datasets.load_diabetes(return_X_y=True)", "samples": len(y),
           "x": "the 10 features as float32", "y": "the target as float32, shape (N, 1)",
           # the target is standardised too: the mse is in these units
           "target_mean": y_mean, "target_std": y_std}
    return DataSplits(*datasets, input_shape=(x.shape[1],), num_classes=1,
                      mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                      batch_size=cfg.batch_size, origin=_random_origin(raw, parts, cfg))


def markov_tokens(sequences: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """``sequences`` x ``length`` tokens from a fixed random Markov chain (int64)."""
    rng = np.random.default_rng(seed)
    transition = np.full((vocab, vocab), 0.02 / vocab)
    for token in range(vocab):
        successors = rng.choice(vocab, TOKEN_SUCCESSORS, replace=False)
        transition[token, successors] += rng.dirichlet(np.ones(TOKEN_SUCCESSORS)) * 0.98
    transition /= transition.sum(axis=1, keepdims=True)
    cumulative = transition.cumsum(axis=1)
    out = np.empty((sequences, length), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab, sequences)
    for t in range(1, length):
        u = rng.random(sequences)[:, None]
        out[:, t] = np.minimum((u > cumulative[out[:, t - 1]]).sum(axis=1), vocab - 1)
    return out


def load_token_splits(cfg: DataConfig) -> DataSplits:
    """Next-token data from :func:`markov_tokens`: x = first 16 tokens, y = the 16 after each."""
    tokens = torch.from_numpy(markov_tokens(TOKEN_SEQUENCES, TOKEN_LENGTH + 1, TOKEN_VOCAB,
                                            TOKEN_CHAIN_SEED))
    parts = _index_splits(len(tokens), cfg)
    datasets = [TensorDataset(tokens[idx, :-1].contiguous(), tokens[idx, 1:].contiguous())
                for idx in (torch.from_numpy(p) for p in parts)]
    raw = {"load": f"autosparse.workload.task_builtins.markov_tokens({TOKEN_SEQUENCES}, "
                   f"{TOKEN_LENGTH + 1}, {TOKEN_VOCAB}, {TOKEN_CHAIN_SEED})",
           "sequences": TOKEN_SEQUENCES, "length": TOKEN_LENGTH + 1, "vocab": TOKEN_VOCAB,
           "seed": TOKEN_CHAIN_SEED, "successors": TOKEN_SUCCESSORS, "samples": TOKEN_SEQUENCES,
           "x": "tokens[:, :-1] (int64 ids)", "y": "tokens[:, 1:] (the next token at each position)"}
    return DataSplits(*datasets, input_shape=(TOKEN_LENGTH,), num_classes=TOKEN_VOCAB,
                      batch_size=cfg.batch_size, origin=_random_origin(raw, parts, cfg))


class RegressionMLP(nn.Module):
    """Two hidden ReLU layers; ``num_outputs`` regression targets."""

    def __init__(self, in_features: int, num_outputs: int, hidden: tuple[int, int] = (64, 32)):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.out(F.relu(self.fc2(x)))


class TinyLM(nn.Module):
    """A one-block causal transformer (GPT-style, pre-norm, single head) returning logits
    (batch, tokens, vocabulary). The token embedding comes first, which is how layer discovery
    knows its example input is token ids."""

    def __init__(self, vocab: int, length: int, width: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, length, width))
        self.norm1 = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm3 = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", torch.tril(torch.ones(length, length, dtype=torch.bool)),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        h = self.embed(tokens.long()) + self.position[:, :length]
        a = self.norm1(h)
        q, k, v = self.query(a), self.key(a), self.value(a)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.query.out_features)  # = q's width
        scores = scores.masked_fill(~self.causal[:length, :length], float("-inf"))
        h = h + self.proj(scores.softmax(dim=-1) @ v)
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(self.norm3(h))


def build_task_builtin(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``regression-mlp`` (num_classes = number of targets) or ``tiny-lm`` (= vocabulary)."""
    if name == "regression-mlp":
        return RegressionMLP(math.prod(input_shape), num_classes)
    if name == "tiny-lm":
        if len(input_shape) != 1:
            raise ConfigError(f"model tiny-lm needs token sequences (length,); the data gives "
                              f"samples of shape {input_shape}")
        return TinyLM(num_classes, input_shape[0])
    raise ConfigError(f"model.builtin {name!r} is not a task built-in")


def tiny_gpt2(vocab: int = TOKEN_VOCAB, length: int = TOKEN_LENGTH, width: int = 32,
              layers: int = 1, heads: int = 2, seed: int = 0) -> nn.Module:
    """A random-init ``transformers`` GPT-2 language model of the given size, for
    ``model.factory: "autosparse.workload.task_builtins:tiny_gpt2"``: it returns an output object with
    ``.logits`` (B, T, V), and its attention and MLP weights are transformers' ``Conv1D``.
    A factory model is used as built (not trained here): pass a ``checkpoint`` for real use."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers,
                        n_head=heads, n_inner=2 * width, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        use_cache=False)  # a search scores whole sequences: no key/value cache
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).eval()
