"""Fast distillation fine-tuning of compressed candidates (autosparse.compress.finetune)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autosparse.compress.apply import bake, compress_model, qmax_for_bits, weight_mask
from autosparse.compress.finetune import (
    CandidateDiverged,
    FinetuneResult,
    distill_loss,
    finetune,
)
from autosparse.config.sections import FinetuneConfig
from autosparse.space.candidate import Candidate, LayerChoice

LAYERS = ("conv1", "conv2", "fc1", "fc2")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean() * 100)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem(one_thread):
    """A learnable synthetic task (label = brightest quadrant) and a teacher trained on it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(768, 1, 8, 8, generator=gen)
    quadrants = torch.stack(
        [x[:, 0, :4, :4].mean((1, 2)), x[:, 0, :4, 4:].mean((1, 2)),
         x[:, 0, 4:, :4].mean((1, 2)), x[:, 0, 4:, 4:].mean((1, 2))], dim=1
    )
    y = quadrants.argmax(1)  # 4 of the 10 classes used
    torch.manual_seed(0)
    teacher = TinyNet()
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    loader = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64, shuffle=True)
    teacher.train()
    for _ in range(10):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(teacher(xb), yb).backward()
            opt.step()
    teacher.eval()
    return teacher, (x[:512], y[:512]), (x[512:], y[512:])


def loader_of(train, batch_size=64, shuffle=True):
    return DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=shuffle)


def heavy(bits=4) -> Candidate:
    return Candidate({n: LayerChoice.make("unstructured", 0.8, bits) for n in LAYERS})


def kd(student, teacher, x, y, cfg) -> float:
    student.eval()
    with torch.no_grad():
        return float(distill_loss(student(x), teacher(x), y, cfg.temperature, 1.0))


def test_finetune_reduces_distillation_loss_and_keeps_masks(problem):
    teacher, train, (xv, yv) = problem
    assert accuracy(teacher, xv, yv) > 50
    cfg = FinetuneConfig(steps=80, lr=2e-3, seed=0)
    student = compress_model(teacher, heavy())
    masks = {n: weight_mask(student, n).clone() for n in LAYERS}
    before, acc_before = kd(student, teacher, xv, yv, cfg), accuracy(student, xv, yv)
    result = finetune(student, teacher, loader_of(train), cfg)
    after, acc_after = kd(student, teacher, xv, yv, cfg), accuracy(student, xv, yv)

    assert isinstance(result, FinetuneResult)
    assert result.steps == 80 and result.seconds > 0 and math.isfinite(result.final_loss)
    assert after < 0.7 * before, (before, after)
    assert acc_after > acc_before + 5, (acc_before, acc_after)
    assert not student.training and not teacher.training
    # the masks are fixed buffers, and zeros stay zero in the effective and the baked weight
    qmax = qmax_for_bits(4)
    for name in LAYERS:
        mask = weight_mask(student, name)
        assert torch.equal(mask, masks[name])
        original = getattr(student, name).parametrizations.weight.original
        assert (original[mask == 0] != 0).any()  # the dense original is still underneath
        w = getattr(student, name).weight.detach()
        assert (w[mask == 0] == 0).all()
        assert all(len(torch.unique(row)) <= 2 * qmax + 1 for row in w.reshape(w.shape[0], -1))
    bake(student)
    for name in LAYERS:
        assert (getattr(student, name).weight[masks[name] == 0] == 0).all()


def test_finetune_is_repeatable_and_keeps_callers_rng(problem):
    teacher, train, _ = problem
    cfg = FinetuneConfig(steps=12, seed=3)
    a = compress_model(teacher, heavy(8))
    b = compress_model(teacher, heavy(8))
    torch.manual_seed(123)
    ra = finetune(a, teacher, loader_of(train), cfg)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    rb = finetune(b, teacher, loader_of(train), cfg)
    assert torch.equal(after_a, torch.rand(3))  # caller's RNG stream unaffected
    assert ra.final_loss == rb.final_loss
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_cycles_a_short_loader(problem):
    teacher, (x, y), _ = problem
    student = compress_model(teacher, heavy(8))
    loader = loader_of((x[:100], y[:100]), batch_size=64)  # 2 batches per epoch
    result = finetune(student, teacher, loader, FinetuneConfig(steps=7))
    assert result.steps == 7


def test_zero_steps_returns_without_training(problem):
    teacher, train, _ = problem
    student = compress_model(teacher, heavy(8))
    student.train()
    before = copy.deepcopy(student.state_dict())
    result = finetune(student, teacher, loader_of(train), FinetuneConfig(steps=0))
    assert result.steps == 0 and not student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_huge_learning_rate_diverges(problem):
    teacher, train, _ = problem
    student = compress_model(teacher, heavy(8))
    with pytest.raises(CandidateDiverged, match=r"diverged at step \d+/60: loss is") as info:
        finetune(student, teacher, loader_of(train), FinetuneConfig(steps=60, lr=1e6))
    assert not student.training
    assert info.value.step > 1


def test_moderate_learning_rate_does_not_count_as_divergence(problem):
    teacher, train, _ = problem
    student = compress_model(teacher, heavy(8))
    result = finetune(student, teacher, loader_of(train), FinetuneConfig(steps=30, lr=3e-2))
    assert math.isfinite(result.final_loss)


def test_nan_in_data_diverges_at_first_step(problem):
    teacher, (x, y), _ = problem
    x = x.clone()
    x[:, 0, 0, 0] = float("nan")
    student = compress_model(teacher, heavy(8))
    with pytest.raises(CandidateDiverged, match=r"step 1/5: loss is nan") as info:
        finetune(student, teacher, loader_of((x, y)), FinetuneConfig(steps=5))
    assert info.value.step == 1 and math.isnan(info.value.loss)
    assert isinstance(info.value, RuntimeError)


def test_labels_only_and_distill_only(problem):
    teacher, train, _ = problem
    for weight in (0.0, 1.0):
        student = compress_model(teacher, heavy(8))
        cfg = FinetuneConfig(steps=5, distill_weight=weight)
        result = finetune(student, teacher, loader_of(train), cfg)
        assert result.steps == 5 and math.isfinite(result.final_loss)


def test_empty_loader_raises(problem):
    teacher, (x, y), _ = problem
    student = compress_model(teacher, heavy(8))
    with pytest.raises(ValueError, match="no batches"):
        finetune(student, teacher, [], FinetuneConfig(steps=3))


def test_distill_loss_matches_definition():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    T, w = 4.0, 0.7
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = w * T * T * kl + (1 - w) * F.cross_entropy(s, y)
    assert float(distill_loss(s, t, y, T, w)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distill_loss(t, t, y, T, 1.0)) == pytest.approx(0.0, abs=1e-6)
