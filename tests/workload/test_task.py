"""The Task: built-in losses, metrics, distillation and directions; user import paths; the
config's task section; the names a task's metric is shown under."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autosparse.compress.finetune import FinetuneSession, distill_loss
from autosparse.config.objectives import shown_metric, shown_metrics
from autosparse.config.schema import parse_config
from autosparse.config.sections import FinetuneConfig
from autosparse.config.validation import ConfigError
from autosparse.search.front import HypervolumeSpec
from autosparse.space.discovery import example_input
from autosparse.workload.evaluate import evaluate
from autosparse.workload.task import CLASSIFICATION, build_task, model_outputs
from autosparse.workload.task_builtins import TinyLM, markov_tokens

BASE = {"name": "t", "model": {"builtin": "digits-mlp"}}


def task_of(**task):
    return build_task(parse_config({**BASE, "task": task}).task)


def batches(x, y, size=4):
    return DataLoader(TensorDataset(x, y), batch_size=size)


# ------------------------------------------------------------------ classification unchanged


def test_default_task_is_classification_with_the_historic_loss_and_metric():
    task = build_task(parse_config(BASE).task)
    assert task is CLASSIFICATION and task.is_default
    assert (task.name, task.direction, task.percent) == ("accuracy", "maximize", True)
    torch.manual_seed(0)
    student, teacher, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    for w in (0.0, 0.7, 1.0):
        ours = task.finetune_loss(student, teacher if w else None, y, 4.0, w)
        assert torch.equal(ours, distill_loss(student, teacher if w else None, y, 4.0, w))


def test_topk_counts_a_hit_anywhere_in_the_k_best():
    logits = torch.tensor([[0.9, 0.5, 0.1], [0.1, 0.5, 0.9], [0.5, 0.9, 0.1], [0.9, 0.1, 0.5]])
    y = torch.tensor([1, 0, 1, 2])
    model = nn.Identity()
    top1 = evaluate(model, batches(logits, y), CLASSIFICATION)
    top2 = task_of(metric="top2").evaluate(model, batches(logits, y))
    assert top1 == 25.0  # only row 2
    assert top2 == 75.0  # rows 0, 2, 3 (row 1's label is the worst of three)
    assert task_of(metric="top2").name == "top2"


# ------------------------------------------------------------------ regression


def test_regression_mse_and_mae_on_hand_checked_values():
    outputs = torch.tensor([[1.0], [2.0], [4.0]])
    y = torch.tensor([1.0, 0.0, 1.0])  # (B,) targets against (B, 1) outputs
    model = nn.Identity()
    mse, mae = task_of(kind="regression"), task_of(kind="regression", metric="mae")
    assert mse.evaluate(model, batches(outputs, y, 2)) == pytest.approx((0 + 4 + 9) / 3)
    assert mae.evaluate(model, batches(outputs, y, 2)) == pytest.approx((0 + 2 + 3) / 3)
    assert (mse.name, mse.direction, mse.percent) == ("mse", "minimize", False)
    assert float(mse.loss(outputs, y)) == pytest.approx(13 / 3)


def test_regression_distillation_is_mse_to_the_teacher():
    task = task_of(kind="regression")
    student, teacher, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [3.0]]), \
        torch.tensor([0.0, 0.0])
    pure = task.finetune_loss(student, teacher, y, 4.0, 1.0)
    assert float(pure) == pytest.approx(0.5)  # ((1-2)^2 + 0) / 2; temperature unused
    mixed = task.finetune_loss(student, teacher, y, 4.0, 0.5)
    assert float(mixed) == pytest.approx(0.5 * 0.5 + 0.5 * (1 + 9) / 2)


def test_drop_is_positive_when_worse_in_either_direction():
    mse, acc = task_of(kind="regression"), CLASSIFICATION
    assert mse.drop(dense=0.5, value=0.7) == pytest.approx(0.2)
    assert acc.drop(dense=97.0, value=95.0) == pytest.approx(2.0)
    assert mse.improved(1.0, 0.25) == 0.75 and acc.improved(90.0, 0.5) == 90.5


def test_finetune_session_trains_a_regression_student_with_the_task_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    teacher = nn.Linear(3, 1)
    student = nn.Linear(3, 1)
    task = task_of(kind="regression")
    before = task.evaluate(student, batches(x, y, 16))
    cfg = FinetuneConfig(steps=200, lr=0.05, distill_weight=0.0)
    with FinetuneSession(student, teacher, batches(x, y, 16), cfg, task) as session:
        session.run_until()
    assert task.evaluate(student, batches(x, y, 16)) < 0.05 * before


# ------------------------------------------------------------------ language model


def test_perplexity_is_exp_of_mean_token_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 7)
    y = torch.randint(0, 7, (6, 5))
    task = task_of(kind="language-model")
    expected = math.exp(float(F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))))
    assert task.evaluate(nn.Identity(), batches(logits, y, 4)) == pytest.approx(expected, rel=1e-5)
    uniform = torch.zeros(2, 3, 7)
    assert task.evaluate(nn.Identity(), batches(uniform, torch.zeros(2, 3).long())) == \
        pytest.approx(7.0)
    assert (task.name, task.direction) == ("perplexity", "minimize")


class HFStyle(nn.Module):
    """Returns an object with ``.logits``, as transformers' causal LMs do."""

    def forward(self, x):
        return SimpleNamespace(logits=x, loss=None)


def test_language_model_outputs_with_logits_attribute_and_per_token_distillation():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 3, 6), torch.randint(0, 6, (4, 3))
    task = task_of(kind="language-model")
    assert task.evaluate(HFStyle(), batches(logits, y)) == \
        pytest.approx(task.evaluate(nn.Identity(), batches(logits, y)))
    same = task.finetune_loss(HFStyle()(logits), HFStyle()(logits), y, 2.0, 1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)  # KL of identical distributions
    other = torch.randn(4, 3, 6)
    per_token = 4.0 * F.kl_div(F.log_softmax(logits.reshape(-1, 6) / 2, -1),
                               F.log_softmax(other.reshape(-1, 6) / 2, -1),
                               log_target=True, reduction="batchmean")
    assert float(task.finetune_loss(logits, other, y, 2.0, 1.0)) == pytest.approx(float(per_token))
    with pytest.raises(TypeError, match="logits"):
        model_outputs({"no": "tensor"})


def test_a_language_model_gets_token_ids_as_its_example_input():
    model = TinyLM(vocab=11, length=5)
    x = example_input(model, (5,))
    assert x.dtype == torch.int64 and x.shape == (1, 5) and 0 <= int(x.min()) <= int(x.max()) < 11
    assert model(x).shape == (1, 5, 11)
    assert example_input(nn.Linear(4, 2), (4,)).dtype == torch.float32


def test_synthetic_tokens_follow_a_learnable_chain():
    tokens = markov_tokens(400, 9, 16, seed=3)
    assert tokens.shape == (400, 9) and tokens.min() >= 0 and tokens.max() < 16
    assert np.array_equal(tokens, markov_tokens(400, 9, 16, seed=3))
    counts = np.zeros((16, 16))
    np.add.at(counts, (tokens[:, :-1].ravel(), tokens[:, 1:].ravel()), 1)
    p = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    entropy = -(counts * np.log(np.where(p > 0, p, 1))).sum() / counts.sum()
    assert math.exp(entropy) < 4  # the best possible perplexity: near 3 successors, not 16


# ------------------------------------------------------------------ the user's loss and metric


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_task_fns.py").write_text(
        "import torch\n"
        "CALLS = []\n"
        "def huber(outputs, targets, delta=1.0):\n"
        "    CALLS.append(delta)\n"
        "    return torch.nn.functional.huber_loss(outputs, targets.reshape(outputs.shape),\n"
        "                                          delta=delta)\n"
        "def within(model, loader, tolerance=0.5):\n"
        "    hits = total = 0\n"
        "    for x, y in loader:\n"
        "        hits += int(((model(x).reshape(-1) - y).abs() <= tolerance).sum())\n"
        "        total += len(y)\n"
        "    return 100.0 * hits / total\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_task_fns", None)


def test_user_loss_and_metric_by_import_path_with_kwargs(user_module):
    task = task_of(kind="regression", loss="my_task_fns:huber", loss_kwargs={"delta": 0.25},
                   metric="my_task_fns:within", metric_kwargs={"tolerance": 1.0},
                   direction="maximize")
    assert (task.name, task.direction, task.percent) == ("within", "maximize", False)
    outputs, y = torch.tensor([[0.0], [3.0]]), torch.tensor([0.5, 0.0])
    assert float(task.loss(outputs, y)) == pytest.approx(
        float(F.huber_loss(outputs, y.reshape(2, 1), delta=0.25)))
    assert sys.modules["my_task_fns"].CALLS == [0.25]
    assert task.evaluate(nn.Identity(), batches(outputs, y)) == 50.0
    named = task_of(kind="regression", metric="my_task_fns:within", direction="maximize",
                    metric_name="hit_rate")
    assert named.name == "hit_rate"


def test_user_import_path_that_does_not_import_is_a_config_error(user_module):
    with pytest.raises(ConfigError, match="task.metric.*no_such_module"):
        task_of(metric="no_such_module:fn", direction="maximize")
    with pytest.raises(ConfigError, match="task.loss.*has no attribute"):
        task_of(loss="my_task_fns:nothing_here")


# ------------------------------------------------------------------ the config's task section


@pytest.mark.parametrize("task, objectives, constraints, message", [
    ({"kind": "regression", "metric": "accuracy"}, None, None, "allowed: mse, mae"),
    ({"kind": "language-model", "metric": "mse"}, None, None, "allowed: perplexity"),
    ({"metric": "pkg.mod:fn"}, None, None, "give task.direction"),
    ({"kind": "regression", "direction": "maximize"}, None, None, "contradicts"),
    ({"loss": "mse"}, None, None, "package.module:function"),
    ({"metric_name": "size_kb", "metric": "top5"}, None, None, "taken by another metric"),
    ({"metric_name": "accuracy", "metric": "top5"}, None, None, "taken by another metric"),
    ({"kind": "regression"}, ["accuracy", "size"], None, "this task's metric is 'mse'"),
    ({"kind": "regression"}, ["mse", "size"], ["accuracy_drop <= 1"], "'metric_drop'"),
    ({"kind": "regression"}, ["size", "macs"], None, "must include 'mse'"),
    ({"metric": "top5"}, ["top5", "size"], ["top5 >= 101"], "percentage from 0 to 100"),
    ({"metric": "top5"}, ["top5", "size"], ["metric_drop <= -100"], "metric_drop is in points"),
])
def test_bad_task_configs_name_the_problem(task, objectives, constraints, message):
    data = {**BASE, "task": task}
    if objectives:
        data["objectives"] = objectives
    if constraints:
        data["constraints"] = constraints
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_task_metric_by_its_name_directions_and_constraints():
    config = parse_config({**BASE, "task": {"kind": "regression"}, "objectives": ["mse", "size"],
                           "constraints": ["mse <= 150", "metric_drop <= 0.5"]})
    assert config.objectives == ["accuracy", "size"]  # the metric's slot inside
    assert config.objective_directions() == ["minimize", "minimize"]
    assert [c.metric for c in config.constraints] == ["accuracy", "accuracy_drop"]
    assert [config.shown(c) for c in config.constraints] == ["mse <= 150", "metric_drop <= 0.5"]
    generic = parse_config({**BASE, "task": {"kind": "language-model"},
                            "objectives": ["metric", "size"]})
    assert generic.objective_directions() == ["minimize", "minimize"]
    classic = parse_config({**BASE, "constraints": ["accuracy_drop <= 1", "metric_drop <= 2"]})
    assert [c.metric for c in classic.constraints] == ["accuracy_drop", "accuracy_drop"]
    assert classic.objective_directions() == ["maximize", "minimize"]


def test_shown_names_follow_the_task_and_leave_classification_alone():
    keys = ["accuracy", "accuracy_drop", "accuracy_std", "accuracy_single", "test_accuracy",
            "dense_accuracy", "size_kb"]
    assert [shown_metric(k, "mse") for k in keys] == [
        "mse", "metric_drop", "mse_std", "mse_single", "test_mse", "dense_mse", "size_kb"]
    assert [shown_metric(k) for k in keys] == keys
    assert shown_metrics({"accuracy": 1.0, "macs": 2.0}, "perplexity") == \
        {"perplexity": 1.0, "macs": 2.0}


def test_hypervolume_of_a_minimised_metric_is_normalised_by_dense():
    spec = HypervolumeSpec(["accuracy", "size"], {"accuracy": 0.5, "size_kb": 10.0},
                           direction="minimize", percent=False)
    refs = spec.references()
    assert refs["hypervolume"].tolist() == [1.05, 1.0]
    assert refs["hypervolume_wide"].tolist() == [2.0, 1.0]
    assert spec.normalise(np.array([[0.5, 5.0]])).tolist() == [[1.0, 0.5]]
    import pandas as pd

    frame = pd.DataFrame({"accuracy": [0.5, 0.6], "size_kb": [5.0, 2.0],
                          "feasible": [True, True]})
    history = spec.histories(frame)["hypervolume_wide"]
    # (2 - 1) x (1 - 0.5) = 0.5, then plus the second point's extra (2 - 1.2) x (0.5 - 0.2)
    assert history == pytest.approx([0.5, 0.5 + 0.8 * 0.3])


def test_taylor_scores_use_the_task_loss():
    from autosparse.compress.apply import taylor_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16)
    task = task_of(kind="regression")
    scores = taylor_scores(model, batches(x, y, 8), ["0", "2"], 2, task.loss)
    assert set(scores) == {"0", "2"} and all(float(s.sum()) > 0 for s in scores.values())
    with pytest.raises(RuntimeError, match="target"):  # cross-entropy can't score regression
        taylor_scores(model, batches(x, y, 8), ["0"], 1)
