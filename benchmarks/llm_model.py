"""The decoder language model of the LLM benchmark, trained here on the stdlib's source.

    python benchmarks/llm_model.py              # full size, 30 minutes of CPU
    python benchmarks/llm_model.py --tiny       # 2 layers x 64 wide, about a minute (smoke)
    python benchmarks/llm_model.py --steps 2000 --seed 1 --out runs/llm-bench

No weights can be downloaded, so the benchmark's model is trained from random init: a
``transformers.LlamaForCausalLM`` over bytes (vocabulary 256), hidden 256, 8 layers, 4 heads,
intermediate 768, on the train split of :mod:`autosparse.workload.text_corpus` (whole stdlib
files, split by a hash of their path; calibration/validation/test files are never trained on).
Every linear layer's input width is a multiple of 256 (256 or 768), which GGUF K-quants need;
the LM head is not tied to the embedding, so it can be compressed on its own.

The model is cached under ``<out>/<hash>/model/`` (``save_pretrained`` plus the byte-tokenizer
marker, so ``load_tokenizer(folder)`` works) with ``<out>/<hash>/train.json`` beside it; the
hash covers the model and training settings, the seed, the budget and the corpus fingerprint,
so a second run with the same ones returns the cached model at once. A run that is interrupted
resumes from ``<out>/<hash>/checkpoint.pt`` (written every few minutes). A ``--minutes`` budget
stops on wall time and runs the cosine schedule on the elapsed fraction of it, so the step
count depends on the machine; ``--steps`` is the reproducible budget. Nothing is committed.

The search benchmark imports :func:`train_or_load` from here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from autosparse.workload.text_corpus import (
    DEFAULT_FRACTIONS,
    ByteTokenizer,
    corpus_fingerprint,
    perplexity,
    read_tokens,
    resolve_sources,
    split_files,
    text_token_sets,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "llm-bench"
FORMAT = 1  # bump when the training changes in a way the settings do not show


@dataclass(frozen=True)
class LMSpec:
    """Everything that decides the trained model: architecture, optimiser, budget, seed, data.

    ``minutes`` is the budget unless ``steps`` is given (then ``minutes`` is ignored).
    ``source`` is ``"stdlib"`` or a tuple of files/globs (tests train on a few small files).
    """

    hidden: int = 256
    layers: int = 8
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 768
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    warmup_fraction: float = 0.05  # warmup also ends once 5% of the budget is spent
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    minutes: float | None = 30.0
    steps: int | None = None
    seed: int = 0
    eval_windows: int = 64  # validation and test windows of seq_len for the perplexities
    source: str | tuple[str, ...] = "stdlib"

    def budget(self) -> dict[str, float | int]:
        """The budget that counts: steps if given, else minutes."""
        if self.steps is not None:
            return {"steps": int(self.steps)}
        if self.minutes is None or self.minutes <= 0:
            raise ValueError("an LM training needs steps or a positive minutes budget")
        return {"minutes": float(self.minutes)}

    def key(self) -> dict[str, Any]:
        """The settings the cache hash covers (``minutes`` dropped when ``steps`` rules)."""
        out = asdict(self)
        if self.steps is not None:
            out["minutes"] = None
        out["source"] = list(self.source) if isinstance(self.source, tuple) else self.source
        return out


# 2 layers x 64 wide: trains in about a minute on two cores, for smoke tests
TINY: dict[str, Any] = {
    "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 256, "lr": 3e-3,
    "warmup_steps": 10, "minutes": 1.0, "eval_windows": 16,
}


def llama_config(spec: LMSpec) -> Any:
    """The ``LlamaConfig`` of ``spec``: byte vocabulary, untied head, no special tokens.

    ``max_position_embeddings`` is the training length: the model has never seen a longer
    context, and exporters (GGUF's context length) should say so.
    """
    from transformers import LlamaConfig

    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError(f"hidden {spec.hidden} must divide into {spec.heads} heads, and those "
                         f"into {spec.kv_heads} key/value heads")
    return LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=spec.hidden,
        intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.seq_len, rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_model(spec: LMSpec) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (float32), seeded by ``spec.seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(llama_config(spec)).float()


def learning_rate(spec: LMSpec, step: int, progress: float) -> float:
    """Linear warmup, then cosine from ``lr`` to ``lr * min_lr_ratio`` over ``progress`` in
    [0, 1] (the fraction of the steps, or of the minutes, spent).

    Warmup ends after ``warmup_steps`` or ``warmup_fraction`` of the budget, whichever comes
    first: on a slow (or shared) machine a 30-minute budget may be only a few hundred steps,
    and a fixed step count would spend much of it warming up.
    """
    by_steps = (step + 1) / max(1, spec.warmup_steps)
    by_budget = progress / spec.warmup_fraction if spec.warmup_fraction > 0 else 0.0
    warm = min(1.0, max(by_steps, by_budget))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return spec.lr * warm * (spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine)


def random_batch(tokens: torch.Tensor, seq_len: int, batch_size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at random offsets of the train text."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"the train text has {tokens.numel()} tokens, fewer than a window "
                         f"of {seq_len}")
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
    return tokens[starts[:, None] + torch.arange(seq_len)[None, :]]


def _optimizer(model: torch.nn.Module, spec: LMSpec) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm weights stay undecayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), eps=1e-8)


def train_model(
    model: torch.nn.Module, train_tokens: torch.Tensor, spec: LMSpec, *,
    checkpoint: Path | None = None, checkpoint_seconds: float = 300.0, log_every: int = 10,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model`` in place on random windows of ``train_tokens`` within ``spec``'s budget.

    Returns the run's figures: steps, tokens seen, training seconds (evaluation and saving not
    counted), the process's CPU seconds, tokens/s and the loss curve (mean train loss of every ``log_every`` steps, as
    ``[step, tokens, seconds, loss]``). With ``checkpoint``, the state is saved there every
    ``checkpoint_seconds`` and a run finding one there resumes from it.
    """
    budget = spec.budget()
    model.train()
    optimizer = _optimizer(model, spec)
    generator = torch.Generator().manual_seed(spec.seed)
    step, elapsed, curve = 0, 0.0, []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, elapsed, curve = int(state["step"]), float(state["elapsed"]), list(state["curve"])
        log(f"resuming from {checkpoint} at step {step} ({elapsed:.0f} s trained)")
    tokens_per_step = spec.batch_size * spec.seq_len
    losses: list[float] = []
    last_save = time.perf_counter()
    cpu_started = time.process_time()
    while True:
        if "steps" in budget:
            progress = step / budget["steps"]
        else:
            progress = elapsed / (60.0 * budget["minutes"])
        if progress >= 1.0:
            break
        started = time.perf_counter()
        lr = learning_rate(spec, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = random_batch(train_tokens, spec.seq_len, spec.batch_size, generator)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - started
        losses.append(float(loss.detach()))
        if len(losses) == log_every:
            mean = sum(losses) / len(losses)
            curve.append([step, step * tokens_per_step, round(elapsed, 2), round(mean, 4)])
            losses = []
            log(f"step {step:6d}  tokens {step * tokens_per_step:>11,}  loss {mean:.4f}  "
                f"lr {lr:.2e}  {step * tokens_per_step / elapsed:,.0f} tok/s")
        if checkpoint is not None and time.perf_counter() - last_save > checkpoint_seconds:
            _save_checkpoint(checkpoint, model, optimizer, generator, step, elapsed, curve)
            last_save = time.perf_counter()
    if losses:
        curve.append([step, step * tokens_per_step, round(elapsed, 2),
                      round(sum(losses) / len(losses), 4)])
    model.eval()
    return {
        "steps": step, "tokens": step * tokens_per_step, "seconds": round(elapsed, 2),
        # CPU seconds of this process (this session only): on a shared machine, tokens per
        # CPU-second times the thread count estimates the speed the machine alone would give
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "tokens_per_s": round(step * tokens_per_step / elapsed, 1) if elapsed else 0.0,
        "final_loss": curve[-1][3] if curve else None, "loss_curve": curve,
    }


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, step: int, elapsed: float,
                     curve: list[list[float]]) -> None:
    """Write the resumable state atomically (a crash mid-write leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "step": step, "elapsed": elapsed,
                "curve": curve}, tmp)
    os.replace(tmp, path)


def run_hash(spec: LMSpec, fingerprint: str) -> str:
    """The cache folder's name: settings, seed, budget and corpus, hashed."""
    text = json.dumps({"format": FORMAT, "spec": spec.key(), "corpus": fingerprint},
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def train_or_load(
    spec: LMSpec = LMSpec(), out: Path | str = DEFAULT_OUT, *,
    log: Callable[[str], None] = print, checkpoint_seconds: float = 300.0,
) -> tuple[Path, dict[str, Any]]:
    """The trained model's folder and its ``train.json`` figures, training it if not cached.

    The folder loads with ``LlamaForCausalLM.from_pretrained(folder)`` and
    ``load_tokenizer(folder)`` (bytes). ``info["cached"]`` says whether it was trained now.
    """
    files, root = resolve_sources(spec.source)
    fingerprint = corpus_fingerprint(files, root)
    run = Path(out) / run_hash(spec, fingerprint)
    folder, report = run / "model", run / "train.json"
    if report.is_file() and (folder / "config.json").is_file():
        info = json.loads(report.read_text())
        if info.get("spec") == spec.key():
            log(f"cached: {folder}")
            return folder, {**info, "cached": True}
    splits = split_files(files, root, DEFAULT_FRACTIONS)
    tokenizer = ByteTokenizer()
    train_tokens = read_tokens(splits["train"], tokenizer)
    counts = dict.fromkeys(("calibration", "validation", "test"), spec.eval_windows)
    sets = text_token_sets(spec.source, tokenizer, spec.seq_len, counts, seed=spec.seed)
    model = build_model(spec)
    params = sum(p.numel() for p in model.parameters())
    log(f"{params:,} parameters; train split {len(splits['train'])} files, "
        f"{train_tokens.numel():,} tokens; budget {spec.budget()}; run folder {run}")
    figures = train_model(model, train_tokens, spec, checkpoint=run / "checkpoint.pt",
                          checkpoint_seconds=checkpoint_seconds, log=log)
    started = time.perf_counter()
    val_ppl = perplexity(model, sets.validation)
    test_ppl = perplexity(model, sets.test)
    info = {
        "spec": spec.key(), "hash": run.name, "parameters": params,
        "llama_config": llama_config(spec).to_dict(),
        "corpus": {"fingerprint": fingerprint, "root": str(root), "files": sets.files,
                   "bytes": sets.bytes, "train_tokens": int(train_tokens.numel()),
                   "python": platform.python_version()},
        "train": figures,
        "validation_perplexity": round(val_ppl, 4), "test_perplexity": round(test_ppl, 4),
        # byte tokens: log2(perplexity) is the model's bits per byte of held-out source
        "test_bits_per_byte": round(math.log2(test_ppl), 4),
        "eval_seconds": round(time.perf_counter() - started, 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, report)
    (run / "checkpoint.pt").unlink(missing_ok=True)
    return folder, {**info, "cached": False}


def _spec_from_args(args: argparse.Namespace) -> LMSpec:
    spec = LMSpec(**TINY) if args.tiny else LMSpec()
    changes: dict[str, Any] = {"seed": args.seed}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.minutes is not None:
        changes["minutes"] = args.minutes
    for name in ("batch_size", "seq_len", "kv_heads"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return replace(spec, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="2 layers x 64 hidden, intermediate 256, 1 minute (smoke tests)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training wall-time budget (default 30; 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train this many steps instead of a time budget (reproducible)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=None, help="windows a step (16)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens a window (256)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = _spec_from_args(args)
    folder, info = train_or_load(spec, args.out)
    train = info["train"]
    print(f"\nmodel: {folder}{' (cached)' if info['cached'] else ''}")
    print(f"parameters {info['parameters']:,}; {train['steps']} steps, {train['tokens']:,} "
          f"tokens in {train['seconds']:.0f} s = {train['tokens_per_s']:,.0f} tokens/s "
          f"({train['tokens'] / max(train.get('cpu_seconds', 0), 1e-9):,.0f} per CPU-second)")
    print(f"train loss {train['final_loss']}; validation perplexity "
          f"{info['validation_perplexity']:.3f}; test perplexity {info['test_perplexity']:.3f} "
          f"({info['test_bits_per_byte']:.3f} bits/byte)")
    print(f"figures: {folder.parent / 'train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
