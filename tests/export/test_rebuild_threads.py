"""Export repeats the trial's fine-tune on the trial's own torch thread count: a CPU conv
fine-tune's last bits depend on it, so a search run on one thread per worker and an export run
on every core would otherwise rebuild a slightly different model than the one scored."""

from __future__ import annotations

import pytest
import torch
from search_helpers import load_study, write_config

from autosparse.export.exporter import run_export
from autosparse.export.request import ExportRequest
from autosparse.search.objective import THREADS_ATTR
from autosparse.search.runner import run_search
from autosparse.search.trial_attrs import METRICS_ATTR
from autosparse.workload.devices import torch_threads

pytestmark = pytest.mark.integration


def test_torch_threads_sets_then_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_export_rebuilds_on_the_trials_thread_count(tmp_path):
    config = write_config(tmp_path, "threads", strategy={"name": "random"},
                          budget={"trials": 2}, finetune={"steps": 40, "reeval_seeds": 0})
    run_search(config, runs_dir=tmp_path, threads=1, printer=lambda line: None)
    trial = load_study(tmp_path, "threads").trials[1]
    assert trial.user_attrs[THREADS_ATTR] == 1
    with torch_threads(2):  # the exporting process runs on more threads than the search did
        outcome = run_export(config, ExportRequest(trial=trial.number, mlflow=False,
                                                   timing_rounds=1, timing_calls=1),
                             runs_dir=tmp_path, printer=lambda line: None)
        assert torch.get_num_threads() == 2  # the caller's count is back after the rebuild
    loss = outcome.report["finetune_loss"]
    assert loss["torch_threads"] == 1
    assert loss["rebuilt"] == trial.user_attrs[METRICS_ATTR]["finetune_loss"]  # bit for bit
