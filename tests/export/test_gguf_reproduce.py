"""A one-shot (GGUF) export reproduces itself: split.json and reproduce.py beside model.gguf.

One tiny real one-shot search (a random 1-layer Llama, byte tokens, text windows from local
files) is exported once. The written ``reproduce.py`` runs in a subprocess from the export folder
with a clean environment in which ``import autosparse`` fails: it must rebuild the test windows
bit for bit and recompute model.gguf's test perplexity in llama.cpp equal to the report's
llama.cpp figure within ``reproduce.tolerance`` (1e-3 relative; measured: identical digits on
this machine) and to the report's PyTorch test perplexity within the export's 1 % bar. A split
window moved by one token, a tampered raw file (given with ``--data``) and a changed report
figure must each make it exit 1, naming the cause; without llama-cpp-python it says so in one
line and exits 2. The llama.cpp parts skip when llama-cpp-python is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow_store import template_db  # noqa: F401 (the session's migrated MLflow database)

from autosparse.export import reproduce_script as script
from autosparse.export.exporter import run_export
from autosparse.export.gguf_export import LLAMA_CPP_PERPLEXITY_TOLERANCE
from autosparse.export.reproduction import RELATIVE, SCRIPT_FILE, SPLIT_FILE
from autosparse.export.request import ExportRequest
from autosparse.search.preparation import prepare
from autosparse.search.runner import run_search

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration


def llama_cpp_or_skip():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (bash scripts/llama_cpp.sh)")


def _config(tmp: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "llama")
    source = Path(torch.__file__).parent / "nn" / "modules" / "module.py"
    lines = source.read_text(encoding="utf-8").splitlines()
    (tmp / "text").mkdir()
    for i in range(40):  # whole files per split: a few test files
        (tmp / "text" / f"part{i:02d}.txt").write_text("\n".join(lines[i * 60:(i + 1) * 60]) * 2)
    config = {
        "name": "osr", "model": {"pretrained": str(tmp / "llama")},
        "data": {"source": "text", "path": str(tmp / "text"),
                 "text": {"seq_len": 32, "calibration": 4, "validation": 3, "test": 4}},
        "task": {"kind": "language-model"}, "oneshot": {"bits_method": "rtn"},
        "space": {"exclude": ["model.embed_tokens", "lm_head"],
                  "default": {"sparsity": [0.0], "patterns": ["unstructured"], "bits": [8]},
                  "rules": [{"layers": ["model.layers.0.mlp.*"], "sparsity": [0.0, 0.5],
                             "bits": [5, 8]}]},
        "strategy": {"name": "random"}, "budget": {"trials": 2},
        "objectives": ["perplexity", "size"],
    }
    path = tmp / "osr.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, template_db):  # noqa: F811
    """(config, runs folder, export folder) of a two-trial one-shot search, trial 0 exported."""
    tmp = tmp_path_factory.mktemp("gguf-reproduce")
    runs = tmp / "runs"
    runs.mkdir()
    for suffix in ("", "-wal", "-shm"):  # no MLflow migrations per search
        if Path(f"{template_db}{suffix}").exists():
            shutil.copy(f"{template_db}{suffix}", runs / f"mlflow.db{suffix}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            config = _config(tmp)
            run_search(config, runs_dir=runs, printer=lambda line: None)
            outcome = run_export(config, ExportRequest(trial=0, mlflow=False), runs_dir=runs,
                                 printer=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return config, runs, outcome.out_dir


def run_script(folder: Path, *args: str, blocked: tuple[str, ...] = ("autosparse",),
               tmp: Path) -> subprocess.CompletedProcess:
    """``python reproduce.py`` in ``folder`` with only PATH and HOME from this environment and
    a PYTHONPATH whose packages named in ``blocked`` raise ImportError: the editable install of
    autosparse (and, when asked, llama_cpp) cannot be imported, so the script proves it does
    without."""
    shadow = tmp / ("shadow-" + "-".join(blocked))
    for name in blocked:
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} blocked')\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp)),
           "PYTHONPATH": str(shadow)}
    return subprocess.run([sys.executable, SCRIPT_FILE, *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def printed(stdout: str) -> tuple[float, float, str]:
    """(recomputed, report's, verdict) from reproduce.py's model.gguf line."""
    match = re.search(r"model\.gguf\s+perplexity (\S+)\s+report (\S+)\s+(ok|DIFFERS)", stdout)
    assert match, stdout
    return float(match[1]), float(match[2]), match[3]


def test_split_json_and_report_describe_the_test_windows(exported):
    """split.json's files and offsets give exactly the search's test windows, with checksums of
    them and of the raw files; report.json and report.md point to reproduce.py."""
    config, runs, out = exported
    record = json.loads((out / SPLIT_FILE).read_text())
    assert record["source"] == "text" and record["raw"]["tokenizer"] == "bytes"
    x, y = script.load_split(record, "test", None)
    context = prepare(config, runs)
    want_x, want_y = context.data.split("test").tensors
    np.testing.assert_array_equal(x, want_x.numpy())
    np.testing.assert_array_equal(y, want_y.numpy())
    test = record["checksums"]["test"]
    assert script.sha256([np.ascontiguousarray(x)]) == test["inputs_sha256"]
    assert script.sha256([np.ascontiguousarray(y)]) == test["targets_sha256"]
    assert len(record["splits"]["test"]["files_sha256"]) == len(record["splits"]["test"]["files"])
    assert script.changed_files(record, "test", None) == []

    report = json.loads((out / "report.json").read_text())
    section = report["reproduce"]
    assert (out / SCRIPT_FILE).read_text() == Path(script.__file__).read_text()
    assert section["requires"] == ["numpy", "llama-cpp-python"]
    assert report["files_bytes"] == {name: (out / name).stat().st_size
                                     for name in ("model.gguf", SPLIT_FILE, SCRIPT_FILE)}
    if report["llama_cpp"]["measured"]:
        assert section["files"] == {"model.gguf": "llama_cpp.perplexity"}
        assert section["tolerance"] == RELATIVE
    else:
        assert section["files"] == {"model.gguf": "test.pytorch"}
        assert section["tolerance"] == LLAMA_CPP_PERPLEXITY_TOLERANCE
    markdown = (out / "report.md").read_text()
    assert "## Reproduce the test figures" in markdown and "`python reproduce.py`" in markdown
    assert "- split: 4 test samples (token windows)" in markdown

    # files_bytes makes the folder a complete export: the same export again is reused
    again = run_export(config, ExportRequest(trial=0, mlflow=False), runs_dir=runs,
                       printer=lambda line: None)
    assert again.reused and again.out_dir == out


def test_reproduce_py_recomputes_the_llama_cpp_perplexity(exported, tmp_path):
    llama_cpp_or_skip()
    _, _, out = exported
    report = json.loads((out / "report.json").read_text())
    assert report["llama_cpp"]["measured"]
    result = run_script(out, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    value, reported, verdict = printed(result.stdout)
    expected = report["llama_cpp"]["perplexity"]
    assert verdict == "ok" and reported == pytest.approx(expected, rel=1e-5)
    assert abs(value - expected) <= report["reproduce"]["tolerance"] * expected  # 1e-3
    assert abs(value - report["test"]["pytorch"]) <= \
        LLAMA_CPP_PERPLEXITY_TOLERANCE * report["test"]["pytorch"]
    assert "windows: bit-identical to the export's" in result.stdout
    print(result.stdout)  # the measured figures, for the record (pytest -s)


def test_reproduce_py_detects_a_moved_window_a_changed_file_and_another_figure(exported,
                                                                            tmp_path):
    llama_cpp_or_skip()
    _, _, out = exported
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    record = json.loads((out / SPLIT_FILE).read_text())
    record["splits"]["test"]["starts"][0] += 1  # one window one token later
    (changed / SPLIT_FILE).write_text(json.dumps(record))
    result = run_script(changed, tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: checksum mismatch: the rebuilt test windows" in result.stdout
    assert "model.gguf" not in result.stdout, "no figure from the wrong windows"

    shutil.copy(out / SPLIT_FILE, changed / SPLIT_FILE)  # the export's split, a changed corpus
    corpus = tmp_path / "corpus"
    shutil.copytree(record["raw"]["root"], corpus)
    for file in record["splits"]["test"]["files"]:
        path = corpus / file
        path.write_text(path.read_text().swapcase())
    result = run_script(changed, "--data", str(corpus), tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "raw text changed since the export" in result.stdout
    assert record["splits"]["test"]["files"][0] in result.stdout
    assert "FAILED: checksum mismatch" in result.stdout

    report = json.loads((out / "report.json").read_text())  # the right windows, another figure
    report["llama_cpp"]["perplexity"] *= 1.01
    (changed / "report.json").write_text(json.dumps(report))
    result = run_script(changed, tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert printed(result.stdout)[2] == "DIFFERS"


def test_reproduce_py_without_llama_cpp_says_so_in_one_line(exported, tmp_path):
    _, _, out = exported
    result = run_script(out, blocked=("autosparse", "llama_cpp"), tmp=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.strip().splitlines() == [
        ("cannot run: model.gguf is scored in llama.cpp: llama-cpp-python is not installed "
         "(pip install llama-cpp-python)")]
