"""EvoPress's cost-keeping level switch (search/samplers/level_switch.py) and the GA using it."""

from __future__ import annotations

import random

import pytest

from autosparse.search.allocation.problem import AllocationProblem
from autosparse.search.samplers.ga import GeneticSampler
from autosparse.search.samplers.level_switch import LevelSwitch
from autosparse.space.candidate import DENSE_FP32


def bits_problem(levels_per_decision: int = 4, decisions: int = 6) -> AllocationProblem:
    """Every decision offers 2, 4, 6, 8 bits (even steps, as EvoPress's levels): cost in bits."""
    bits = (2.0, 4.0, 6.0, 8.0)[:levels_per_decision]
    costs = {"bits": tuple(tuple(b for b in bits) for _ in range(decisions))}
    return AllocationProblem(
        decisions=tuple(f"d{i}" for i in range(decisions)),
        layers=tuple((f"l{i}",) for i in range(decisions)),
        options=tuple(tuple(DENSE_FP32 for _ in bits) for _ in range(decisions)),  # unused here
        loss=tuple(tuple(0.0 for _ in bits) for _ in range(decisions)),
        accuracy_delta=tuple(tuple(0.0 for _ in bits) for _ in range(decisions)),
        costs=costs, fixed={"bits": 0.0}, dense={"bits": 32.0 * decisions})


def test_a_switch_moves_two_decisions_and_keeps_the_cost_when_it_can():
    problem = bits_problem()
    switch = LevelSwitch(problem, "bits")
    rng = random.Random(0)
    parent = (1, 2, 1, 2, 1, 2)  # 4,6,4,6,4,6 bits: every move has an exact compensation
    total = problem.total("bits", parent)
    for _ in range(200):
        child = switch.switch_allocation(parent, rng)
        changed = [d for d in range(6) if child[d] != parent[d]]
        assert len(changed) == 2
        assert problem.total("bits", child) == pytest.approx(total)


def test_without_an_exact_compensation_the_nearest_is_taken_never_a_worse_one():
    problem = bits_problem()
    switch = LevelSwitch(problem, "bits")
    rng = random.Random(1)
    parent = (0, 0, 0, 0, 0, 3)  # all at 2 bits but one at 8: few exact compensations
    for _ in range(200):
        child = switch.switch_allocation(parent, rng)
        first = next(d for d in range(6) if child[d] != parent[d])
        alone = abs(problem.costs_of("bits")[first][child[first]]
                    - problem.costs_of("bits")[first][parent[first]])
        assert abs(problem.total("bits", child) - problem.total("bits", parent)) <= alone


def test_the_switch_is_reproducible_and_needs_two_movable_decisions():
    problem = bits_problem()
    a = [LevelSwitch(problem, "bits").switch_allocation((1,) * 6, random.Random(7)) for _ in "xy"]
    assert a[0] == a[1]
    single = bits_problem(decisions=1)
    assert LevelSwitch(single, "bits").switch_allocation((1,), random.Random(0)) == (1,)
    with pytest.raises(ValueError, match="size"):
        LevelSwitch(problem, "size")


def test_the_ga_refuses_a_switch_probability_without_a_switch():
    from autosparse.config.space_rules import SpaceConfig
    from autosparse.space.layers import LayerInfo, LayerTable
    from autosparse.space.search_space import SearchSpace

    table = LayerTable(layers=(LayerInfo("fc", "Linear", (8, 32), True, macs=256),),
                       other_params=0, input_shape=(32,))
    space = SearchSpace.build(SpaceConfig(), table)
    with pytest.raises(ValueError, match="switch_prob"):
        GeneticSampler(space=space, switch_prob=0.5)
    with pytest.raises(ValueError, match="switch_prob"):
        GeneticSampler(space=space, switch_prob=1.5, level_switch=None)


def test_config_level_switch_defaults_on_for_oneshot_ga_and_is_refused_elsewhere(tmp_path):
    from autosparse.config.schema import parse_config
    from autosparse.config.validation import ConfigError

    base = {"name": "x", "model": {"builtin": "digits-mlp"}, "data": {"source": "sklearn-digits"}}
    assert parse_config(base).strategy.switch_prob() == 0.0  # the fine-tune GA: as before
    with pytest.raises(ConfigError, match="level_switch"):
        parse_config({**base, "strategy": {"name": "bo", "level_switch": 0.5}})
    oneshot = {"name": "y", "model": {"pretrained": str(tmp_path)},
               "data": {"source": "text", "path": "stdlib"}, "task": {"kind": "language-model"},
               "oneshot": {}, "objectives": ["perplexity", "size"],
               "space": {"default": {"patterns": ["unstructured"], "sparsity": [0.0, 0.5],
                                     "bits": [4, 8]}}}
    assert parse_config(oneshot).strategy.switch_prob() == 0.5
    assert parse_config({**oneshot, "strategy": {"name": "ga", "use_sensitivity": False}}
                        ).strategy.switch_prob() == 0.0
    assert parse_config({**oneshot, "strategy": {"name": "hybrid"}}).strategy.switch_prob() == 0.5
    assert parse_config({**base, "strategy": {"name": "hybrid", "level_switch": 0.3}}
                        ).strategy.switch_prob() == 0.3
