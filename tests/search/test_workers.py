"""Workers die with their parent; the thread count follows the user's settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from autosparse.search.workers import thread_count

ROOT = Path(__file__).resolve().parents[2]


def test_thread_count_follows_flag_env_and_affinity(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_count(1) == 3 and thread_count(2) == 1 and thread_count(4) == 1
    assert thread_count(2, threads=8) == 4  # the flag wins over the environment
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count(1) == len(os.sched_getaffinity(0))


@pytest.mark.integration
def test_sigkilled_parent_leaves_no_live_worker(tmp_path):
    config = {"name": "orphans", "model": {"builtin": "digits-cnn", "train_epochs": 1},
              "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"],
                                    "bits": [8, 32]}},
              "strategy": {"name": "random"}, "budget": {"trials": 500},
              "finetune": {"steps": 200, "reeval_seeds": 0}}
    path = tmp_path / "orphans.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    parent = subprocess.Popen(
        [sys.executable, "-m", "autosparse.cli", "--runs-dir", str(tmp_path / "runs"), "search",
         str(path), "--workers", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        children: list[psutil.Process] = []
        while time.time() < deadline and not children:
            children = [c for c in psutil.Process(parent.pid).children(recursive=True)
                        if "spawn" in " ".join(c.cmdline())]
            time.sleep(0.5)
        assert children, "the second worker never started"
        time.sleep(2)  # let it get into its trial loop
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        for process in psutil.Process().children(recursive=True):
            process.kill()


@pytest.mark.integration
def test_ctrl_c_prints_one_line_and_closes_the_mlflow_parent_run(tmp_path):
    import mlflow

    config = {"name": "ctrlc", "model": {"builtin": "digits-cnn", "train_epochs": 1},
              "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"],
                                    "bits": [8, 32]}},
              "strategy": {"name": "random"}, "budget": {"trials": 500},
              "finetune": {"steps": 100, "reeval_seeds": 0}}
    path = tmp_path / "ctrlc.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # a test run started in the background (`cmd &` without job control) ignores SIGINT, and
    # the child would inherit that: give it the default a terminal's Ctrl-C meets
    process = subprocess.Popen(
        [sys.executable, "-m", "autosparse.cli", "--runs-dir", str(runs), "search", str(path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 90
    line = ""
    while time.time() < deadline and not line.startswith("[2/"):
        line = process.stdout.readline()
    assert line.startswith("[2/"), "no trial finished"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in err and "interrupted:" in err
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctrlc")
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("autosparse.role") == "search"]
    assert [r.info.status for r in parents] == ["KILLED"]
