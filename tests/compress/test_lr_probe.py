"""The fine-tune lr probe (autosparse.compress.lr_probe) on a small trained digits-cnn."""

from __future__ import annotations

import math

import pytest
import torch

import autosparse.compress.lr_probe as lr_probe
from autosparse.compress.apply import compress_model
from autosparse.compress.finetune import FinetuneSession
from autosparse.compress.lr_probe import pick_lr, probe_learning_rate, probe_steps
from autosparse.config.sections import DataConfig, FinetuneConfig, ModelConfig
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.workload.data import load_data
from autosparse.workload.dense import train_dense
from autosparse.workload.evaluate import evaluate
from autosparse.workload.models import build_model
from autosparse.workload.task import Task

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = FinetuneConfig(steps=150, seed=0)


@pytest.fixture(scope="module")
def digits(one_thread):
    """sklearn digits and a digits-cnn trained 6 epochs (a couple of seconds on one thread)."""
    data = load_data(DataConfig())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = build_model(ModelConfig(builtin="digits-cnn"), data.input_shape,
                            data.num_classes)
        train_dense(dense, data, epochs=6, seed=0)
    dense.eval()
    assert evaluate(dense, data.loader("validation", 256)) > 90
    return dense, data


def uniform(dense, sparsity: float, bits: int) -> Candidate:
    names = [n for n, m in dense.named_modules() if isinstance(m, (torch.nn.Conv2d,
                                                                   torch.nn.Linear))]
    return Candidate({n: LayerChoice.make("unstructured", sparsity, bits) for n in names})


@pytest.fixture(scope="module")
def candidates(digits):
    dense, _ = digits
    return [uniform(dense, 0.6, 4), uniform(dense, 0.93, 4)]


def table(probe) -> list[tuple]:
    return [(r.lr, r.candidate, r.metric, r.loss, r.steps, r.status) for r in probe.runs]


class CountingSession(FinetuneSession):
    """A FinetuneSession that records the steps it took when its ``with`` block ends."""

    taken: list[int] = []

    def __exit__(self, *exc) -> None:
        CountingSession.taken.append(self.step)
        super().__exit__(*exc)


@pytest.fixture
def counting(monkeypatch):
    CountingSession.taken = []
    monkeypatch.setattr(lr_probe, "FinetuneSession", CountingSession)
    return CountingSession.taken


def test_deterministic_for_a_seed_and_leaves_rng_and_dense_alone(digits, candidates):
    dense, data = digits
    weights = {k: v.clone() for k, v in dense.state_dict().items()}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    kwargs = dict(lrs=(1e-3, 1e-2), steps=15)
    first = probe_learning_rate(dense, data, candidates, CFG, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    second = probe_learning_rate(dense, data, candidates, CFG, **kwargs)
    assert (first.chosen, first.best) == (second.chosen, second.best)
    assert table(first) == table(second)
    assert all(r.status == "ok" and math.isfinite(r.metric) for r in first.runs)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in weights.items())
    # another seed is another fine-tune: the table changes
    other = probe_learning_rate(dense, data, candidates, CFG.model_copy(update={"seed": 1}),
                                **kwargs)
    assert table(other) != table(first)


def test_steps_reported_are_the_steps_the_sessions_ran(digits, candidates, counting):
    dense, data = digits
    probe = probe_learning_rate(dense, data, candidates, CFG, lrs=(3e-4, 1e-3, 1e-2), steps=12)
    assert len(counting) == 2 * 3  # one session per (candidate, lr)
    assert probe.steps == sum(counting) == 2 * 3 * 12
    assert probe.steps_per_run == 12 and probe.candidates == 2
    assert probe.to_metrics()["lr_probe.steps"] == probe.steps


def test_a_diverging_lr_is_excluded_and_never_chosen(digits, candidates, counting):
    dense, data = digits
    probe = probe_learning_rate(dense, data, candidates, CFG, lrs=(1e-3, 1e3), steps=10)
    assert probe.excluded == (1e3,)
    assert probe.chosen == probe.best == 1e-3 and not probe.fallback
    diverged = [r for r in probe.runs if r.lr == 1e3]
    assert diverged[0].status == "diverged" and math.isnan(diverged[0].metric)
    assert diverged[1].status == "skipped" and diverged[1].steps == 0  # no steps wasted
    # what ran, not the formula: 2 x 10 at 1e-3, a step or two before 1e3 blew up
    assert probe.steps == sum(counting) < 2 * 2 * 10
    assert probe.steps == 20 + diverged[0].steps
    assert "lr_probe.mean.1000" not in probe.to_metrics()
    assert probe.to_params()["lr_probe.excluded"] == "1000"


def test_every_lr_diverging_falls_back_to_the_config_lr(digits, candidates):
    dense, data = digits
    probe = probe_learning_rate(dense, data, candidates[:1], CFG, lrs=(1e3, 1e4), steps=5)
    assert probe.fallback and probe.chosen == CFG.lr
    assert probe.excluded == (1e3, 1e4)


def test_the_probe_is_the_first_steps_of_the_full_fine_tune(digits, candidates):
    """The schedule is laid over the full length: with cosine, probing 20 of 150 steps gives
    what the real fine-tune has after 20 steps, not a 20-step cosine."""
    dense, data = digits
    cfg = CFG.model_copy(update={"schedule": "cosine"})
    probe = probe_learning_rate(dense, data, candidates[1:], cfg, lrs=(1e-2,), steps=20)

    def after_20(total: int) -> float:
        student = compress_model(dense, candidates[1])
        loader = data.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
        run_cfg = cfg.model_copy(update={"lr": 1e-2, "steps": total})
        with FinetuneSession(student, dense, loader, run_cfg) as session:
            session.run_until(20)
        return evaluate(student, data.loader("validation", data.batch_size))

    assert probe.runs[0].metric == after_20(150)
    assert probe.runs[0].metric != after_20(20)


def test_a_minimized_metric_picks_the_same_lr(digits, candidates):
    dense, data = digits
    error = Task(name="error", direction="minimize",
                 metric_fn=lambda model, loader: 100.0 - evaluate(model, loader))
    kwargs = dict(lrs=(3e-4, 1e-2), steps=15, tolerance=0.0)
    up = probe_learning_rate(dense, data, candidates, CFG, **kwargs)
    down = probe_learning_rate(dense, data, candidates, CFG, error, **kwargs)
    assert not down.maximize
    assert up.mean(1e-2) != up.mean(3e-4)  # a real choice
    assert down.best == up.best and down.chosen == up.chosen
    assert down.mean(1e-2) == pytest.approx(100.0 - up.mean(1e-2))


def test_tiny_real_case_runs_in_seconds(digits, candidates):
    dense, data = digits
    probe = probe_learning_rate(dense, data, candidates, CFG, steps=20)
    assert probe.lrs == lr_probe.DEFAULT_LRS and probe.steps == 2 * 5 * 20
    assert probe.chosen in probe.lrs
    assert probe.seconds < 30  # about 2 s on one idle core
    means = {lr: probe.mean(lr) for lr in probe.lrs}
    assert all(math.isfinite(m) for m in means.values())
    assert probe.chosen == pick_lr(means, probe.tolerance)[0]
    assert probe.mean(probe.chosen) >= (1 - probe.tolerance) * max(means.values())
    params, metrics = probe.to_params(), probe.to_metrics()
    assert params["lr_probe.chosen"] == f"{probe.chosen:g}"
    assert metrics["lr_probe.chosen"] == probe.chosen
    assert {f"lr_probe.mean.{lr:g}" for lr in probe.lrs} <= set(metrics)
    assert all(isinstance(v, str) for v in params.values())


def test_pick_lr_rule():
    nan = math.nan
    assert pick_lr({1e-3: 80.0, 1e-2: 90.0}, 0.0) == (1e-2, 1e-2)
    assert pick_lr({1e-3: 90.0, 1e-2: 90.0}, 0.0) == (1e-3, 1e-3)  # a tie: the smaller
    # within 1 % of the best mean: the smaller lr; outside: the best
    assert pick_lr({1e-3: 89.5, 1e-2: 90.0}, 0.01) == (1e-3, 1e-2)
    assert pick_lr({1e-3: 88.0, 3e-3: 89.5, 1e-2: 90.0}, 0.01) == (3e-3, 1e-2)
    # the default (2 %): the measured digits-mlp case, 3e-2 ahead of 1e-2 by 1.5 % at 30 steps
    assert pick_lr({3e-3: 83.1, 1e-2: 91.8, 3e-2: 93.2})[0] == 1e-2
    assert pick_lr({3e-3: 80.2, 1e-2: 89.6, 3e-2: 62.8})[0] == 1e-2  # digits-cnn
    assert pick_lr({1e-3: 80.0, 1e-2: nan}, 0.5) == (1e-3, 1e-3)  # excluded stays excluded
    with pytest.raises(ValueError, match="excluded"):
        pick_lr({1e-3: nan})


def test_probe_steps_and_bad_arguments(digits, candidates):
    assert probe_steps(150) == 30 and probe_steps(3) == 1 and probe_steps(1) == 1
    dense, data = digits
    with pytest.raises(ValueError, match="at least one candidate"):
        probe_learning_rate(dense, data, [], CFG)
    with pytest.raises(ValueError, match="1..150"):
        probe_learning_rate(dense, data, candidates, CFG, steps=151)
    with pytest.raises(ValueError, match="positive"):
        probe_learning_rate(dense, data, candidates, CFG, lrs=(0.0, 1e-3))
