"""grid-global, the practitioner's recipe: one global magnitude threshold x one uniform bit-width."""

import optuna
import torch
from helpers import TinyNet
from torch.nn.utils import prune

from autosparse.compress.apply import compress_model, weight_mask
from autosparse.config.sections import StrategyConfig
from autosparse.config.space_rules import SpaceConfig
from autosparse.search.samplers import GridSampler, make_sampler
from autosparse.space.candidate import UNSTRUCTURED
from autosparse.space.discovery import (
    discover_layers,
    find_layers,
    global_magnitude_allocation,
)
from autosparse.space.search_space import GRID_PARAM, GridSpace, SearchSpace

SPACE_CFG = SpaceConfig(default={"patterns": ["unstructured", "channel", "2:4"],
                                 "sparsity": [0.0, 0.5, 0.8], "bits": [4, 8, 32]})


def _setup():
    torch.manual_seed(0)
    model = TinyNet()
    table = discover_layers(model, (1, 8, 8))
    space = SearchSpace.build(SPACE_CFG, table)
    layers = find_layers(model)
    weights = {n: layers[n].weight for n in space.layer_names}
    allocations = global_magnitude_allocation(weights, [0.5, 0.8], digits=None)
    return model, space, GridSpace(tuple(space.global_grid_candidates(allocations)))


def test_per_layer_zero_counts_equal_prune_global_unstructured():
    model, space, grid = _setup()
    global_points = [c for c in grid.points
                     if all(ch.pattern == UNSTRUCTURED for ch in c.values())]
    assert len(global_points) == 2 * 3  # two global sparsities x three bit-widths
    for amount in (0.5, 0.8):
        reference = TinyNet()
        reference.load_state_dict(model.state_dict())
        modules = dict(reference.named_modules())
        prune.global_unstructured([(modules[n], "weight") for n in space.layer_names],
                                  pruning_method=prune.L1Unstructured, amount=amount)
        expected = {n: int((modules[n].weight_mask == 0).sum()) for n in space.layer_names}
        point = next(c for c in global_points if c["conv1"].bits == 32
                     and abs(sum(expected.values()) / sum(m.weight.numel() for n, m in modules.items()
                                                          if n in space.layer_names) - amount) < 1e-3
                     and _zeros(model, c, space) == expected)
        compressed = compress_model(model, point)
        for name in space.layer_names:
            kept = weight_mask(compressed, name)
            assert int((~kept.bool()).sum()) == expected[name], name
            # the same weights, not just the same count
            assert torch.equal(kept.bool(), modules[name].weight_mask.bool()), name


def _zeros(model, candidate, space):
    compressed = compress_model(model, candidate)
    return {n: int((~weight_mask(compressed, n).bool()).sum()) for n in space.layer_names}


def test_grid_holds_uniform_other_patterns_and_the_dense_model_at_each_width():
    _, space, grid = _setup()
    patterns = {frozenset(ch.pattern for ch in c.values()) for c in grid.points}
    # uniform channel pruning snaps the output layer (never offered channel) to unstructured
    assert frozenset({"channel", "unstructured"}) in patterns
    assert any("2:4" in p for p in patterns)  # conv1 cannot take 2:4 and is snapped
    widths = {c["fc1"].bits for c in grid.points if all(ch.pattern == "dense" for ch in c.values())}
    assert widths == {4, 8, 32}
    assert len({c.key for c in grid.points}) == len(grid.points)


def test_sampler_visits_every_point_once_through_the_grid_param():
    _, space, grid = _setup()
    sampler = make_sampler(StrategyConfig(name="grid-global"), space, seed=3, grid=grid)
    assert isinstance(sampler, GridSampler)
    study = optuna.create_study(sampler=sampler, directions=["maximize", "minimize"])
    seen = []

    def objective(trial):
        candidate = grid.suggest(trial)
        seen.append(candidate.key)
        return 1.0, float(len(seen))

    study.optimize(objective, n_trials=len(grid.points))
    assert sorted(seen) == sorted(c.key for c in grid.points)
    assert all(set(t.params) == {GRID_PARAM} for t in study.trials)
    assert grid.decode(study.trials[0].params).key == seen[0]
