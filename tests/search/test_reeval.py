"""Re-evaluation of the final front with extra fine-tune seeds (reeval.py, front.trials_frame).

Hand-made trials in a real in-memory Optuna study check the merge (mean, spread, drop,
feasibility, front) and the loop (newly-on-front points, duplicates, resume after a kill); the
fine-tune there is replaced by models whose accuracy on the splits is fixed by construction, so
every expected number is exact. One tiny real search checks the whole path end to end.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from autosparse.config.schema import SearchConfig
from autosparse.search.front import REEVAL_PREFIX, stored_reevaluations, trials_frame
from autosparse.search.pareto import pareto_mask
from autosparse.search.reeval import reevaluate_front, wanted_seeds
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.tracking.plots import front_table
from autosparse.workload.evaluate import evaluate
from autosparse.workload.splits import DataSplits

DENSE = 98.0
OBJECTIVES = ["accuracy", "size"]


def candidate(sparsity: float) -> Candidate:
    return Candidate({"fc": LayerChoice.make("unstructured", sparsity, 8)})


def add_trial(study: optuna.Study, accuracy: float, size: float, sparsity: float,
              max_drop: float = 1.0, cached: bool = False) -> None:
    """A completed trial as the objective writes it (metrics, key, constraint value)."""
    cand = candidate(sparsity)
    metrics = {"accuracy": accuracy, "accuracy_drop": DENSE - accuracy, "size_kb": size}
    study.add_trial(optuna.trial.create_trial(
        values=[accuracy, size],
        user_attrs={"candidate": cand.to_json(), "candidate_key": cand.key, "metrics": metrics,
                    "cached": cached},
        constraints={f"accuracy_drop <= {max_drop:g}": DENSE - accuracy - max_drop}))


def new_study() -> optuna.Study:
    return optuna.create_study(directions=["maximize", "minimize"])


def store(study: optuna.Study, number: int, accuracy: list[float], test: list[float]) -> None:
    trial = study.trials[number]
    study.set_user_attr(f"{REEVAL_PREFIX}{number}", {
        "candidate_key": trial.user_attrs["candidate_key"], "seeds": [1, 2][:len(accuracy)],
        "accuracy": accuracy, "test_accuracy": test})


# ---------------------------------------------------------------- the merge in trials_frame


def test_frame_without_reevaluation_has_no_extra_columns():
    study = new_study()
    add_trial(study, 97.5, 10.0, 0.5)
    frame = trials_frame(study, OBJECTIVES)
    assert not {"accuracy_single", "accuracy_std", "accuracy_seeds", "test_accuracy"} \
        & set(frame.columns)
    assert frame.loc[0, "accuracy"] == 97.5 and frame.loc[0, "on_front"]
    assert list(front_table(frame, OBJECTIVES).columns) == \
        ["trial", "accuracy", "size_kb", "accuracy_drop", "layers"]


def test_frame_merges_the_mean_spread_drop_feasibility_and_front():
    study = new_study()
    add_trial(study, 97.5, 10.0, 0.5)   # 0: on front; its seeds pull it below the 1-point bound
    add_trial(study, 97.2, 12.0, 0.3)   # 1: dominated by 0 until 0 falls off
    add_trial(study, 96.8, 8.0, 0.8)    # 2: infeasible (drop 1.2); its seeds lift it to 0.87
    add_trial(study, 96.8, 8.0, 0.8, cached=True)  # 3: a cached repeat of 2 (same key)
    before = trials_frame(study, OBJECTIVES)
    assert before["on_front"].tolist() == [True, False, False, False]

    store(study, 0, [96.5, 96.6], [95.0, 95.5])
    store(study, 2, [97.3, 97.3], [96.0, 97.0])
    frame = trials_frame(study, OBJECTIVES).set_index("trial")

    own = [97.5, 96.5, 96.6]
    assert frame.loc[0, "accuracy_single"] == 97.5
    assert frame.loc[0, "accuracy"] == pytest.approx(np.mean(own))
    assert frame.loc[0, "accuracy_std"] == pytest.approx(np.std(own, ddof=1))
    assert frame.loc[0, "accuracy_seeds"] == 3
    assert frame.loc[0, "test_accuracy"] == pytest.approx(95.25)
    assert frame.loc[0, "accuracy_drop"] == pytest.approx(DENSE - np.mean(own))
    assert not frame.loc[0, "feasible"], "the mean's drop 1.13 breaks 'accuracy_drop <= 1'"
    assert frame.loc[2, "feasible"], "the mean's drop 0.87 meets 'accuracy_drop <= 1'"
    assert frame.loc[2, "accuracy"] == pytest.approx(np.mean([96.8, 97.3, 97.3]))
    # the cached repeat shares its original's re-evaluation
    for column in ("accuracy", "accuracy_std", "accuracy_seeds", "test_accuracy", "feasible"):
        assert frame.loc[3, column] == frame.loc[2, column], column
    # trial 1 was never re-evaluated: its own score, one seed, no spread
    assert frame.loc[1, "accuracy"] == frame.loc[1, "accuracy_single"] == 97.2
    assert frame.loc[1, "accuracy_seeds"] == 1 and np.isnan(frame.loc[1, "accuracy_std"])
    assert np.isnan(frame.loc[1, "test_accuracy"])
    # front with the means: 0 is out (infeasible), 1 comes on, 2 and its repeat come on
    assert frame["on_front"].tolist() == [False, True, True, True]

    table = front_table(frame.reset_index(), OBJECTIVES)
    assert list(table.columns[:6]) == ["trial", "accuracy", "accuracy_std", "accuracy_seeds",
                                       "test_accuracy", "accuracy_single"]
    assert table["trial"].tolist() == [2, 3, 1]


def test_partial_reevaluation_counts_the_seeds_it_has():
    study = new_study()
    add_trial(study, 97.0, 10.0, 0.5)
    store(study, 0, [96.0], [95.0])
    row = trials_frame(study, OBJECTIVES).iloc[0]
    assert row["accuracy"] == pytest.approx(96.5) and row["accuracy_seeds"] == 2


# ---------------------------------------------------------------- the loop in reevaluate_front

N = 100  # images per split: accuracy in whole percent, exactly


class FixedAccuracy(nn.Module):
    """Right on the first ``correct`` of N images (the index is the input's last feature)."""

    def __init__(self, correct: int):
        super().__init__()
        self.correct = correct
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        onehot, index = x[:, :10], x[:, 10]
        wrong = onehot.roll(1, dims=1)
        return torch.where((index < self.correct).unsqueeze(1), onehot, wrong)


def splits() -> DataSplits:
    labels = torch.arange(N) % 10
    x = torch.cat([nn.functional.one_hot(labels, 10).float(), torch.arange(N).float()[:, None]], 1)
    data = TensorDataset(x, labels)
    return DataSplits(data, data, data, input_shape=(11,), num_classes=10)


class ScriptedEvaluator:
    """Stands in for the fine-tune: the accuracy of (candidate, seed) comes from a table."""

    def __init__(self, script: dict[tuple[float, int], int], kill_after: int | None = None):
        self.script, self.kill_after, self.calls = script, kill_after, []

    def compress_and_tune(self, cand: Candidate, cfg):
        if self.kill_after is not None and len(self.calls) == self.kill_after:
            raise KeyboardInterrupt
        sparsity = cand.get_choice("fc").sparsity
        self.calls.append((sparsity, cfg.seed))
        return FixedAccuracy(self.script[sparsity, cfg.seed]), 0.0

    def file_metrics(self, cand: Candidate, model: nn.Module, names: tuple[str, ...]):
        """The model's metric per split, as CandidateEvaluator scores a deployed model."""
        data = splits()
        return [evaluate(model, data.loader(name, data.batch_size)) for name in names]


def context(seeds: int = 2) -> SimpleNamespace:
    config = SearchConfig.model_validate({
        "name": "reeval", "model": {"builtin": "digits-cnn"},
        "finetune": {"reeval_seeds": seeds, "seed": 10}})
    return SimpleNamespace(config=config, data=splits(), finetune=config.finetune)


def loop_study() -> optuna.Study:
    """A (97, 10) ahead of B (96, 12); C (90, 5) cheap; D a cached repeat of C."""
    study = new_study()
    add_trial(study, 97.0, 10.0, 0.5, max_drop=30)  # A
    add_trial(study, 96.0, 12.0, 0.3, max_drop=30)  # B: dominated by A's single score
    add_trial(study, 90.0, 5.0, 0.8, max_drop=30)   # C
    add_trial(study, 90.0, 5.0, 0.8, max_drop=30, cached=True)  # D = C
    return study


# A's extra seeds score 94: mean 95 < B's 96, so B comes on the front and is re-evaluated next.
SCRIPT = {(0.5, 11): 94, (0.5, 12): 94, (0.3, 11): 95, (0.3, 12): 95, (0.8, 11): 91, (0.8, 12): 89}


def test_loop_reevaluates_newly_on_front_points_and_duplicates_once():
    study, evaluator, lines = loop_study(), ScriptedEvaluator(SCRIPT), []
    runs = reevaluate_front(context(), study, lines.append, evaluator=evaluator)

    assert runs == 6 and len(evaluator.calls) == 6
    assert sorted(evaluator.calls) == sorted(SCRIPT), "A, B and C, each seed once; D reuses C"
    stored = stored_reevaluations(study)
    assert set(stored) == {0, 1, 2}
    assert stored[0] == {"candidate_key": candidate(0.5).key, "seeds": [11, 12],
                         "accuracy": [94.0, 94.0], "test_accuracy": [94.0, 94.0]}
    frame = trials_frame(study, OBJECTIVES).set_index("trial")
    assert frame["on_front"].tolist() == [True, True, True, True]
    assert frame.loc[1, "accuracy"] == pytest.approx(np.mean([96, 95, 95]))
    assert frame.loc[3, "accuracy_seeds"] == 3 and frame.loc[3, "test_accuracy"] == 90.0
    assert "re-evaluated trial 0: 97.00 -> 95.00 ± 1.73 (3 seeds), test 94.00" in lines
    assert sum(line.startswith("re-evaluated trial") for line in lines) == 3

    again = ScriptedEvaluator(SCRIPT)
    assert reevaluate_front(context(), study, lines.append, evaluator=again) == 0
    assert again.calls == [], "a finished re-evaluation is never redone"


def test_killed_reevaluation_resumes_without_redoing_a_seed():
    study = loop_study()
    killed = ScriptedEvaluator(SCRIPT, kill_after=3)
    with pytest.raises(KeyboardInterrupt):
        reevaluate_front(context(), study, lambda line: None, evaluator=killed)
    assert len(killed.calls) == 3
    assert sum(len(r["seeds"]) for r in stored_reevaluations(study).values()) == 3

    resumed = ScriptedEvaluator(SCRIPT)
    assert reevaluate_front(context(), study, lambda line: None, evaluator=resumed) == 3
    assert not set(killed.calls) & set(resumed.calls), "no seed scored twice"
    assert sorted(killed.calls + resumed.calls) == sorted(SCRIPT)


def test_more_seeds_later_only_adds_the_new_ones():
    study = loop_study()
    reevaluate_front(context(seeds=1), study, lambda line: None,
                     evaluator=ScriptedEvaluator(SCRIPT))
    more = ScriptedEvaluator(SCRIPT)
    reevaluate_front(context(seeds=2), study, lambda line: None, evaluator=more)
    assert more.calls and {seed for _, seed in more.calls} == {12}


class DivergesOnce(ScriptedEvaluator):
    def compress_and_tune(self, cand: Candidate, cfg):
        if (cand.get_choice("fc").sparsity, cfg.seed) == (0.8, 12):
            self.calls.append((0.8, 12))
            raise ValueError("fine-tune diverged: loss inf")
        return super().compress_and_tune(cand, cfg)


def test_a_seed_that_fails_is_stored_reported_and_never_retried():
    study, lines = loop_study(), []
    evaluator = DivergesOnce(SCRIPT)
    reevaluate_front(context(), study, lines.append, evaluator=evaluator)
    record = stored_reevaluations(study)[2]
    assert record["seeds"] == [11] and record["failed"] == {"12": "ValueError: fine-tune "
                                                             "diverged: loss inf"}
    assert any("trial 2:" in line and "seed 12 failed" in line for line in lines), lines
    row = trials_frame(study, OBJECTIVES).set_index("trial").loc[2]
    assert row["accuracy"] == pytest.approx(90.5) and row["accuracy_seeds"] == 2
    again = DivergesOnce(SCRIPT)
    assert reevaluate_front(context(), study, lines.append, evaluator=again) == 0
    assert again.calls == []


def test_zero_seeds_is_off():
    study, evaluator = loop_study(), ScriptedEvaluator(SCRIPT)
    assert reevaluate_front(context(seeds=0), study, lambda line: None, evaluator=evaluator) == 0
    assert evaluator.calls == [] and not stored_reevaluations(study)
    assert wanted_seeds(3, 2) == [4, 5]
    with pytest.raises(ValueError, match="-1"):
        wanted_seeds(0, -1)


# ---------------------------------------------------------------- a tiny real search


@pytest.mark.integration
def test_tiny_search_reevaluates_its_front(tmp_path, one_thread):
    from autosparse.search.runner import run_search

    config = {
        "name": "reeval-e2e", "model": {"builtin": "digits-cnn", "train_epochs": 2},
        "space": {"default": {"sparsity": [0.0, 0.5, 0.8], "patterns": ["unstructured"],
                              "bits": [4, 8]}},
        "strategy": {"name": "random"}, "budget": {"trials": 4},
        "constraints": ["accuracy_drop <= 30"], "finetune": {"steps": 8, "reeval_seeds": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "reeval.yaml"
    path.write_text(yaml.safe_dump(config))
    lines: list[str] = []
    outcome = run_search(path, runs_dir=tmp_path, printer=lines.append)

    study = optuna.load_study(study_name="reeval-e2e",
                              storage=f"sqlite:///{tmp_path / 'reeval-e2e' / 'study.db'}")
    stored = stored_reevaluations(study)
    frame = outcome.trials
    front = frame[frame["on_front"]]
    keys = {study.trials[n].user_attrs["candidate_key"] for n in front["trial"]}
    assert {r["candidate_key"] for r in stored.values()} >= keys, "every front point re-evaluated"
    for number, record in stored.items():
        assert record["seeds"] == [1] and len(record["accuracy"]) == len(record["test_accuracy"]) == 1
        row = frame.set_index("trial").loc[number]
        own = study.trials[number].user_attrs["metrics"]["accuracy"]
        assert row["accuracy_single"] == own
        assert row["accuracy"] == pytest.approx((own + record["accuracy"][0]) / 2)
        assert row["test_accuracy"] == pytest.approx(record["test_accuracy"][0])
    assert (front["accuracy_seeds"] == 2).all()
    # the front is the one of the means
    values = frame[["accuracy", "size_kb"]].to_numpy(float)
    usable = frame["feasible"].to_numpy(bool) & (frame["state"] == "COMPLETE").to_numpy()
    assert frame["on_front"].tolist() == pareto_mask(values, ["maximize", "minimize"],
                                                     usable).tolist()
    written = pd.read_csv(tmp_path / "reeval-e2e" / "trials.csv")
    assert {"accuracy_single", "accuracy_std", "accuracy_seeds", "test_accuracy"} <= \
        set(written.columns)
    assert {"accuracy_std", "test_accuracy"} <= set(pd.read_csv(
        tmp_path / "reeval-e2e" / "pareto.csv").columns)
    assert sum(line.startswith("re-evaluated trial") for line in lines) == len(stored)

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=config["tracking"]["uri"])
    experiment = client.get_experiment_by_name("reeval-e2e")
    children = {int(r.data.tags["autosparse.trial"]): r for r in client.search_runs(
        [experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags}
    for number in front["trial"]:
        metrics = children[int(number)].data.metrics
        assert metrics["accuracy_mean"] == pytest.approx(frame.set_index("trial").loc[
            number, "accuracy"])
        assert metrics["accuracy"] == study.trials[number].user_attrs["metrics"]["accuracy"]
        assert "test_accuracy" in metrics and "accuracy_std" in metrics

    # export checks its rebuild against the trial's own seed and reports the mean beside it
    from autosparse.export.exporter import ExportRequest, run_export

    number = int(front["trial"].iloc[0])
    row = frame.set_index("trial").loc[number]
    report = run_export(path, ExportRequest(trial=number, mlflow=False, timing_rounds=1,
                                            timing_calls=1), runs_dir=tmp_path,
                        printer=lambda line: None).report
    validation = report["validation_accuracy"]
    assert validation["search"] == pytest.approx(row["accuracy"])
    assert validation["search_single"] == row["accuracy_single"]
    assert validation["rebuilt"] == pytest.approx(row["accuracy_single"], abs=1.0)
    assert report["reevaluation"] == pytest.approx({
        "accuracy_seeds": 2, "accuracy_std": row["accuracy_std"],
        "test_accuracy": row["test_accuracy"]})
    markdown = (tmp_path / "reeval-e2e" / "export" / f"trial-{number}" / "report.md").read_text()
    assert "over 2 fine-tune seeds" in markdown

    # a resumed search whose budget is used: nothing fine-tuned again, same front
    lines.clear()
    again = run_search(path, runs_dir=tmp_path, printer=lines.append)
    assert not any(line.startswith("re-evaluat") for line in lines), lines
    assert again.front["trial"].tolist() == outcome.front["trial"].tolist()
    assert Path(tmp_path / "reeval-e2e" / "pareto.csv").is_file()
