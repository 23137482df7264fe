"""Tiny real searches end to end: config -> study -> fine-tuned candidates -> front -> MLflow.

All searches share one runs directory, so the dense model is trained once and MLflow creates its
database once; each search has its own name (study and experiment).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from autosparse.cli import main
from autosparse.search.runner import run_search
from autosparse.space.candidate import Candidate
from search_helpers import ROOT, load_study, mlflow_runs, write_config  # noqa: E402

pytestmark = pytest.mark.integration
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("strategy", ["ga", "bo"])
def test_search_end_to_end_logs_front_to_mlflow(runs_dir, strategy):
    name = f"e2e-{strategy}"
    config = write_config(runs_dir, name, strategy={"name": strategy, "population_size": 4,
                                                     "startup_trials": 3})
    outcome = run_search(config, runs_dir=runs_dir, printer=lambda line: None)

    assert len(outcome.trials) == 6 and (outcome.trials["state"] == "COMPLETE").all()
    assert not outcome.front.empty and outcome.hypervolume["hypervolume_wide"] > 0
    assert (runs_dir / name / "pareto.csv").is_file()

    client, parents, children = mlflow_runs(runs_dir, name)
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.tags["autosparse.strategy"] == strategy
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "layer_table.csv", "pareto.csv", "pareto.html", "pareto.png"} <= artifacts
    history = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert [m.step for m in history] == sorted({m.step for m in history}) and len(history) == 6
    on_front = [c for c in children if c.data.tags["autosparse.on_front"] == "true"]
    assert len(on_front) == len(outcome.front)
    child = children[0]
    assert "conv2.bits" in child.data.params and "accuracy" in child.data.metrics
    assert child.info.status == "FINISHED"


def test_rerun_reports_without_new_trials_and_extend_adds(runs_dir):
    config = write_config(runs_dir, "rerun", budget={"trials": 3})
    first = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    lines: list[str] = []
    again = run_search(config, runs_dir=runs_dir, printer=lines.append)
    assert again.new_trials == 0 and len(again.trials) == 3
    assert any("already used" in line for line in lines)
    assert again.trials["trial"].tolist() == first.trials["trial"].tolist()
    more = run_search(config, runs_dir=runs_dir, extend=2, printer=lambda line: None)
    assert more.new_trials == 2 and len(more.trials) == 5
    _, parents, children = mlflow_runs(runs_dir, "rerun")
    assert len(parents) == 1 and len(children) == 5


def test_killed_search_resumes_without_losing_trials(runs_dir):
    config = write_config(runs_dir, "killed", budget={"trials": 6}, finetune={"steps": 100})
    command = [sys.executable, "-m", "autosparse.cli", "--runs-dir", str(runs_dir), "search", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 240
    finished_before: dict[int, tuple] = {}
    try:
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.3)
            try:
                trials = load_study(runs_dir, "killed").get_trials(states=[optuna.trial.TrialState.COMPLETE])
            except Exception:  # the study is not created yet
                continue
            if len(trials) >= 2:
                finished_before = {t.number: (t.values, t.params) for t in trials}
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert len(finished_before) >= 2, "the search did not get going in time"

    lines: list[str] = []
    outcome = run_search(config, runs_dir=runs_dir, printer=lines.append)
    study = load_study(runs_dir, "killed")
    complete = {t.number: (t.values, t.params) for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])}
    assert len(complete) == 6, "the budget counts finished trials only"
    for number, result in finished_before.items():
        assert complete[number] == result, "a finished trial was lost or re-run"
    failed = outcome.trials[outcome.trials["state"] == "FAIL"]
    assert all(reason.startswith("interrupted") for reason in failed["fail_reason"])
    if len(failed):
        assert any("cut short" in line for line in lines)


def test_two_workers_share_one_study(runs_dir):
    config = write_config(runs_dir, "workers", budget={"trials": 6}, strategy={"name": "random"},
                          finetune={"steps": 120})  # long enough for the second process to start
    outcome = run_search(config, runs_dir=runs_dir, workers=2, printer=lambda line: None)
    study = load_study(runs_dir, "workers")
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2, "both processes ran trials"
    # two workers may both start the last trial: the one with the higher number stops at once
    assert (outcome.trials["state"] == "COMPLETE").sum() == 6 and len(outcome.trials) <= 7
    extra = outcome.trials[outcome.trials["state"] != "COMPLETE"]
    assert (extra["state"] == "INTERRUPTED").all()
    assert extra["fail_reason"].str.contains("budget was used up").all()
    _, _, children = mlflow_runs(runs_dir, "workers")
    assert len(children) == len(outcome.trials)


def test_diverging_candidates_are_recorded_and_the_search_goes_on(runs_dir, capsys):
    config = write_config(runs_dir, "diverge", finetune={"lr": 1.0e6, "steps": 20}, budget={"trials": 3})
    assert main(["--runs-dir", str(runs_dir), "search", str(config)]) == 1  # nothing completed
    study = load_study(runs_dir, "diverge")
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
    assert all("CandidateDiverged" in t.user_attrs["fail_reason"] for t in study.trials)
    _, _, children = mlflow_runs(runs_dir, "diverge")
    assert {c.info.status for c in children} == {"FAILED"}
    assert "front is empty" in capsys.readouterr().out


def test_grid_uniform_and_time_budget(runs_dir):
    config = write_config(runs_dir, "grid", strategy={"name": "grid-uniform"}, budget={"trials": 500},
                          space={"default": {"sparsity": [0.5], "patterns": ["unstructured"], "bits": [4, 8]}})
    outcome = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    assert len(outcome.trials) == 2, "the grid has two uniform points"
    for text in outcome.trials["candidate"]:
        assert len(set(Candidate.from_json(text).values())) == 1, "one choice on every layer"
    timed = write_config(runs_dir, "timed", budget={"trials": None, "minutes": 0.05}, finetune={"steps": 60})
    start = time.time()
    outcome = run_search(timed, runs_dir=runs_dir, printer=lambda line: None)
    assert 1 <= len(outcome.trials) and time.time() - start < 120


def test_shipped_quickstart_runs(runs_dir, tmp_path):
    config = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    config.update(name="quickstart-smoke", budget={"trials": 2})
    config["finetune"]["steps"] = 5
    config["model"]["train_epochs"] = 2
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_search(path, runs_dir=runs_dir, printer=lambda line: None)
    assert (outcome.trials["state"] == "COMPLETE").all()


def test_cli_errors_name_the_problem(runs_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "model": {"builtin": "digits-cnn"},
                                   "strategy": {"name": "annealing"}}))
    assert main(["search", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "strategy.name" in err and "annealing" in err and "grid-uniform" in err
    assert main(["search", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_space_command_prints_layer_table(runs_dir, capsys):
    config = write_config(runs_dir, "space-cmd")
    assert main(["--runs-dir", str(runs_dir), "space", str(config)]) == 0
    out = capsys.readouterr().out
    for piece in ("conv1", "fc2", "MACs/sample", "2:4 not possible for conv1", "distinct candidates"):
        assert piece in out


def test_same_seed_repeats_the_search(runs_dir):
    runs = []
    for name in ("repeat-a", "repeat-b"):
        config = write_config(runs_dir, name, seed=3, budget={"trials": 7})
        runs.append(run_search(config, runs_dir=runs_dir, printer=lambda line: None).trials)
    assert runs[0]["candidate"].tolist() == runs[1]["candidate"].tolist()
    assert runs[0]["accuracy"].tolist() == runs[1]["accuracy"].tolist()


def test_a_study_started_afresh_gets_a_new_parent_run(runs_dir):
    config = write_config(runs_dir, "afresh", budget={"trials": 2})
    first = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    (runs_dir / "afresh" / "study.db").unlink()
    second = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    assert second.parent_run_id != first.parent_run_id
    client, parents, children = mlflow_runs(runs_dir, "afresh")
    assert len(parents) == 2 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {first.parent_run_id, second.parent_run_id}
