"""The cheap model in the loop: the pick among screened proposals, and the GA's use of it."""

from __future__ import annotations

import numpy as np
import optuna

from autosparse.config.space_rules import SpaceConfig
from autosparse.search.samplers import GeneticSampler
from autosparse.search.samplers.ga import _normalised_weights
from autosparse.search.samplers.screening import pick_most_promising, pick_screened
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.layers import LayerInfo, LayerTable
from autosparse.space.search_space import SearchSpace

MAX_MIN = ["maximize", "minimize"]


def test_pick_prefers_the_largest_hypervolume_gain():
    observed = np.array([[95.0, 10.0], [90.0, 5.0]])
    predicted = np.array([[94.0, 11.0],   # dominated by (95, 10): no gain
                          [93.0, 6.0],    # fills the gap between the two: some gain
                          [99.0, 4.0]])   # dominates both: the largest gain
    assert pick_most_promising(predicted, observed, MAX_MIN) == 2
    assert pick_most_promising(predicted[:2], observed, MAX_MIN) == 1


def test_pick_without_gain_takes_the_one_closest_to_the_front():
    observed = np.array([[95.0, 10.0], [90.0, 5.0]])
    predicted = np.array([[80.0, 20.0], [94.5, 10.5], [70.0, 30.0]])
    assert pick_most_promising(predicted, observed, MAX_MIN) == 1


def test_pick_with_nothing_observed_or_one_proposal_is_the_first():
    assert pick_most_promising(np.array([[1.0, 2.0], [3.0, 1.0]]), np.zeros((0, 2)), MAX_MIN) == 0
    assert pick_most_promising(np.array([[1.0, 2.0]]), np.array([[5.0, 1.0]]), MAX_MIN) == 0


def test_mutation_weights_keep_mean_one_and_are_clipped():
    weights = _normalised_weights([0.0, 1.0, 100.0, 1.0])
    assert np.isclose(np.mean(weights), 1.0)
    assert max(weights) / min(weights) <= 16.0 + 1e-9
    assert weights[2] == max(weights) and weights[0] == min(weights)
    assert _normalised_weights([0.0, 0.0]) == [1.0, 1.0]


TABLE = LayerTable(layers=(
    LayerInfo("a", "Linear", (16, 16), True, macs=256),
    LayerInfo("b", "Linear", (16, 16), True, macs=256),
    LayerInfo("c", "Linear", (10, 16), True, macs=160),
))
SPACE = SearchSpace.build(SpaceConfig(default={"patterns": ["unstructured"],
                                               "sparsity": [0.0, 0.5, 0.9], "bits": [4, 8, 32]}),
                          TABLE)


def total_sparsity(candidate: Candidate) -> float:
    return sum(c.sparsity for c in candidate.values())


class SparsityLovingPredictor:
    """Predicts that total sparsity costs no accuracy and shrinks size: the sparsest child wins.
    With ``forbid_above``, a guard admits only children of at most that total sparsity."""

    def __init__(self, forbid_above: float | None = None):
        self.refits = 0
        self.seen: list[list[Candidate]] = []
        self.forbid_above = forbid_above

    def refit(self, trials):
        self.refits += 1

    def admissible(self, candidate: Candidate) -> bool:
        return self.forbid_above is None or total_sparsity(candidate) <= self.forbid_above + 1e-9

    def predicted_drop(self, candidate: Candidate) -> float:
        return total_sparsity(candidate)

    def predict(self, candidate: Candidate) -> np.ndarray:
        sparsity = sum(c.sparsity for c in candidate.values())
        bits = sum(c.bits for c in candidate.values())
        return np.array([99.0, 100.0 - 10 * sparsity - bits / 10])


def _objective(trial):
    candidate = SPACE.suggest(trial)
    return 90.0, 100.0 - sum(c.sparsity for c in candidate.values()) * 5


def test_ga_fine_tunes_the_screened_child_the_predictor_likes_most():
    def run(screen, predictor):
        sampler = GeneticSampler(space=SPACE, population_size=4, seed=1, screen=screen,
                                 predictor=predictor)
        study = optuna.create_study(directions=MAX_MIN, sampler=sampler)
        study.optimize(_objective, n_trials=14)
        return study

    predictor = SparsityLovingPredictor()
    screened = run(8, predictor)
    plain = run(1, None)
    assert predictor.refits > 0
    keys = [SPACE.decode(t.params).key for t in screened.trials]
    assert len(set(keys)) == len(keys)  # never a duplicate
    sparsity = lambda s: np.mean([sum(c.sparsity for c in SPACE.decode(t.params).values())
                                  for t in s.trials[4:]])
    assert sparsity(screened) > sparsity(plain)


def test_ga_mutation_weights_change_which_genes_move():
    sampler = GeneticSampler(space=SPACE, population_size=4, seed=0,
                             gene_weights={"a": 100.0, "b": 0.0, "c": 0.0}, mutation_prob=0.3)
    import random

    random.seed(0)
    moved = np.zeros(len(sampler._params))
    for _ in range(2000):
        genome = [0] * len(sampler._params)
        mutated = sampler._mutate(list(genome))
        moved += np.array([g != 0 for g in mutated])
    a_genes = [i for i, p in enumerate(sampler._params) if p.startswith("a/")]
    other = [i for i, p in enumerate(sampler._params) if not p.startswith("a/")]
    assert moved[a_genes].min() > 3 * moved[other].max()


def test_ga_breeds_only_children_the_guard_admits():
    """Under a guard (the planner's, for an accuracy bound) the sparsest child is no longer
    picked when it is forbidden: every bred trial stays within the admitted total sparsity,
    although the predictor would gain most from the forbidden ones."""
    limit = 1.0
    sampler = GeneticSampler(space=SPACE, population_size=4, seed=1, screen=8,
                             predictor=SparsityLovingPredictor(forbid_above=limit))
    study = optuna.create_study(directions=MAX_MIN, sampler=sampler)
    study.optimize(_objective, n_trials=14)
    bred = [total_sparsity(SPACE.decode(t.params)) for t in study.trials[4:]]
    assert max(bred) <= limit + 1e-9, bred
    free = GeneticSampler(space=SPACE, population_size=4, seed=1, screen=8,
                          predictor=SparsityLovingPredictor())
    unguarded = optuna.create_study(directions=MAX_MIN, sampler=free)
    unguarded.optimize(_objective, n_trials=14)
    assert max(total_sparsity(SPACE.decode(t.params)) for t in unguarded.trials[4:]) > limit


def test_pick_screened_keeps_to_the_admitted_else_the_safest():
    study = optuna.create_study(directions=MAX_MIN)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[99.0, 90.0]))
    choice = lambda s: {name: LayerChoice.make("unstructured", s, 8) for name in "abc"}  # noqa
    chosen = [(Candidate(choice(s)), {"which": s}) for s in (0.9, 0.5, 0.0)]
    guarded = SparsityLovingPredictor(forbid_above=1.5)  # totals 2.7, 1.5, 0.0
    assert pick_screened(chosen, guarded, study) == {"which": 0.5}  # sparsest admitted
    assert pick_screened(chosen, SparsityLovingPredictor(), study) == {"which": 0.9}
    nothing = SparsityLovingPredictor(forbid_above=-1.0)
    assert pick_screened(chosen, nothing, study) == {"which": 0.0}  # least predicted drop
