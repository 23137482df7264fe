"""A one-shot search with ``hardware: measure``: every candidate's GGUF timed in llama.cpp
(ms per generated token) beside the dense F32 GGUF, latency on the front, ``front``, the
pareto page and ``export`` working with it; without llama-cpp-python the config is refused in
one line before anything heavy. Structure and finiteness only, never speed."""

from __future__ import annotations

import gc
import math
import sys

import pytest
import test_oneshot_search as oneshot

from autosparse.cli import main
from autosparse.config.validation import ConfigError
from autosparse.export.exporter import run_export
from autosparse.export.request import ExportRequest
from autosparse.search.runner import run_search
from search_helpers import mlflow_runs

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
# the tiny Llama folder, the text files and the config of the one-shot search's own test
model_folder, text_folder, write_config = (oneshot.model_folder, oneshot.text_folder,
                                           oneshot.write_config)
MEASURE = {"rounds": 3, "calls": 4, "warmup": 2, "prompt_tokens": 8}


def test_oneshot_search_measures_latency_in_llama_cpp(tmp_path, model_folder, text_folder,
                                                      capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                        "(bash scripts/llama_cpp.sh)")
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "osm", model_folder, text_folder, hardware="measure",
                          measure=MEASURE, objectives=["perplexity", "latency"],
                          budget={"trials": 3})
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    trials = outcome.trials[outcome.trials["state"] == "COMPLETE"]
    assert len(trials) == 3
    for column in ("latency_ms", "latency_prompt_ms", "latency_dense_ms",
                   "latency_prompt_dense_ms", "speedup_measured", "latency_ms_predicted"):
        values = trials[column]
        assert values.map(math.isfinite).all() and (values > 0).all(), column
    assert (trials["latency_source.llama_cpp"] == 1.0).all()
    measured = trials[trials["latency_measure_seconds"] > 0]
    assert len(measured) == trials["candidate"].nunique()  # a repeat is not timed again
    front = outcome.front
    assert not front.empty and front["latency_ms"].map(math.isfinite).all()
    gc.collect()  # the search's timer is gone: its private folder with it
    assert not list((runs / "osm").glob("gguf-measure-*"))

    client, parents, _ = mlflow_runs(runs, "osm")
    page = client.download_artifacts(parents[0].info.run_id, "pareto.html", str(tmp_path))
    assert "latency" in open(page, encoding="utf-8").read()

    capsys.readouterr()
    assert main(["--runs-dir", str(runs), "front", str(config)]) == 0
    assert "latency" in capsys.readouterr().out

    best = int(front["trial"].iloc[0])
    exported = run_export(config, ExportRequest(trial=best, mlflow=False), runs_dir=runs,
                          printer=lambda line: None)
    assert (exported.out_dir / "model.gguf").is_file()
    assert exported.report["llama_cpp"]["measured"]


def test_missing_llama_cpp_is_refused_before_heavy_work(tmp_path, model_folder, text_folder,
                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "nocpp", model_folder, text_folder, hardware="measure",
                          objectives=["perplexity", "latency"])
    with pytest.raises(ConfigError) as err:
        run_search(config, runs_dir=runs, printer=lambda line: None)
    assert "bash scripts/llama_cpp.sh" in str(err.value) and "\n" not in str(err.value)
    assert not runs.exists()  # no dense model, no level database, no study


def test_a_model_llama_cpp_cannot_run_is_refused_before_the_database(
        tmp_path, model_folder, text_folder, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import autosparse.cost.gguf_latency as gguf_latency

    def unsupported(dense, db, assignment, path):
        raise ValueError("GGUF export does not know model_type 'mystery'")

    monkeypatch.setattr(gguf_latency, "write_candidate_gguf", unsupported)
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "arch", model_folder, text_folder, hardware="measure",
                          objectives=["perplexity", "latency"])
    with pytest.raises(ConfigError) as err:
        run_search(config, runs_dir=runs, printer=lambda line: None)
    assert "model_type 'mystery'" in str(err.value) and "hardware" in str(err.value)
    assert not (runs / "arch" / "levels").exists()  # refused before the level database
    assert not list((runs / "arch").glob("gguf-measure-*"))
