"""A study belongs to one configuration: another model, data, space, task or fine-tune recipe
under the same name is refused before anything is built, naming what differs; ``--fresh`` keeps
the earlier study as ``<name>.previous-N`` and starts the name afresh."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from autosparse.cli import main
from autosparse.config.schema import parse_config
from autosparse.search.runner import run_search
from autosparse.search.study_identity import differences, signature, signature_parts
from tests.search_helpers import load_study, write_config

BASE = {"name": "s", "model": {"builtin": "digits-cnn"}}


def test_differences_name_each_changed_field_and_ignore_how_long_or_where():
    config = parse_config(BASE)
    stored = signature(config)
    assert differences(config, stored) == []
    longer = parse_config({**BASE, "budget": {"trials": 999}, "strategy": {"name": "bo"},
                           "finetune": {"reeval_seeds": 5, "amp": True}, "device": "cpu"})
    assert differences(longer, stored) == []  # budget, strategy, re-scoring, device: allowed
    other = parse_config({**BASE, "model": {"builtin": "digits-mlp"},
                          "finetune": {"lr": 0.01}})
    assert differences(other, stored) == ['finetune.lr: 0.001 -> 0.01',
                                          'model.builtin: "digits-cnn" -> "digits-mlp"']


def test_a_first_version_signature_is_compared_on_what_it_stored():
    config = parse_config(BASE)
    parts = signature_parts(config)
    legacy = json.dumps({"objectives": parts["objectives"], "space": parts["space"]},
                        sort_keys=True)  # what studies stored before model/data/finetune
    assert differences(config, legacy) == []
    assert differences(parse_config({**BASE, "model": {"builtin": "digits-mlp"}}), legacy) == []
    macs = parse_config({**BASE, "objectives": ["accuracy", "macs"]})
    assert differences(macs, legacy) == ['objectives: ["accuracy", "size"] -> ["accuracy", "macs"]']


@pytest.mark.integration
def test_another_configuration_is_refused_before_training_and_fresh_keeps_the_old(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    first = write_config(tmp_path, "same", budget={"trials": 2})
    run_search(first, runs_dir=runs, printer=lambda line: None)
    before = sorted(p.name for p in (runs / "dense").iterdir())
    trials = len(load_study(runs, "same").trials)
    capsys.readouterr()  # the first search's own lines

    other = tmp_path / "other" / "same.yaml"
    other.parent.mkdir()
    data = yaml.safe_load(first.read_text())
    data["model"] = {"builtin": "digits-mlp", "train_epochs": 4}
    data["finetune"] = {**data["finetune"], "steps": 9}
    other.write_text(yaml.safe_dump(data))
    for extra in ([], ["--extend", "3"]):
        assert main(["--runs-dir", str(runs), "search", str(other), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: the study 'same'")
        assert "model.builtin" in err[0] and "finetune.steps: 8 -> 9" in err[0]
        assert "new 'name'" in err[0] and "--fresh" in err[0]
    assert sorted(p.name for p in (runs / "dense").iterdir()) == before  # nothing trained
    assert len(load_study(runs, "same").trials) == trials  # the earlier study untouched

    assert main(["--runs-dir", str(runs), "search", str(other), "--fresh"]) == 0
    assert "is kept as 'same.previous-1'" in capsys.readouterr().out
    kept = optuna.load_study(study_name="same.previous-1",
                             storage=f"sqlite:///{runs / 'same.previous-1' / 'study.db'}")
    assert len(kept.trials) == trials  # the earlier study, whole, under its new name
    assert (runs / "same.previous-1" / "trials.csv").is_file()
    fresh = load_study(runs, "same")
    assert json.loads(fresh.user_attrs["autosparse.signature"])["model"]["builtin"] == \
        "digits-mlp"
    # the kept study opens with its own config under the new name
    data = yaml.safe_load(first.read_text())
    data["name"] = "same.previous-1"
    renamed = tmp_path / "same.previous-1.yaml"
    renamed.write_text(yaml.safe_dump(data))
    assert main(["--runs-dir", str(runs), "front", str(renamed)]) == 0
