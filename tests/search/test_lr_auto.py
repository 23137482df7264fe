"""``finetune.lr: auto``: probed once per study, charged to the budget, read back by resumes and
exports, logged to MLflow."""

from __future__ import annotations

import json

import pytest

from autosparse.cli import main
from autosparse.compress.lr_probe import DEFAULT_LRS
from autosparse.config.schema import ConfigError, parse_config
from autosparse.search.lr_choice import LR_ATTR
from autosparse.search.runner import run_search
from tests.search_helpers import load_study, mlflow_runs, write_config


@pytest.mark.parametrize("lr, message", [
    ("fast", "finetune.lr: must be a number above 0, or 'auto' (got 'fast')"),
    (-0.1, "finetune.lr: must be above 0, or 'auto' (got -0.1)"),
], ids=["word", "negative"])
def test_lr_is_a_positive_number_or_auto(lr, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "model": {"builtin": "digits-cnn"}, "finetune": {"lr": lr}})
    assert message in str(err.value)
    assert parse_config({"name": "x", "model": {"builtin": "digits-cnn"},
                         "finetune": {"lr": "auto"}}).finetune.lr == "auto"


@pytest.mark.integration
def test_auto_lr_is_probed_once_charged_to_the_budget_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    path = write_config(tmp_path, "auto", budget={"trials": 5},
                        finetune={"steps": 10, "lr": "auto", "reeval_seeds": 0})
    lines: list[str] = []
    outcome = run_search(path, runs_dir=runs, printer=lines.append)
    study = load_study(runs, "auto")
    stored = study.user_attrs[LR_ATTR]
    assert stored["chosen"] in DEFAULT_LRS
    # 3 candidates x 5 rates x 2 steps (20 % of 10): 30 steps = 3 fine-tunes of the budget
    assert stored["steps"] == 30
    assert len(outcome.trials) == 5 - 3
    assert any(line.startswith("finetune.lr auto: ") for line in lines)
    assert any("count in the budget as 3 trials" in line for line in lines)
    _, parents, _ = mlflow_runs(runs, "auto")
    params = parents[0].data.params
    assert float(params["finetune_lr"]) == stored["chosen"]
    assert params["lr_probe.chosen"] == f"{stored['chosen']:g}"

    again: list[str] = []
    run_search(path, runs_dir=runs, printer=again.append)  # budget used: no new probe
    assert not any(line.startswith("finetune.lr auto: probing") for line in again)
    assert load_study(runs, "auto").user_attrs[LR_ATTR] == stored

    number = int(outcome.trials["trial"].iloc[0])
    assert main(["--runs-dir", str(runs), "export", str(path), "--trial", str(number),
                 "--no-mlflow"]) == 0  # the rebuild matches the trial: same probed lr
    report = json.loads((runs / "auto" / "export" / f"trial-{number}" / "report.json")
                        .read_text())
    own = report["validation_accuracy"]
    assert own["rebuilt"] == pytest.approx(own["search_single"], abs=1e-9)
