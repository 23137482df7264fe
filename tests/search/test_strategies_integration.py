"""The strategies of the per-layer model end to end: knapsack, grid-global, GA/BO with sensitivity
(seeds, screening), and multi-fidelity under a fine-tune-step budget, MLflow included."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import optuna
import pytest
import yaml
from search_helpers import ROOT, load_study, mlflow_runs, write_config

from autosparse.search.fidelity import LOW_ATTR, STEPS_ATTR
from autosparse.search.objective import CANDIDATE_ATTR, KEY_ATTR, WORKER_ATTR
from autosparse.search.runner import prepare, run_search
from autosparse.search.samplers.knapsack import SEEDS_PER_OBJECTIVE, seed_candidates
from autosparse.space.candidate import Candidate

pytestmark = pytest.mark.integration
QUIET = dict(printer=lambda line: None)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def test_knapsack_measures_sensitivity_once_and_logs_it(runs_dir):
    config = write_config(runs_dir, "knap", strategy={"name": "knapsack"}, budget={"trials": 5})
    lines: list[str] = []
    outcome = run_search(config, runs_dir=runs_dir, printer=lines.append)
    assert (outcome.trials["state"] == "COMPLETE").all() and len(outcome.trials) == 5
    assert outcome.trials["candidate"].nunique() == 5, "a duplicate never costs a trial"
    assert any(line.startswith("sensitivity:") and "reused" not in line for line in lines)
    study = load_study(runs_dir, "knap")
    assert json.loads(study.user_attrs["autosparse.search.sensitivity"])["complete"]
    client, parents, children = mlflow_runs(runs_dir, "knap")
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"sensitivity.csv", "sensitivity.png"} <= artifacts
    assert "sensitivity_seconds" in parents[0].data.metrics and len(children) == 5

    again: list[str] = []
    more = run_search(config, runs_dir=runs_dir, extend=2, printer=again.append)
    assert more.new_trials == 2
    assert any("all reused from the study" in line for line in again)


def test_ga_starts_from_budgeted_allocations_and_bo_screens(runs_dir):
    config = write_config(runs_dir, "ga-sens", budget={"trials": 6})
    outcome = run_search(config, runs_dir=runs_dir, **QUIET)
    context = prepare(config, runs_dir)
    context.open_study()
    seeds = [c.key for c in seed_candidates(context.space, context.planner, 2)]  # population 4 / 2
    first = [Candidate.from_json(c).key for c in outcome.trials["candidate"][:2]]
    assert first == seeds
    bo = write_config(runs_dir, "bo-screen", strategy={"name": "bo", "startup_trials": 2,
                                                       "screen": 4}, budget={"trials": 6})
    frame = run_search(bo, runs_dir=runs_dir, **QUIET).trials
    assert (frame["state"] == "COMPLETE").all() and frame["candidate"].nunique() == 6


def test_hybrid_hands_the_planners_trials_to_the_ga(runs_dir):
    """A real hybrid search: sensitivity measured, the first trials the planner's seeds, the rest
    bred (no duplicate), a resumed search goes on with the GA."""
    config = write_config(runs_dir, "hybrid", strategy={"name": "hybrid", "knapsack_trials": 3},
                          budget={"trials": 6})
    outcome = run_search(config, runs_dir=runs_dir, **QUIET)
    frame = outcome.trials
    assert (frame["state"] == "COMPLETE").all() and frame["candidate"].nunique() == 6
    context = prepare(config, runs_dir)
    assert type(context.open_study().sampler).__name__ == "HybridSampler"
    n_seeds = SEEDS_PER_OBJECTIVE * len(context.planner.objectives)  # the knapsack's sweep
    seeds = [c.key for c in seed_candidates(context.space, context.planner, n_seeds)][:3]
    assert [Candidate.from_json(c).key for c in frame["candidate"][:3]] == seeds
    more = run_search(config, runs_dir=runs_dir, extend=2, **QUIET)
    assert more.new_trials == 2 and more.trials["candidate"].nunique() == 8


def test_grid_global_is_exact_global_magnitude_times_uniform_bits(runs_dir):
    config = write_config(runs_dir, "gglobal", strategy={"name": "grid-global"},
                          budget={"trials": 100},
                          space={"default": {"sparsity": [0.0, 0.8], "patterns": ["unstructured"],
                                             "bits": [8, 32]}})
    outcome = run_search(config, runs_dir=runs_dir, **QUIET)
    assert len(outcome.trials) == 4, "dense x 2 widths + one global threshold x 2 widths"
    sparse = [Candidate.from_json(c) for c in outcome.trials["candidate"]
              if any(ch.sparsity for ch in Candidate.from_json(c).values())]
    assert len(sparse) == 2
    per_layer = {round(ch.sparsity, 6) for ch in sparse[0].values()}
    assert len(per_layer) > 1, "one global threshold gives every layer its own sparsity"
    assert all(len({ch.bits for ch in c.values()}) == 1 for c in sparse)


def test_fine_tune_step_budget_screens_at_low_fidelity(runs_dir):
    config = write_config(runs_dir, "fidelity", strategy={"name": "random"},
                          budget={"trials": 100, "finetune_steps": 8 * 12},
                          finetune={"steps": 12}, fidelity={"low_steps": 3})
    outcome = run_search(config, runs_dir=runs_dir, **QUIET)
    frame = outcome.trials
    assert set(frame["fidelity"]) <= {"low", "full"}
    assert 8 * 12 <= frame["finetune_steps_used"].sum() <= 8 * 12 + 12
    pruned = frame[frame["state"] == "PRUNED"]
    full = frame[frame["state"] == "COMPLETE"]
    assert (full["finetune_steps_used"] == 12).all() and (pruned["finetune_steps_used"] <= 3).all()
    assert not pruned["on_front"].any()
    on_disk = __import__("pandas").read_csv(runs_dir / "fidelity" / "trials.csv")
    assert {"fidelity", "finetune_steps_used"} <= set(on_disk.columns)
    _, _, children = mlflow_runs(runs_dir, "fidelity")
    assert {c.data.params.get("fidelity") for c in children} == set(frame["fidelity"])


def test_a_trial_killed_after_its_short_fine_tune_is_rerun_without_redoing_it(runs_dir):
    config = write_config(runs_dir, "killed-low", strategy={"name": "random"},
                          budget={"finetune_steps": 2 * 12}, finetune={"steps": 12},
                          fidelity={"low_steps": 3})
    context = prepare(config, runs_dir)
    study = context.open_study()
    candidate = context.space.snap({})  # dense everywhere: promoted on an empty pool
    params = context.space.params_of(candidate)
    study.enqueue_trial(params)
    trial = study.ask({name: optuna.distributions.CategoricalDistribution(
        list(context.space.choices(name))) for name in params})  # takes the enqueued values
    low = {"accuracy": 97.0, "accuracy_drop": 1.0, "size_kb": 190.0}
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:999999999")  # a dead process
    trial.set_user_attr(KEY_ATTR, candidate.key)
    trial.set_user_attr(CANDIDATE_ATTR, candidate.to_json())
    trial.set_user_attr(LOW_ATTR, low)
    trial.set_user_attr(STEPS_ATTR, 3)
    killed = trial.number

    lines: list[str] = []
    run_search(config, runs_dir=runs_dir, printer=lines.append)
    study = load_study(runs_dir, "killed-low")
    assert study.trials[killed].state.name == "FAIL" and any("cut short" in l for l in lines)
    rerun = next(t for t in study.trials
                 if t.number > killed and t.user_attrs.get(KEY_ATTR) == candidate.key)
    assert rerun.user_attrs[LOW_ATTR] == low, "the stored short result was reused, not redone"
    assert rerun.user_attrs[STEPS_ATTR] in (0, 12), "no short steps spent again"


def test_shipped_resnet_config_runs(runs_dir, tmp_path):
    config = yaml.safe_load((ROOT / "search_spaces" / "digits-resnet.yaml").read_text())
    config.update(name="resnet-smoke", budget={"trials": 2})
    config["finetune"].update(steps=3, reeval_seeds=0)
    config["model"]["train_epochs"] = 1
    config["sensitivity"] = {"samples": 64}  # a smoke test: most of its time was this pass
    path = tmp_path / "resnet.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_search(path, runs_dir=runs_dir, **QUIET)
    assert (outcome.trials["state"] == "COMPLETE").all()
    assert len(prepare(path, runs_dir).space.layer_names) >= 12
