"""A one-shot candidate's GGUF timed in llama.cpp (autosparse.cost.gguf_latency, ``hardware:
measure`` with ``oneshot``).

A tiny random Llama (256 wide: Q4_K blocks fit), a level database with a Q4 level of every
linear layer, few rounds. Structure only, never speed: finite positive medians for the dense and
the Q4 file, a repeated key timed once, the candidate file deleted after timing and the folder at
close, bad arguments refused, and a missing llama-cpp-python refused in one line naming the
script that installs it.
"""

from __future__ import annotations

import gc
import math
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import autosparse.cost.gguf_latency as gguf_latency
from autosparse.compress.oneshot.database import LevelDatabase, build_level_database
from autosparse.compress.oneshot.levels import Level
from autosparse.config.schema import parse_config
from autosparse.config.validation import ConfigError
from autosparse.cost.gguf_latency import GGUFTimer, require_llama_cpp

pytestmark = pytest.mark.usefixtures("one_thread")
Q4 = Level(bits=4, method="rtn")  # Q4_K
SETTINGS = {"rounds": 3, "calls": 4, "warmup": 2, "prompt_tokens": 8}


@pytest.fixture(scope="module")
def llama_db(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    layers = [n for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    windows = torch.randint(0, 256, (2, 16))
    root = tmp_path_factory.mktemp("levels")
    build_level_database(model, layers, [Level(), Q4], windows, root)
    return model, LevelDatabase(root, model=model, calibration_windows=windows)


def q4_everywhere(db: LevelDatabase) -> dict[str, Level]:
    return {layer: Q4 for layer in db.layers}


@pytest.fixture
def timer(llama_db, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                        "(bash scripts/llama_cpp.sh)")
    model, db = llama_db
    timer = GGUFTimer(model, db, parent=tmp_path / "measure", **SETTINGS)
    yield timer
    timer.close()


def test_dense_and_q4_candidate_give_finite_medians(timer, llama_db):
    dense_ms, dense_prompt = timer.dense_latency()
    assert all(math.isfinite(v) and v > 0 for v in (dense_ms, dense_prompt))
    assert timer.dense_metrics() == {"latency_ms": dense_ms, "latency_prompt_ms": dense_prompt}
    assert timer.dense_latency() == (dense_ms, dense_prompt)  # measured once

    result = timer.measure("q4", q4_everywhere(llama_db[1]))
    figures = (result.latency_ms, result.prompt_ms, result.dense_ms, result.dense_prompt_ms)
    assert all(math.isfinite(v) and v > 0 for v in figures)
    assert result.seconds > 0 and not result.cached
    assert result.speedup == pytest.approx(result.dense_ms / result.latency_ms)
    metrics = result.metrics()
    assert metrics["latency_ms"] == result.latency_ms
    assert metrics["latency_prompt_ms"] == result.prompt_ms
    assert metrics["latency_dense_ms"] == result.dense_ms
    assert metrics["latency_source.llama_cpp"] == 1.0 and metrics["latency_source.measured"] == 1.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    # the candidate's file is gone once timed; the dense F32 file stays for the next candidate
    assert [p.name for p in timer.folder.iterdir()] == ["dense.gguf"]


def test_a_repeated_candidate_is_timed_once(timer, llama_db, monkeypatch):
    written = []
    write = gguf_latency.write_candidate_gguf
    monkeypatch.setattr(gguf_latency, "write_candidate_gguf",
                        lambda dense, db, assignment, path: written.append(dict(assignment))
                        or write(dense, db, assignment, path))
    assignment = q4_everywhere(llama_db[1])
    first = timer.measure("q4", assignment)
    again = timer.measure("q4", assignment)
    assert again.cached and again.seconds == 0.0
    assert (again.latency_ms, again.prompt_ms, again.dense_ms) == \
        (first.latency_ms, first.prompt_ms, first.dense_ms)
    assert written == [{}, assignment]  # the dense file once, the candidate once

    half = dict(assignment, **{layer: Level() for layer in list(assignment)[:3]})
    assert not timer.measure("mixed", half).cached and len(written) == 3


def test_files_are_removed(timer, llama_db, tmp_path):
    timer.measure("q4", q4_everywhere(llama_db[1]))
    folder = timer.folder
    assert folder.parent == tmp_path / "measure" and folder.is_dir()
    timer.close()
    assert not folder.exists() and list((tmp_path / "measure").iterdir()) == []
    assert timer.measure("q4", q4_everywhere(llama_db[1])).cached  # the cache outlives close

    timer.measure("other", {layer: Q4 for layer in list(llama_db[1].layers)[:2]})
    reopened = timer.folder
    assert reopened != folder and reopened.is_dir()

def test_garbage_collection_removes_the_folder(llama_db, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model, db = llama_db
    timer = GGUFTimer(model, db, parent=tmp_path, **SETTINGS)
    timer.dense_latency()
    folder = timer.folder
    assert (folder / "dense.gguf").is_file()
    del timer
    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize("kwargs, words", [
    ({"rounds": 0}, "rounds (0)"),
    ({"calls": 0}, "calls (0)"),
    ({"warmup": -1}, "warmup (-1)"),
    ({"prompt_tokens": 0}, "prompt_tokens (0)"),
])
def test_bad_settings_are_refused(llama_db, kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        GGUFTimer(*llama_db, **kwargs)


def test_bad_measure_arguments_are_refused(llama_db, tmp_path):
    model, db = llama_db
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        GGUFTimer(model, db, parent=not_a_folder)
    timer = GGUFTimer(model, db, parent=tmp_path / "m", **SETTINGS)
    with pytest.raises(ValueError, match="empty assignment"):
        timer.measure("dense", {})
    with pytest.raises(ValueError, match="not in the level database"):
        timer.measure("typo", {"model.layers.0.mlp.nope": Q4})
    with pytest.raises(ValueError, match="no level database"):
        GGUFTimer(model, None, parent=tmp_path / "m").measure("q4", q4_everywhere(db))
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_missing_llama_cpp_is_one_line_naming_the_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ConfigError) as err:
        require_llama_cpp()
    message = str(err.value)
    assert "bash scripts/llama_cpp.sh" in message and "\n" not in message


def test_prompt_tokens_needs_oneshot():
    config = {"name": "x", "model": {"builtin": "digits-cnn"}, "hardware": "measure",
              "objectives": ["accuracy", "latency"], "measure": {"prompt_tokens": 16}}
    with pytest.raises(ConfigError, match="prompt_tokens"):
        parse_config(config)
    del config["measure"]
    assert parse_config(config).measure.prompt_tokens == 32  # the default, unused without oneshot


def test_a_timing_longer_than_learned_positions_is_refused_not_aborted(tmp_path):
    """GPT-2's positions are a table: timing past it would abort llama.cpp (and Python) in
    get_rows, so the timer refuses in one line first."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                        "(bash scripts/llama_cpp.sh)")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=1, n_head=4,
                                       n_positions=16)).eval()
    root = tmp_path / "levels"
    windows = torch.randint(0, 256, (2, 8))
    build_level_database(model, ["transformer.h.0.mlp.c_fc"], [Level()], windows, root)
    db = LevelDatabase(root, model=model, calibration_windows=windows)
    fits = GGUFTimer(model, db, parent=tmp_path / "fits", **SETTINGS)  # 8 + 4 tokens
    assert fits.dense_ms() > 0
    fits.close()
    with pytest.raises(ValueError, match="learned positions for 16"):
        GGUFTimer(model, db, parent=tmp_path / "long", **{**SETTINGS, "prompt_tokens": 16}
                  ).dense_ms()
