"""Budgeted allocation: the problem's costs, the MILP against brute force, the predictor, the planner."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import numpy as np
import pytest

from autosparse.compress.footprint import footprint_metrics
from autosparse.config.hardware import load_profile
from autosparse.config.schema import load_config
from autosparse.config.space_rules import ChoiceSet, LayerRule, SpaceConfig
from autosparse.cost.estimate import estimate_cost
from autosparse.search.allocation.knapsack import (
    allocation_weight,
    brute_force,
    cheapest,
    solve,
)
from autosparse.search.allocation.planner import BudgetPlanner, Observation, planner_for
from autosparse.search.allocation.predictor import PRIOR_SCALE, fit, prior
from autosparse.search.allocation.problem import (
    AllocationProblem,
    StoredSizes,
    additive_error,
    build_problem,
    cost_objectives,
)
from autosparse.search.allocation.table import (
    ChoiceSensitivity,
    SensitivityTable,
    choice_id,
)
from autosparse.space.candidate import DENSE_FP32, Candidate
from autosparse.space.layers import LayerInfo, LayerTable
from autosparse.space.search_space import SearchSpace

ROOT = Path(__file__).resolve().parents[2]

# The quickstart's digits-cnn on 8x8 digits, as discovery reports it.
DIGITS = LayerTable(
    layers=(
        LayerInfo("conv1", "Conv2d", (16, 1, 3, 3), True, 9216, 64, 1024),
        LayerInfo("conv2", "Conv2d", (32, 16, 3, 3), True, 294912, 1024, 2048),
        LayerInfo("conv3", "Conv2d", (32, 32, 3, 3), True, 147456, 512, 512),
        LayerInfo("fc1", "Linear", (64, 512), True, 32768, 512, 64),
        LayerInfo("fc2", "Linear", (10, 64), True, 640, 64, 10),
    ),
    other_params=0,
    input_shape=(1, 8, 8),
)
QUICKSTART = SearchSpace.build(load_config(ROOT / "search_spaces/quickstart.yaml").space, DIGITS)
SENSITIVE = {"conv1": 2.0, "conv2": 0.5, "conv3": 0.7, "fc1": 0.3, "fc2": 1.5, "convs": 1.0}
PATTERN = {"dense": 0.0, "unstructured": 1.0, "2:4": 1.3, "channel": 2.5}
BITS = {2: 0.8, 4: 0.1, 8: 0.004, 32: 0.0}


def synthetic_loss(decision: str, choice) -> float:
    """Smooth, monotone damage: sparsity^2 by pattern plus a bits term, per layer sensitivity."""
    return SENSITIVE.get(decision, 1.0) * (PATTERN[choice.pattern] * choice.sparsity ** 2
                                           + BITS[choice.bits])


def sensitivity_for(space: SearchSpace, skip: tuple[str, str] | None = None) -> SensitivityTable:
    entries = []
    for d in space.decisions:
        for c in sorted(d.distinct_choices()):
            if c == DENSE_FP32 or (d.name, choice_id(c)) == skip:
                continue
            loss = synthetic_loss(d.name, c)
            entries.append(ChoiceSensitivity(d.name, choice_id(c), loss, -min(90.0, 30 * loss)))
    return SensitivityTable(entries=tuple(entries), dense_loss=0.1, dense_accuracy=97.0, samples=256)


def random_candidate(space: SearchSpace, rng: random.Random) -> Candidate:
    choices = {}
    for d in space.decisions:
        choice = rng.choice(sorted(d.distinct_choices()))
        choices.update({layer: choice for layer in d.layers})
    return Candidate(choices)


@pytest.fixture(scope="module")
def problem():
    return build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART),
                         ["accuracy", "size", "macs", "bops"])


# ---------------------------------------------------------------------- problem


def test_options_are_the_decisions_choices_and_dense_fp32_encodes(problem):
    for d, options in zip(QUICKSTART.decisions, problem.options):
        assert list(options) == sorted(d.distinct_choices())
        assert DENSE_FP32 in options  # sparsity 0.0 and bits 32 are allowed
        d.params_of(DENSE_FP32)  # and it is encodable as params
    dense = problem.dense_allocation()
    assert dense is not None and problem.candidate(dense) == QUICKSTART.decode(
        QUICKSTART.params_of(problem.candidate(dense)))
    for d, o in enumerate(dense):
        assert problem.loss[d][o] == 0.0 and problem.accuracy_delta[d][o] == 0.0


def test_no_dense_fp32_option_when_the_space_forbids_it():
    space = SearchSpace.build(SpaceConfig(default=ChoiceSet(sparsity=[0.5], patterns=["unstructured"],
                                                            bits=[8])), DIGITS)
    built = build_problem(space, DIGITS, sensitivity_for(space), ["size"])
    assert all(DENSE_FP32 not in opts for opts in built.options)
    assert built.dense_allocation() is None


def test_missing_sensitivity_entry_names_decision_and_choice():
    choice = sorted(QUICKSTART.decisions[1].distinct_choices())[3]
    table = sensitivity_for(QUICKSTART, skip=("conv2", choice_id(choice)))
    with pytest.raises(ValueError, match=f"conv2.*{choice_id(choice)}"):
        build_problem(QUICKSTART, DIGITS, table, ["size"])


def test_hardware_objectives_need_a_profile():
    with pytest.raises(ValueError, match="profile"):
        build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART), ["latency"])
    assert cost_objectives(["accuracy", "size"], ["accuracy_drop", "latency_ms", "size_kb"]) == [
        "size", "latency"]


@pytest.mark.parametrize("tied", [False, True])
def test_size_macs_bops_are_exactly_additive(tied):
    """Against footprint_metrics on random candidates, with a tied group and an excluded layer
    (its dense cost and other params must land in ``fixed``)."""
    table = LayerTable(layers=DIGITS.layers, other_params=1234, input_shape=(1, 8, 8))
    rules = [LayerRule(layers=["conv2", "conv3"], tie=True, name="convs")] if tied else []
    space = SearchSpace.build(SpaceConfig(exclude=["fc2"], rules=rules,
                                          default=ChoiceSet(bits=[2, 4, 8, 32])), table)
    built = build_problem(space, table, sensitivity_for(space), ["size", "macs", "bops"])
    assert built.fixed["size"] == pytest.approx((1234 * 32 + 10 * 64 * 32 + 10 * 32) / 8000)
    rng = random.Random(0)
    dense = footprint_metrics(table, Candidate({}))
    assert built.dense["size"] == pytest.approx(dense["size_kb"], rel=1e-12)
    for _ in range(200):
        candidate = random_candidate(space, rng)
        allocation = built.allocation_of(candidate)
        assert built.candidate(allocation) == candidate
        truth = footprint_metrics(table, candidate)
        assert built.total("size", allocation) == pytest.approx(truth["size_kb"], rel=1e-12)
        assert built.total("macs", allocation) == pytest.approx(truth["macs"], rel=1e-12)
        assert built.total("bops", allocation) == pytest.approx(truth["bops"], rel=1e-12)


@pytest.mark.parametrize("profile_name", ["edge-arm-a76", "x86-server-vnni"])
def test_latency_energy_additive_error_is_small(profile_name):
    """Exact for the dense model; within ~6 % (median) on random candidates: a precision switch
    depends on the neighbour's precision and the weights' memory level on all layers, which an
    additive model cannot see. README quotes the figures (benchmarks/allocation_additivity.py)."""
    profile = load_profile(profile_name)
    built = build_problem(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART),
                          ["latency", "energy"], profile)
    dense = built.dense_allocation()
    truth = estimate_cost(DIGITS, Candidate({}), profile).metrics()
    assert built.total("latency", dense) == pytest.approx(truth["latency_ms"], rel=1e-12)
    assert built.total("energy", dense) == pytest.approx(truth["energy_uj"], rel=1e-12)
    rng = random.Random(1)
    errors = additive_error(built, DIGITS, profile,
                            [random_candidate(QUICKSTART, rng) for _ in range(200)])
    for o, values in errors.items():
        assert np.median(np.abs(values)) < 0.10, (o, np.median(np.abs(values)))
        assert np.max(np.abs(values)) < 0.30, (o, np.max(np.abs(values)))


def test_problem_rejects_bad_shapes_and_allocations(problem):
    with pytest.raises(ValueError, match="allocation"):
        problem.total("size", (0,) * (len(problem.options) - 1))
    with pytest.raises(ValueError, match="latency"):
        problem.total("latency", problem.dense_allocation())
    with pytest.raises(ValueError, match="loss"):
        AllocationProblem(("a",), (("x",),), ((DENSE_FP32,),), ((0.0, 1.0),), ((0.0,),),
                          {}, {}, {})


# ---------------------------------------------------------------------- knapsack


def random_problem(rng: np.random.Generator, decisions: int, options: int) -> AllocationProblem:
    sizes = [int(rng.integers(2, options + 1)) for _ in range(decisions)]
    costs = {}
    for name in ("size", "macs", "bops", "latency", "energy"):
        scale = {"size": 10.0, "macs": 1e5, "bops": 1e8, "latency": 0.05, "energy": 3.0}[name]
        costs[name] = tuple(tuple(float(v) for v in rng.uniform(0.1, 1.0, k) * scale) for k in sizes)
    loss = tuple(tuple(float(v) for v in rng.uniform(-0.1, 2.0, k)) for k in sizes)
    return AllocationProblem(
        decisions=tuple(f"d{i}" for i in range(decisions)),
        layers=tuple((f"l{i}",) for i in range(decisions)),
        options=tuple(tuple(DENSE_FP32 for _ in range(k)) for k in sizes),  # unused here
        loss=loss, accuracy_delta=loss, costs=costs,
        fixed={name: float(rows[0][0]) for name, rows in costs.items()},
        dense={name: float(sum(max(r) for r in rows)) for name, rows in costs.items()})


def _all_totals(problem, objective):
    return sorted(problem.total(objective, a)
                  for a in itertools.product(*(range(len(o)) for o in problem.options)))


@pytest.mark.parametrize("objective", ["size", "macs", "bops", "latency", "energy"])
def test_solve_matches_brute_force(objective):
    rng = np.random.default_rng(hash(objective) % 2**32)
    for trial in range(12):
        problem = random_problem(rng, int(rng.integers(2, 5)), 5)
        totals = _all_totals(problem, objective)
        budget = float(rng.uniform(totals[0], totals[-1]))
        w = problem.loss
        extra = None
        if trial % 3 == 2:  # a second budget on another objective
            other = "size" if objective != "size" else "macs"
            extra = {other: float(np.quantile(_all_totals(problem, other), 0.7))}
        exact = brute_force(problem, w, objective, budget, extra_budgets=extra)
        got = solve(problem, w, objective, budget, extra_budgets=extra)
        if exact is None:
            assert got is None
            continue
        assert got is not None
        assert allocation_weight(w, got) == pytest.approx(allocation_weight(w, exact), abs=1e-5)
        assert problem.total(objective, got) <= budget * (1 + 1e-9)
        # exclusions: forbid the optimum and the next two; both methods agree again
        exclude = [exact]
        for _ in range(2):
            nxt = brute_force(problem, w, objective, budget, exclude=exclude, extra_budgets=extra)
            got = solve(problem, w, objective, budget, exclude=exclude, extra_budgets=extra)
            if nxt is None:
                assert got is None
                break
            assert got not in exclude
            assert allocation_weight(w, got) == pytest.approx(allocation_weight(w, nxt), abs=1e-5)
            exclude.append(got)


def test_infeasible_budget_and_full_exclusion_give_none():
    problem = random_problem(np.random.default_rng(3), 3, 3)
    totals = _all_totals(problem, "size")
    assert solve(problem, problem.loss, "size", totals[0] * 0.99) is None
    assert brute_force(problem, problem.loss, "size", totals[0] * 0.99) is None
    everything = list(itertools.product(*(range(len(o)) for o in problem.options)))
    assert solve(problem, problem.loss, "size", totals[-1], exclude=everything) is None
    cheapest_one = solve(problem, problem.loss, "size", totals[0])
    assert problem.total("size", cheapest_one) == pytest.approx(totals[0])


def test_cheapest_is_the_dual():
    problem = random_problem(np.random.default_rng(5), 4, 4)
    w = problem.loss
    for limit in (0.5, 2.0, 4.0):
        got = cheapest(problem, w, "size", limit)
        feasible = [a for a in itertools.product(*(range(len(o)) for o in problem.options))
                    if allocation_weight(w, a) <= limit]
        if not feasible:
            assert got is None
            continue
        best = min(problem.total("size", a) for a in feasible)
        assert problem.total("size", got) == pytest.approx(best)


def test_solve_is_fast_on_a_large_problem():
    """14 decisions x 40 options (README quotes the time)."""
    problem = random_problem(np.random.default_rng(0), 14, 40)
    problem = AllocationProblem(**{**problem.__dict__, "options": tuple(
        tuple(DENSE_FP32 for _ in range(40)) for _ in range(14))} | {
        "costs": {k: tuple(tuple(list(r) + [r[-1]] * (40 - len(r))) for r in v)
                  for k, v in problem.costs.items()},
        "loss": tuple(tuple(list(r) + [r[-1]] * (40 - len(r))) for r in problem.loss),
        "accuracy_delta": tuple(tuple(list(r) + [r[-1]] * (40 - len(r))) for r in problem.loss)})
    budget = problem.fixed["size"] + 0.4 * sum(max(r) for r in problem.costs["size"])
    start = time.perf_counter()
    exclude = []
    for _ in range(5):
        exclude.append(solve(problem, problem.loss, "size", budget, exclude=exclude))
    per_solve = (time.perf_counter() - start) / 5
    assert None not in exclude and len(set(exclude)) == 5
    assert per_solve < 1.0


# ---------------------------------------------------------------------- predictor


def test_prior_without_data(problem):
    model = fit(problem, [])
    assert model == prior(problem)
    assert model.a == tuple(PRIOR_SCALE["loss"] for _ in problem.decisions) and model.b == 0.0
    two = [(problem.dense_allocation(), 0.1), (problem.allocation_of(random_candidate(
        QUICKSTART, random.Random(0))), 3.0)]
    assert fit(problem, two).scale == PRIOR_SCALE["loss"]  # < 3 observations: prior scale


def test_fit_recovers_known_scales_and_offset(problem):
    rng = random.Random(0)
    a_true = [4.0, 1.0, 7.0, 2.5, 0.5]
    b_true = 0.3
    allocations = [problem.allocation_of(random_candidate(QUICKSTART, rng)) for _ in range(300)]
    data = [(al, b_true + sum(a_true[d] * problem.loss[d][o] for d, o in enumerate(al)))
            for al in allocations]
    model = fit(problem, data, ridge=0.1, ridge_b=0.1)
    assert model.a == pytest.approx(a_true, rel=0.05)
    assert model.b == pytest.approx(b_true, abs=0.05)
    assert model.predict(allocations[0]) == pytest.approx(data[0][1], rel=0.05, abs=0.05)
    # the per-option weights are the prediction without the intercept
    w = model.weights()
    assert model.predict(allocations[1]) == pytest.approx(model.b + allocation_weight(w, allocations[1]))


def test_fit_keeps_scales_non_negative_and_shrinks_with_little_data(problem):
    rng = random.Random(1)
    allocations = [problem.allocation_of(random_candidate(QUICKSTART, rng)) for _ in range(6)]
    noisy = [(al, rng.uniform(0, 10)) for al in allocations]
    model = fit(problem, noisy)
    assert all(a >= 0 for a in model.a)
    sloped = [(al, 2.0 * sum(problem.loss[d][o] for d, o in enumerate(al))) for al in allocations]
    shrunk = fit(problem, sloped, ridge=100.0)
    assert shrunk.scale == pytest.approx(2.0, rel=1e-6)
    assert np.allclose(shrunk.a, 2.0, rtol=0.02)  # strong ridge: every a_d at the shared scale


def test_prediction_is_monotone_in_sensitivity(problem):
    rng = random.Random(2)
    data = [(problem.allocation_of(random_candidate(QUICKSTART, rng)), rng.uniform(0, 5))
            for _ in range(20)]
    model = fit(problem, data)
    base = list(problem.dense_allocation())
    for d in range(len(base)):
        order = sorted(range(len(problem.options[d])), key=lambda o: problem.loss[d][o])
        preds = []
        for o in order:
            allocation = list(base)
            allocation[d] = o
            preds.append(model.predict(allocation))
        assert all(x <= y + 1e-12 for x, y in zip(preds, preds[1:]))


def test_accuracy_signal(problem):
    model = prior(problem, signal="accuracy")
    assert model.s[1] == tuple(-v for v in problem.accuracy_delta[1])
    with pytest.raises(ValueError, match="signal"):
        prior(problem, signal="bogus")


# ---------------------------------------------------------------------- planner


def test_seeds_are_distinct_near_lossless_and_denser_near_dense(problem):
    planner = BudgetPlanner(problem, ["size"])
    seeds = planner.seeds(8)
    assert len(seeds) == len(set(seeds)) == 8
    model = planner.prior
    drops = [model.predict(s) for s in seeds]
    assert max(drops) <= planner.max_drop + 1e-9
    sizes = [problem.total("size", s) for s in seeds]
    assert max(sizes) < problem.dense["size"]  # every seed compresses
    # a sweep from near dense down: cheaper seeds lose more, and low drops are sampled densest
    by_drop = sorted(zip(drops, sizes))
    assert [size for _, size in by_drop] == sorted(sizes, reverse=True)
    assert sum(d < planner.max_drop / 2 for d in drops) > sum(d >= planner.max_drop / 2 for d in drops)
    assert by_drop[-1][0] == pytest.approx(planner.max_drop, rel=0.2)  # the sweep reaches its end


def test_seeds_round_robin_over_two_objectives_and_respect_constraints(problem):
    limit = 0.25 * problem.dense["size"]
    planner = BudgetPlanner(problem, ["size", "macs"], [("size_kb", "<=", limit)])
    seeds = planner.seeds(6)
    assert len(set(seeds)) == 6
    assert all(problem.total("size", s) <= limit * (1 + 1e-9) for s in seeds)
    assert len({problem.total("macs", s) for s in seeds}) > 1


def test_accuracy_drop_constraint_caps_the_region(problem):
    planner = BudgetPlanner(problem, ["size"], [("accuracy_drop", "<=", 1.0)])
    assert planner.max_drop == 1.0 and planner.near_lossless == 1.0


def test_next_fills_the_largest_gap_and_never_repeats(problem):
    planner = BudgetPlanner(problem, ["size"])
    seeds = planner.seeds(4)
    truth = lambda al: 0.3 * planner.prior.predict(al)  # fine-tuning recovers 70 %  # noqa: E731
    observed = [Observation(s, truth(s), {"size": problem.total("size", s)}) for s in seeds]
    seen = set(seeds)
    for _ in range(6):
        nxt = planner.next(observed)
        assert nxt is not None and nxt not in seen
        seen.add(nxt)
        observed.append(Observation(nxt, truth(nxt), {"size": problem.total("size", nxt)}))
    # the refit learnt the 0.3 scale (up to the ridge pull toward the shared scale)
    assert planner.predictor(observed).scale == pytest.approx(0.3 * PRIOR_SCALE["loss"], rel=0.05)


def test_next_goes_cheaper_once_trials_show_the_prior_was_pessimistic(problem):
    planner = BudgetPlanner(problem, ["size"])
    seeds = planner.seeds(4)
    cheapest_seed = min(problem.total("size", s) for s in seeds)
    observed = [Observation(s, 0.1 * planner.prior.predict(s), {}) for s in seeds]
    nxt = planner.next(observed)
    assert problem.total("size", nxt) < cheapest_seed


def test_failed_and_pending_allocations_are_never_proposed(problem):
    planner = BudgetPlanner(problem, ["size"])
    seeds = planner.seeds(3)
    observed = [Observation(seeds[0], 0.2), Observation(seeds[1], None)]
    pending = [seeds[2]]
    got = {planner.next(observed, pending=pending)}
    assert not got & set(seeds)


def test_planner_for_builds_costs_for_constraints(problem):
    planner = planner_for(QUICKSTART, DIGITS, sensitivity_for(QUICKSTART), ["accuracy", "size"],
                          [("latency_ms", "<=", 1.0)], load_profile("edge-arm-a76"))
    assert planner.objectives == ["size"]
    assert set(planner.problem.objectives) == {"size", "latency"}
    assert planner.extra_budgets == {"latency": 1.0}
    with pytest.raises(ValueError, match="latency"):
        BudgetPlanner(problem, ["latency"])


def test_stored_sizes_give_the_files_exact_size_and_bits():
    """One-shot costs: a layer's bytes are what its level stores; the rest of the model is F32."""
    from autosparse.space.candidate import LayerChoice

    def weight_bytes(layer, choice):  # 34 bytes per 32 weights at 8 bits (Q8_0), F32 otherwise
        n = {"a": 64, "b": 128}[layer]
        return n * 34 // 32 if choice.bits == 8 else n * 4

    stored = StoredSizes(weight_bytes, {"a": 64, "b": 128}, dense_bytes=4 * (64 + 128 + 10))
    int8 = LayerChoice.make("dense", 0.0, 8)
    assert stored.option_cost("size", ["a", "b"], int8) == pytest.approx(192 * 34 / 32 / 1000)
    assert stored.option_cost("bits", ["a"], int8) == pytest.approx(8 * 68 / 192)
    assert stored.fixed_and_dense("size") == pytest.approx((0.040, 0.808))
    assert stored.fixed_and_dense("bits") == (0.0, 32.0)
    assert cost_objectives(["accuracy", "kl", "bits"]) == ["bits"]
