"""The budget planner respects its accuracy constraint: finished infeasible trials rule out every
allocation that compresses at least as hard and their near-duplicates, and the predicted drop is
capped by a ceiling calibrated on what the trials showed.

"At least as hard" and "one step" are written out again here, independently of
``autosparse.search.allocation.feasibility``, so a wrong rule there cannot pass its own test.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
from search_helpers import load_study, write_config
from test_allocation import DIGITS, QUICKSTART, sensitivity_for

from autosparse.config.space_rules import ChoiceSet, LayerRule, SpaceConfig
from autosparse.search.allocation import feasibility
from autosparse.search.allocation.feasibility import Guard
from autosparse.search.allocation.knapsack import solve
from autosparse.search.allocation.planner import BudgetPlanner, Observation
from autosparse.search.allocation.problem import build_problem
from autosparse.search.allocation.table import ChoiceSensitivity, SensitivityTable
from autosparse.search.objective import CANDIDATE_ATTR
from autosparse.search.samplers.knapsack import METRICS_ATTR
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.search_space import SearchSpace

LIMIT = 5.0


# ------------------------------------------------------------------ independent definitions


def harder(x: LayerChoice, y: LayerChoice) -> bool:
    """x prunes at least as much (same pattern, or y dense) and keeps at most as many bits."""
    same_family = y.pattern == "dense" or (x.pattern, x.criterion) == (y.pattern, y.criterion)
    return same_family and x.sparsity >= y.sparsity and x.bits <= y.bits


def ladder(options, pattern: str, bits: int) -> list[float]:
    return sorted({o.sparsity for o in options
                   if o.bits == bits and o.pattern in ("dense", pattern)})


def step_apart(x: LayerChoice, y: LayerChoice, options) -> bool:
    if x == y:
        return False
    if (x.pattern, x.sparsity) == (y.pattern, y.sparsity):
        widths = sorted({o.bits for o in options
                         if (o.pattern, o.sparsity) == (x.pattern, x.sparsity)})
        return abs(widths.index(x.bits) - widths.index(y.bits)) == 1
    patterns = {x.pattern, y.pattern} - {"dense"}
    if x.bits != y.bits or len(patterns) != 1:
        return False
    levels = ladder(options, patterns.pop(), x.bits)
    return abs(levels.index(x.sparsity) - levels.index(y.sparsity)) == 1


def dominates(problem, x, y) -> bool:
    return all(harder(opts[a], opts[b]) for opts, a, b in zip(problem.options, x, y))


def near_duplicate(problem, x, y) -> bool:
    differ = [d for d in range(len(x)) if x[d] != y[d]]
    if not differ:
        return True
    if len(differ) > 1:
        return False
    opts = problem.options[differ[0]]
    return step_apart(opts[x[differ[0]]], opts[y[differ[0]]], opts)


# ------------------------------------------------------------------ synthetic problems


def space_variant(kind: int) -> SearchSpace:
    if kind == 0:
        return QUICKSTART
    if kind == 1:  # a tied group, an excluded layer, fewer levels
        return SearchSpace.build(SpaceConfig(
            exclude=["fc2"], rules=[LayerRule(layers=["conv2", "conv3"], tie=True, name="convs")],
            default=ChoiceSet(sparsity=[0.0, 0.5, 0.8, 0.95], patterns=["unstructured", "channel"],
                              bits=[2, 4, 8, 32])), DIGITS)
    return SearchSpace.build(SpaceConfig(default=ChoiceSet(
        sparsity=[0.0, 0.3, 0.6, 0.9], patterns=["unstructured", "2:4"], bits=[4, 8, 32])), DIGITS)


def noisy_sensitivity(space: SearchSpace, rng: random.Random) -> SensitivityTable:
    """The smooth synthetic table with a random factor per entry (not monotone any more)."""
    base = sensitivity_for(space)
    entries = tuple(ChoiceSensitivity(e.decision, e.choice, e.loss_delta * rng.uniform(0.5, 2.0),
                                      e.accuracy_delta) for e in base.entries)
    return SensitivityTable(entries=entries, dense_loss=base.dense_loss,
                            dense_accuracy=base.dense_accuracy, samples=base.samples)


def superadditive_truth(planner: BudgetPlanner, factor: float):
    """The fine-tuned drop: the prior's prediction scaled, plus an interaction term the additive
    model cannot express, so a refit is optimistic for aggressive allocations."""
    def truth(allocation) -> float:
        p = factor * planner.prior.predict(allocation)
        return p + 0.25 * p * p
    return truth


def random_allocation(problem, rng: random.Random):
    return tuple(rng.randrange(len(opts)) for opts in problem.options)


CASES = [(kind, seed) for kind in range(3) for seed in range(2)]


@pytest.mark.parametrize("kind,seed", CASES)
def test_never_proposes_a_harder_or_near_copy_of_an_infeasible_trial(kind, seed):
    rng = random.Random(seed)
    space = space_variant(kind)
    problem = build_problem(space, DIGITS, noisy_sensitivity(space, rng), ["size", "macs"])
    planner = BudgetPlanner(problem, ["size", "macs"], [("accuracy_drop", "<=", LIMIT)])
    truth = superadditive_truth(planner, rng.uniform(0.5, 2.0))
    observed = [Observation(s, truth(s)) for s in planner.seeds(4)]
    for _ in range(3):  # injected infeasible outcomes, some of them mild allocations
        allocation = random_allocation(problem, rng)
        observed.append(Observation(allocation, LIMIT + rng.uniform(0.5, 30.0)))
    proposals = 0
    for _ in range(12):
        nxt = planner.next(observed)
        assert nxt is not None
        for o in observed:
            if o.drop is not None and o.drop > LIMIT:
                assert not dominates(problem, nxt, o.allocation), (nxt, o.allocation)
                assert not near_duplicate(problem, nxt, o.allocation), (nxt, o.allocation)
        observed.append(Observation(nxt, truth(nxt)))
        proposals += 1
    assert proposals == 12
    assert sum(o.drop > LIMIT for o in observed) >= 3  # the rules had something to rule out


@pytest.mark.parametrize("kind", range(3))
def test_the_forbidding_rules_match_the_independent_definitions(kind):
    """Box membership is exactly 'dominates' / 'near-duplicate' on every pair sampled."""
    space = space_variant(kind)
    problem = build_problem(space, DIGITS, sensitivity_for(space), ["size"])
    rng = random.Random(kind)
    for _ in range(300):
        y = random_allocation(problem, rng)
        x = list(y)
        for d in rng.sample(range(len(x)), rng.randint(0, 2)):  # often close to y
            x[d] = rng.randrange(len(problem.options[d]))
        x = tuple(x)
        box = feasibility.dominating_box(problem, y)
        assert feasibility.in_box(x, box) == dominates(problem, x, y)
        assert any(feasibility.in_box(x, b) for b in feasibility.near_boxes(problem, y)) == \
            near_duplicate(problem, x, y)


def test_patterns_are_unordered_but_dense_and_bits_are():
    u50, u80 = LayerChoice.make("unstructured", 0.5, 8), LayerChoice.make("unstructured", 0.8, 8)
    c80 = LayerChoice.make("channel", 0.8, 8)
    dense8, dense4 = LayerChoice.make("dense", 0.0, 8), LayerChoice.make("dense", 0.0, 4)
    assert feasibility.at_least_as_hard(u80, u50) and not feasibility.at_least_as_hard(u50, u80)
    assert not feasibility.at_least_as_hard(c80, u50) and not feasibility.at_least_as_hard(u50, c80)
    assert feasibility.at_least_as_hard(c80, dense8)
    assert feasibility.at_least_as_hard(dense4, dense8)
    assert not feasibility.at_least_as_hard(LayerChoice.make("unstructured", 0.8, 32), u50)


def test_solve_with_boxes_and_a_weight_cap_matches_enumeration():
    space = space_variant(1)
    problem = build_problem(space, DIGITS, sensitivity_for(space), ["size"])
    weights = [list(row) for row in problem.loss]
    rng = random.Random(3)
    boxes = [feasibility.dominating_box(problem, random_allocation(problem, rng)) for _ in range(3)]
    budget, cap = 0.4 * problem.dense["size"], 1.0
    got = solve(problem, weights, "size", budget, forbid=boxes, max_weight=cap)
    best = None
    for allocation in itertools.product(*(range(len(o)) for o in problem.options)):
        if (problem.total("size", allocation) > budget
                or sum(weights[d][o] for d, o in enumerate(allocation)) > cap
                or any(feasibility.in_box(allocation, b) for b in boxes)):
            continue
        key = sum(weights[d][o] for d, o in enumerate(allocation))
        if best is None or key < best[0] - 1e-12:
            best = (key, allocation)
    assert best is not None and got is not None
    assert sum(weights[d][o] for d, o in enumerate(got)) == pytest.approx(best[0], abs=1e-9)


# ------------------------------------------------------------------ calibration


def share_past(planner, truth, steps: int, start: int = 4) -> tuple[float, list[float]]:
    observed = [Observation(s, truth(s)) for s in planner.seeds(start)]
    drops = []
    for _ in range(steps):
        nxt = planner.next(observed)
        drops.append(truth(nxt))
        observed.append(Observation(nxt, drops[-1]))
    return sum(d > LIMIT for d in drops) / len(drops), drops


@pytest.mark.parametrize("factor,trusting_at_least", [(3.0, 3 / 16), (5.0, 8 / 16)])
def test_an_optimistic_predictor_rarely_proposes_past_the_constraint(monkeypatch, factor,
                                                                      trusting_at_least):
    """Fine-tuned drops are superadditive, drop = p + p^2 / 4 with p = factor x the prior's
    prediction, so the additive refit is optimistic by p^2 / 4 on aggressive allocations. With
    the calibrated ceiling and the infeasible boxes at most 1 of 16 proposals after 4 seeds goes
    past the bound; with the refit trusted (ceiling = the bound, no boxes) or no guard at all
    (no cap on the predicted drop, as before the guard) at least 3 (factor 3) or 8 (factor 5)
    of 16 do."""
    problem = build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART), ["size"])
    planner = BudgetPlanner(problem, ["size"], [("accuracy_drop", "<=", LIMIT)])
    truth = superadditive_truth(planner, factor)
    guarded, drops = share_past(planner, truth, 16)
    assert guarded <= 1 / 16, drops
    assert min(drops) < LIMIT / 2 < max(drops)  # still spread over the region

    naive = []
    for ceiling in (LIMIT, 1e6):
        trusting = BudgetPlanner(problem, ["size"], [("accuracy_drop", "<=", LIMIT)])
        monkeypatch.setattr(trusting, "guard",
                            lambda observed, c=ceiling: Guard(c, LIMIT - c, (), ()))
        naive.append(share_past(trusting, truth, 16)[0])
    assert max(naive) >= trusting_at_least and min(naive) > guarded, (naive, drops)


@pytest.mark.parametrize("observed,ceiling", [
    ([(2.0, 2.0), (4.0, 4.0)], LIMIT),  # predictions right: the bound itself
    ([(2.0, 2.0), (4.0, 12.0)], 2.75),  # predicted 4, came out 12 (counted as 10): 2 + 3 x 2 / 8
    ([(1.0, 90.0)], LIMIT / 2),  # one collapse at a mild prediction: floored at half the bound
    ([(8.0, 3.0)], LIMIT),  # a pessimistic model never lifts the ceiling past the bound
    ([(2.0, 6.0), (3.0, 1.0), (6.0, 9.0)], 2.5 + 1.5 * 3.5 / 5.5),  # pooled (2.5, 3.5), then (6, 9)
])
def test_calibrated_ceiling_follows_what_trials_showed(observed, ceiling):
    """The isotonic curve of observed drop on (leave-one-out) prediction, through (0, 0)."""
    pairs = [((i,), drop) for i, (_, drop) in enumerate(observed)]
    predicted = {(i,): p for i, (p, _) in enumerate(observed)}
    got = feasibility.calibrated_ceiling(pairs, LIMIT, lambda subset: predicted.__getitem__)
    assert got == pytest.approx(ceiling)


def test_an_optimistic_refit_lowers_the_ceiling():
    problem = build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART), ["size"])
    planner = BudgetPlanner(problem, ["size"], [("accuracy_drop", "<=", LIMIT)])
    seeds = planner.seeds(8)
    assert planner.guard([]).margin == 0.0
    margins = [planner.guard([Observation(s, superadditive_truth(planner, f)(s)) for s in seeds])
               for f in (3.0, 5.0)]
    assert 0.3 < margins[0].margin < margins[1].margin <= LIMIT / 2
    assert margins[1].ceiling == pytest.approx(LIMIT - margins[1].margin)


def test_seeds_ruled_out_by_an_infeasible_seed_are_skipped():
    """Rule 4: the sampler's seed phase skips a seed that is no longer admissible."""
    problem = build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART), ["size"])
    planner = BudgetPlanner(problem, ["size"], [("accuracy_drop", "<=", LIMIT)])
    seeds = planner.seeds(8)
    assert all(planner.admissible(s, []) for s in seeds)  # nothing observed: all allowed
    bad = [Observation(seeds[0], 3 * LIMIT)]
    for s in seeds[1:]:
        if dominates(problem, s, seeds[0]) or near_duplicate(problem, s, seeds[0]):
            assert not planner.admissible(s, bad)
    harder_seeds = [s for s in seeds[1:] if dominates(problem, s, seeds[0])]
    assert harder_seeds, "the sweep's later seeds compress at least as hard as its first"


# ------------------------------------------------------------------ a real search


@pytest.mark.integration
def test_real_knapsack_search_never_retries_harder_than_an_infeasible_trial(tmp_path):
    """digits-mlp, knapsack, a tight bound: every trial after an infeasible one respects rule 2
    (checked layer by layer from the study's stored candidates)."""
    sparsity, patterns, bits = [0.0, 0.5, 0.8, 0.95], ["unstructured", "channel"], [2, 4, 8, 32]
    assert all(len(d.layers) == 1 for d in space_variant(0).decisions)  # (layers are decisions)
    config = write_config(tmp_path, "bounded", model={"builtin": "digits-mlp", "train_epochs": 4},
                          space={"default": {"sparsity": sparsity, "patterns": patterns,
                                             "bits": bits}},
                          strategy={"name": "knapsack"}, budget={"trials": 14},
                          constraints=["accuracy_drop <= 2"], finetune={"steps": 10})
    from autosparse.search.runner import prepare, run_search

    run_search(config, runs_dir=tmp_path, printer=lambda line: None)
    study = load_study(tmp_path, "bounded")
    space = prepare(config, tmp_path).space
    options = {n: sorted(d.distinct_choices()) for d in space.decisions for n in d.layers}
    trials = sorted((t for t in study.trials if t.user_attrs.get(CANDIDATE_ATTR)),
                    key=lambda t: t.number)
    infeasible: list[Candidate] = []
    checked = 0
    for t in trials:
        candidate = Candidate.from_json(t.user_attrs[CANDIDATE_ATTR])
        for bad in infeasible:
            layers = sorted(options)
            assert not all(harder(candidate.get_choice(n), bad.get_choice(n)) for n in layers), (
                t.number, candidate)
            differ = [n for n in layers if candidate.get_choice(n) != bad.get_choice(n)]
            assert len(differ) > 1 or (differ and not step_apart(
                candidate.get_choice(differ[0]), bad.get_choice(differ[0]), options[differ[0]])), (
                t.number, candidate)
            checked += 1
        if t.user_attrs[METRICS_ATTR]["accuracy_drop"] > 2.0:
            infeasible.append(candidate)
    assert len(trials) == 14
    assert infeasible and checked > 0, json.dumps([t.user_attrs[METRICS_ATTR] for t in trials])


def test_screening_predictor_admits_what_the_planner_admits_under_a_bound_only():
    """The GA's and BO's screen (AllocationPredictor) uses the planner's guard: with an
    accuracy_drop bound, a child at least as hard as a finished infeasible trial is not
    admitted; without a bound the screen admits everything (the front may go past 5 points)."""
    import optuna

    from autosparse.search.samplers.screening import AllocationPredictor

    problem = build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART), ["size"])
    bounded = BudgetPlanner(problem, ["size"], [("accuracy_drop", "<=", LIMIT)])
    seeds = bounded.seeds(8)
    harder = [s for s in seeds[1:] if dominates(problem, s, seeds[0])]
    assert harder
    trial = optuna.trial.create_trial(values=[80.0, 1.0], user_attrs={
        CANDIDATE_ATTR: problem.candidate(seeds[0]).to_json(),
        METRICS_ATTR: {"accuracy_drop": 3 * LIMIT}})
    observed = [Observation(seeds[0], 3 * LIMIT)]
    for planner, bound in ((bounded, LIMIT), (BudgetPlanner(problem, ["size"], []), None)):
        assert planner.drop_bound == bound
        predictor = AllocationPredictor(planner, ["accuracy", "size"], 98.0)
        predictor.refit([trial])
        for allocation in harder + [seeds[0]]:
            admitted = predictor.admissible(problem.candidate(allocation))
            assert admitted is (bound is None or planner.admissible(allocation, observed))
            assert admitted is (bound is None)


def test_screening_predictor_caps_the_predicted_drop_under_a_bound():
    """The screen also keeps the knapsack's third rule: with no infeasible trial (no boxes), a
    child the refit predicts past the calibrated ceiling is not admitted, a mild one is; the
    harshest allocation of the space is admitted only without a bound."""
    import optuna

    from autosparse.search.samplers.screening import AllocationPredictor

    problem = build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART), ["size"])
    bounded = BudgetPlanner(problem, ["size"], [("accuracy_drop", "<=", LIMIT)])
    seeds = bounded.seeds(6)
    truth = superadditive_truth(bounded, 1.0)
    observed = [Observation(s, min(truth(s), LIMIT / 2)) for s in seeds]  # all feasible
    trials = [optuna.trial.create_trial(values=[90.0, 1.0], user_attrs={
        CANDIDATE_ATTR: problem.candidate(o.allocation).to_json(),
        METRICS_ATTR: {"accuracy_drop": o.drop}}) for o in observed]
    refit, guard = bounded.refit(observed), bounded.guard(observed)
    assert not guard.boxes
    harshest = tuple(max(range(len(row)), key=row.__getitem__) for row in problem.loss)
    assert refit.predict(harshest) > guard.ceiling  # the model says: far past the bound
    mild = min(seeds, key=refit.predict)
    assert refit.predict(mild) <= guard.ceiling
    for planner, bound in ((bounded, LIMIT), (BudgetPlanner(problem, ["size"], []), None)):
        predictor = AllocationPredictor(planner, ["accuracy", "size"], 98.0)
        predictor.refit(trials)
        assert predictor.admissible(problem.candidate(mild))
        assert predictor.admissible(problem.candidate(harshest)) is (bound is None)
