"""Fine-tune recipe: learning-rate schedule, epochs, and sessions that continue (finetune.py)."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
import yaml
from helpers import TinyNet
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from autosparse.compress.apply import compress_model
from autosparse.compress.finetune import (
    EXPLODE_FACTOR,
    CandidateDiverged,
    FinetuneSession,
    _cycle,
    distill_loss,
    finetune,
    learning_rate,
    lr_multiplier,
    resolve_steps,
)
from autosparse.config.schema import parse_config
from autosparse.config.sections import FinetuneConfig
from autosparse.search.objective import CandidateEvaluator
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover_layers
from autosparse.workload.splits import DataSplits

LAYERS = ("conv1", "conv2", "fc1", "fc2")
COS_QUARTER = (1 + math.cos(math.pi / 4)) / 2  # 0.8535...

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the schedule, by hand

@pytest.mark.parametrize("schedule, warmup, total, expected", [
    ("constant", 0, 4, [1, 1, 1, 1]),
    ("constant", 4, 6, [0.25, 0.5, 0.75, 1, 1, 1]),
    ("cosine", 0, 4, [1, COS_QUARTER, 0.5, 1 - COS_QUARTER]),
    ("cosine", 2, 6, [0.5, 1, 1, COS_QUARTER, 0.5, 1 - COS_QUARTER]),
    ("linear", 0, 5, [1, 0.8, 0.6, 0.4, 0.2]),
    ("linear", 1, 3, [1, 1, 0.5]),
    ("linear", 5, 5, [0.2, 0.4, 0.6, 0.8, 1]),       # warm-up as long as the run: warm-up only
    ("cosine", 10, 4, [0.1, 0.2, 0.3, 0.4]),         # longer: never reaches lr
])
def test_schedule_values_by_hand(schedule, warmup, total, expected):
    got = [lr_multiplier(s, total, schedule, warmup) for s in range(total)]
    assert got == pytest.approx(expected, abs=1e-12)
    cfg = FinetuneConfig(steps=total, lr=0.01, schedule=schedule, warmup_steps=warmup)
    assert [learning_rate(s, total, cfg) for s in range(total)] == \
        pytest.approx([0.01 * e for e in expected], abs=1e-14)


def test_default_learning_rate_is_exactly_lr():
    cfg = FinetuneConfig(lr=3e-3)
    assert all(learning_rate(s, 150, cfg) == 3e-3 for s in range(150))


@pytest.mark.parametrize("step, total", [(-1, 5), (5, 5), (0, 0)])
def test_schedule_rejects_steps_outside_the_run(step, total):
    with pytest.raises(ValueError, match=f"step {step} is outside a fine-tune of {total} steps"):
        lr_multiplier(step, total, "cosine", 0)


def test_schedule_is_what_the_optimizer_uses(problem):
    """A warm-up far longer than the run keeps every step tiny: the weights barely move."""
    teacher, train = problem

    def moved(cfg):
        student = compress_model(teacher, heavy())
        before = {k: v.clone() for k, v in student.state_dict().items()}
        finetune(student, teacher, loader_of(train), cfg)
        return max(float((v - before[k]).abs().max()) for k, v in student.state_dict().items())

    full = moved(FinetuneConfig(steps=5))
    tiny = moved(FinetuneConfig(steps=5, warmup_steps=100_000))
    assert full > 1e-3 and tiny < 1e-3 * full, (full, tiny)


# ------------------------------------------------------------------ epochs

def test_epochs_resolve_against_a_real_dataloader():
    data = TensorDataset(torch.zeros(100, 1, 8, 8), torch.zeros(100, dtype=torch.long))
    loader = DataLoader(data, batch_size=32)  # 4 batches, the last one short
    assert len(loader) == 4
    assert resolve_steps(FinetuneConfig(epochs=1), len(loader)) == 4
    assert resolve_steps(FinetuneConfig(epochs=2.5), len(loader)) == 10
    assert resolve_steps(FinetuneConfig(epochs=0.1), 4) == 1  # ceil: at least one step
    assert resolve_steps(FinetuneConfig(epochs=0.1), 30) == 3  # not 4 (0.1 * 30 > 3 in floats)
    dropped = DataLoader(data, batch_size=32, drop_last=True)
    assert resolve_steps(FinetuneConfig(epochs=1), len(dropped)) == 3
    assert resolve_steps(FinetuneConfig(steps=17), None) == 17  # steps need no length


def test_finetune_by_epochs_takes_that_many_steps(problem):
    teacher, (x, y) = problem
    loader = loader_of((x[:100], y[:100]), batch_size=32)  # 4 batches per epoch
    student = compress_model(teacher, heavy())
    result = finetune(student, teacher, loader, FinetuneConfig(epochs=1.5))
    assert result.steps == 6 and math.isfinite(result.final_loss)


class _Stream(IterableDataset):
    """A stream without a length (DataLoader over it has no len())."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_epochs_need_a_loader_with_a_length(problem):
    teacher, (x, y) = problem
    loader = DataLoader(_Stream(x[:64], y[:64]), batch_size=16)
    with pytest.raises(TypeError):
        len(loader)
    student = compress_model(teacher, heavy())
    with pytest.raises(ValueError, match=r"finetune.epochs is 1 but the train loader has no "
                                         r"len\(\).*give finetune.steps"):
        finetune(student, teacher, loader, FinetuneConfig(epochs=1))
    assert finetune(student, teacher, loader, FinetuneConfig(steps=6)).steps == 6
    with pytest.raises(ValueError, match="has 0 batches per epoch"):
        finetune(student, teacher, [], FinetuneConfig(epochs=1))


# ------------------------------------------------------------------ sessions that continue

@pytest.mark.parametrize("pieces", [(1,), (4,), (7,), (3, 11), (8, 8, 13)])
def test_continued_session_equals_one_run(problem, pieces):
    """Pieces ending mid-epoch and on an epoch boundary (4 batches); the loader shuffles with
    the global RNG, which the caller also uses between pieces."""
    teacher, (x, y) = problem
    cfg = FinetuneConfig(steps=20, lr=2e-3, schedule="cosine", warmup_steps=3, seed=5)

    def loader():
        return loader_of((x[:128], y[:128]), batch_size=32)

    whole = compress_model(teacher, heavy())
    one = finetune(whole, teacher, loader(), cfg)

    split = compress_model(teacher, heavy())
    with FinetuneSession(split, teacher, loader(), cfg) as session:
        assert session.total_steps == 20
        for k in pieces:
            result = session.run_until(k)
            assert result.steps == k == session.step and not split.training
            assert math.isfinite(result.final_loss)
            torch.rand(50)  # the caller's RNG use between pieces must not matter
        last = session.run_until(20)
        assert session.done and last.seconds >= result.seconds
    assert last.steps == one.steps == 20
    assert last.final_loss == one.final_loss
    a, b = whole.state_dict(), split.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_session_checks_its_arguments_and_stops_after_divergence(problem):
    teacher, train = problem
    student = compress_model(teacher, heavy())
    session = FinetuneSession(student, teacher, loader_of(train), FinetuneConfig(steps=10))
    session.run_until(4)
    with pytest.raises(ValueError, match=r"run_until\(3\): the session is at step 4 of 10"):
        session.run_until(3)
    with pytest.raises(ValueError, match=r"run_until\(11\)"):
        session.run_until(11)
    assert session.run_until(4).steps == 4  # no new step: same point, checked again
    # the end-of-call divergence check runs at every run_until
    with torch.no_grad():
        student.fc2.bias[0] = math.inf
    with pytest.raises(CandidateDiverged, match="'fc2.bias' is not finite after 4 steps"):
        session.run_until(4)
    with pytest.raises(RuntimeError, match="cannot continue"):
        session.run_until(10)

    exploding = FinetuneSession(compress_model(teacher, heavy()), teacher, loader_of(train),
                                FinetuneConfig(steps=60, lr=1e6))
    with pytest.raises(CandidateDiverged, match=r"diverged at step \d+/60"):
        exploding.run_until(60)
    with pytest.raises(RuntimeError, match="cannot continue: CandidateDiverged"):
        exploding.run_until(60)


def test_zero_step_session(problem):
    teacher, train = problem
    student = compress_model(teacher, heavy())
    student.train()
    with FinetuneSession(student, teacher, loader_of(train), FinetuneConfig(steps=0)) as session:
        result = session.run_until()
    assert result.steps == 0 and math.isnan(result.final_loss) and not student.training


# ------------------------------------------------------------------ default recipe unchanged

def reference_finetune(student, teacher, train_loader, cfg):
    """The fine-tune loop as it was before schedules, epochs and sessions (kept verbatim but
    for the divergence checks): the default recipe must still train exactly like this."""
    params = [p for p in student.parameters() if p.requires_grad]
    T, w = float(cfg.temperature), float(cfg.distill_weight)
    recent: deque[float] = deque(maxlen=10)
    step = 0
    batches = _cycle(train_loader)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            optimizer = torch.optim.Adam(params, lr=cfg.lr)
            teacher.eval()
            student.train()
            while step < cfg.steps:
                x, y = next(batches)
                teacher_logits = None
                if w > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                loss = distill_loss(student(x), teacher_logits, y, T, w)
                value = loss.item()
                assert math.isfinite(value) and value < EXPLODE_FACTOR
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                recent.append(value)
            optimizer.zero_grad(set_to_none=True)
    finally:
        batches.close()
        student.eval()
    return sum(recent) / len(recent)


@pytest.mark.parametrize("cfg", [FinetuneConfig(steps=23, seed=1),
                                 FinetuneConfig(steps=9, lr=3e-3, distill_weight=0.0)])
@pytest.mark.parametrize("own_generator", [False, True])
def test_default_recipe_is_bit_for_bit_the_old_loop(problem, cfg, own_generator):
    teacher, (x, y) = problem

    def loader():
        gen = torch.Generator().manual_seed(5) if own_generator else None
        return DataLoader(TensorDataset(x[:300], y[:300]), batch_size=32, shuffle=True,
                          generator=gen)

    old, new = compress_model(teacher, heavy()), compress_model(teacher, heavy())
    old_loss = reference_finetune(old, teacher, loader(), cfg)
    result = finetune(new, teacher, loader(), cfg)
    assert result.final_loss == old_loss
    a, b = old.state_dict(), new.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ through the real evaluator

def test_epochs_and_cosine_config_through_candidate_evaluator(problem):
    teacher, (x, y) = problem
    config = parse_config(yaml.safe_load("""
        name: recipe
        model: {builtin: digits-mlp}
        finetune: {epochs: 1, schedule: cosine, warmup_steps: 5, batch_size: 32}
    """))
    cfg = config.finetune
    assert (cfg.epochs, cfg.schedule, cfg.warmup_steps) == (1, "cosine", 5)
    data = DataSplits(train=TensorDataset(x[:300], y[:300]),
                      validation=TensorDataset(x[300:], y[300:]),
                      test=TensorDataset(x[300:], y[300:]), input_shape=(1, 8, 8), num_classes=10)
    table = discover_layers(teacher, (1, 8, 8))
    evaluator = CandidateEvaluator(teacher, data, table, cfg, dense_accuracy=90.0)
    assert evaluator.finetune_steps() == 10  # ceil(300 / 32)
    # export's --finetune-steps override drops epochs, so the count is the one given
    assert evaluator.finetune_steps(cfg.model_copy(update={"steps": 7, "epochs": None})) == 7

    metrics = evaluator.evaluate(heavy())
    assert 0 <= metrics["accuracy"] <= 100 and math.isfinite(metrics["finetune_loss"])

    # one epoch is exactly the same fine-tune as 10 steps of the same recipe
    by_epochs, loss_e = evaluator.compress_and_tune(heavy())
    by_steps, loss_s = evaluator.compress_and_tune(
        heavy(), FinetuneConfig(steps=10, schedule="cosine", warmup_steps=5, batch_size=32))
    assert loss_e == loss_s == metrics["finetune_loss"]
    a, b = by_epochs.state_dict(), by_steps.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the recipe matters: the constant default gives another model
    constant, _ = evaluator.compress_and_tune(heavy(), FinetuneConfig(steps=10, batch_size=32))
    assert not torch.equal(constant.state_dict()["fc1.parametrizations.weight.original"],
                           a["fc1.parametrizations.weight.original"])


# ------------------------------------------------------------------ shared data

@pytest.fixture(scope="module")
def problem(one_thread):
    """A teacher (a few epochs on random labels is enough to have logits worth distilling)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (400,), generator=gen)
    torch.manual_seed(0)
    teacher = TinyNet()
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(3):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(teacher(xb), yb).backward()
            opt.step()
    teacher.eval()
    return teacher, (x, y)


def loader_of(train, batch_size=64, shuffle=True):
    return DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=shuffle)


def heavy(bits=8) -> Candidate:
    return Candidate({n: LayerChoice.make("unstructured", 0.8, bits) for n in LAYERS})
