"""Export of a one-shot search's candidate: a GGUF file llama.cpp loads, holding exactly the
bytes the search scored.

Each searched layer's weight is written as its level's stored bytes from the level database
(``LevelDatabase.packed``: the GGUF blocks the candidate was scored with, never re-quantized);
every other tensor (embeddings, norms, the output head unless searched) as F32. So the file's
tensor data equals the trial's ``size_kb`` to the byte (the header - metadata and tokenizer - is
counted apart), and llama.cpp dequantizes the very weights the search evaluated. llama.cpp has
no sparse kernels: a pruned layer is stored dense in its type (its zeros cost what any weight
costs), which the search's size already assumed.

The checks: the rebuilt candidate scores what the trial recorded (one-shot scoring is
deterministic); the file's tensor bytes equal the scored size; with llama-cpp-python present,
the file's perplexity in llama.cpp on the test windows against PyTorch's on the same windows,
and tokens/s of the file beside the dense model's F32 GGUF (1 thread, median of 3).

Like a fine-tune export, the folder also holds ``split.json`` (how the test windows were made,
with checksums) and ``reproduce.py``, which rebuilds the windows from the raw data and
recomputes model.gguf's test perplexity in llama.cpp (``reproduction.write_gguf_reproduction``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from autosparse.compress.oneshot.gguf_candidate import write_candidate_gguf
from autosparse.compress.oneshot.gguf_file import gguf_tensor_name, write_gguf
from autosparse.compress.oneshot.search_levels import f32_bytes
from autosparse.export.checks import ExportCheckFailed
from autosparse.export.reproduction import write_gguf_reproduction
from autosparse.search.context import SearchContext
from autosparse.space.candidate import Candidate
from autosparse.workload.evaluate import evaluate

Printer = Callable[[str], None]
RELATIVE_MATCH = 1e-6  # rebuilt vs recorded validation metric: the same computation
LLAMA_CPP_PERPLEXITY_TOLERANCE = 0.01  # the issue's bar: within 1 % of the scored perplexity
SPEED_TOKENS = (128, 32)  # llama-bench's prompt and generated tokens


def _speed_tokens(config: object) -> tuple[int, int]:
    """llama-bench's prompt and generated tokens, scaled into the model's trained context when
    that is shorter: GPT-2's learned positions end there (llama.cpp cannot run past them)."""
    n_prompt, n_gen = SPEED_TOKENS
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if not context or context >= n_prompt + n_gen:
        return n_prompt, n_gen
    gen = max(1, context * n_gen // (n_prompt + n_gen))
    return context - gen, gen


def _type_name(value: object) -> str:
    return str(getattr(value, "name", value))


def _windows(context: SearchContext, split: str) -> torch.Tensor:
    """The split's full token windows (x is window[:-1], y is window[1:])."""
    x, y = context.data.split(split).tensors
    return torch.cat([x[:, :1], y], dim=1)


def export_oneshot(context: SearchContext, candidate: Candidate, searched: dict, out: Path,
                   printer: Printer) -> dict:
    """Write ``out/model.gguf`` for a one-shot trial, check it, and return the report."""
    scoring = context.oneshot
    assert scoring is not None
    task, data = context.task, context.data
    dense = context.dense.cpu()
    model = scoring.model(dense, candidate)
    assignment = scoring.assignment(candidate)
    validation = evaluate(model, data.loader("validation", data.batch_size), task)
    recorded = searched.get("accuracy")
    if recorded is not None and abs(validation - recorded) > RELATIVE_MATCH * max(abs(recorded), 1):
        raise ExportCheckFailed(f"the candidate rebuilt from the level database scores "
                                f"{validation:.6g} on validation, the search recorded {recorded:.6g}")
    printer("writing model.gguf from the level database ...")
    try:
        info = write_candidate_gguf(dense, scoring.db, assignment, out / "model.gguf")
    except ValueError as err:  # an architecture the writer does not know
        raise ExportCheckFailed(str(err)) from None
    scored_bytes = round(float(searched.get("size_kb", 0.0)) * 1000)
    if info.tensor_bytes != scored_bytes:
        raise ExportCheckFailed(f"model.gguf holds {info.tensor_bytes} bytes of tensors, the "
                                f"search scored {scored_bytes}")
    test = evaluate(model, data.loader("test", data.batch_size), task)
    report = {
        "search": context.config.name, "format": "gguf",
        "layers": {layer: level.key for layer, level in assignment.items()},
        "validation": {"search": recorded, "rebuilt": validation,
                       "dense": context.dense_metrics["accuracy"]},
        "test": {"pytorch": test, "dense": context.dense_metrics.get("test_accuracy")},
        "size": {"scored_bytes": scored_bytes, "tensor_bytes": info.tensor_bytes,
                 "header_bytes": info.metadata_bytes, "padding_bytes": info.padding_bytes,
                 "file_bytes": info.file_size,
                 "dense_f32_bytes": f32_bytes(dense)},
        "tensor_types": {layer: _type_name(info.tensor_types.get(
            gguf_tensor_name(f"{layer}.weight", dense.config))) for layer in assignment},
        "metric": task.name,
    }
    report["llama_cpp"] = _llama_cpp_checks(context, dense, out, test, printer)
    write_gguf_reproduction(context, report, out, LLAMA_CPP_PERPLEXITY_TOLERANCE)
    return report


def _llama_cpp_checks(context: SearchContext, dense: nn.Module, out: Path, test: float,
                      printer: Printer) -> dict:
    """Perplexity and speed in llama.cpp, or why they were not measured."""
    try:
        import llama_cpp  # noqa: F401

        from autosparse.cost.llama_cpp import (
            llama_cpp_perplexity,
            llama_cpp_tokens_per_second,
        )
    except ImportError as err:
        return {"measured": False, "why": f"llama-cpp-python is not installed ({err}); "
                "bash scripts/llama_cpp.sh installs it"}
    printer("scoring model.gguf in llama.cpp ...")
    windows = _windows(context, "test").tolist()
    perplexity = llama_cpp_perplexity(out / "model.gguf", windows, n_threads=1)
    relative = abs(perplexity - test) / test
    if context.task.name == "perplexity" and relative > LLAMA_CPP_PERPLEXITY_TOLERANCE:
        raise ExportCheckFailed(f"llama.cpp scores model.gguf {perplexity:.4g} perplexity on the "
                                f"test windows, PyTorch {test:.4g} ({relative:.1%} apart; "
                                f"allowed {LLAMA_CPP_PERPLEXITY_TOLERANCE:.0%})")
    dense_path = out / ".dense.gguf"
    write_gguf(dense_path, dense.config, {k: v.detach().float().numpy()
                                          for k, v in dense.state_dict().items()})
    n_prompt, n_gen = _speed_tokens(dense.config)
    try:
        speed = llama_cpp_tokens_per_second(out / "model.gguf", n_prompt, n_gen, n_threads=1)
        dense_speed = llama_cpp_tokens_per_second(dense_path, n_prompt, n_gen, n_threads=1)
    finally:
        dense_path.unlink(missing_ok=True)
    return {"measured": True, "perplexity": perplexity, "relative_to_pytorch": relative,
            "prompt_tokens_per_s": speed.prompt_tokens_per_s,
            "gen_tokens_per_s": speed.gen_tokens_per_s,
            "dense_prompt_tokens_per_s": dense_speed.prompt_tokens_per_s,
            "dense_gen_tokens_per_s": dense_speed.gen_tokens_per_s, "threads": 1,
            "prompt_tokens": n_prompt, "gen_tokens": n_gen}


def gguf_report_markdown(report: dict) -> str:
    """The report a user reads first: size against the scored size, metric, llama.cpp."""
    size, metric = report["size"], report["metric"]
    lines = [f"# GGUF export of {report['search']}", "",
             f"model.gguf: {size['file_bytes']:,} bytes = {size['tensor_bytes']:,} of tensors "
             f"(scored: {size['scored_bytes']:,}) + {size['header_bytes']:,} header + "
             f"{size['padding_bytes']:,} padding; dense F32 tensors {size['dense_f32_bytes']:,}.",
             "",
             f"{metric}: validation {report['validation']['rebuilt']:.4g} (search "
             f"{report['validation']['search']:.4g}, dense {report['validation']['dense']:.4g}); "
             f"test {report['test']['pytorch']:.4g} in PyTorch.", ""]
    cpp = report["llama_cpp"]
    if cpp.get("measured"):
        lines += [f"llama.cpp: test {metric} {cpp['perplexity']:.4g} "
                  f"({cpp['relative_to_pytorch']:.2%} from PyTorch); "
                  f"{cpp['prompt_tokens_per_s']:.0f} prompt / {cpp['gen_tokens_per_s']:.1f} "
                  f"generated tokens/s against dense {cpp['dense_prompt_tokens_per_s']:.0f} / "
                  f"{cpp['dense_gen_tokens_per_s']:.1f} (1 thread, median of 3).", ""]
    else:
        lines += [f"llama.cpp: not measured: {cpp['why']}", ""]
    lines += ["Sparse layers are stored dense in their type: llama.cpp has no sparse kernels.",
              "", "| layer | level | stored type |", "|---|---|---|"]
    types = report["tensor_types"]
    for layer, key in report["layers"].items():
        lines.append(f"| {layer} | {key} | {types.get(layer, '')} |")
    return "\n".join(lines + _reproduce_markdown(report)) + "\n"


def _reproduce_markdown(report: dict) -> list[str]:
    """report.md's section on reproduce.py, as a fine-tune export's report has one."""
    section = report.get("reproduce")
    if not section:
        return []
    figure = section["files"].get("model.gguf")
    against = (f"the report's `{figure}`, exiting 1 when they differ by more than "
               f"{section['tolerance']:.3g} relative" if figure else
               "no figure of the report (this metric is not perplexity)")
    return ["", "## Reproduce the test figures", "",
            (f"In this folder, `{section['command']}` rebuilds the test windows from the raw "
             f"data (exiting 1 when their sha256 differs from split.json's), recomputes "
             f"model.gguf's test perplexity ({section['runtime']}) and prints it beside "
             f"{against}. It needs {', '.join(section['requires'])}; no autosparse."), "",
            f"- split: {section['split']}",
            f"- preprocessing: {section['preprocessing']}"]
