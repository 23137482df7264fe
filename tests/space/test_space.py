"""Space encoding/decoding: config rules + layer table -> Optuna params <-> candidates."""

import itertools

import optuna
import pytest

from autosparse.config.schema import ConfigError
from autosparse.config.space_rules import SpaceConfig
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.search_space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(table, **space):
    return SearchSpace.build(SpaceConfig.model_validate(space), table)


def test_default_space_drops_impossible_patterns(small_table):
    space = _space(small_table)
    conv1 = space.decisions[0]
    assert "2:4" not in conv1.patterns and "2:4" in space.decisions[1].patterns
    assert any("conv1" in note for note in space.notes)


def test_space_size_counts_distinct_candidates(small_table):
    space = _space(small_table, default={"sparsity": [0, 0.5], "patterns": ["unstructured", "2:4"], "bits": [8, 32]})
    # conv1: dense or unstructured 50%, x2 bits = 4; conv2/fc: dense, unstr 50%, 2:4 (x2 bits) = 6
    assert space.size() == 4 * 6 * 6


def test_include_exclude_rules_and_ties(small_table):
    space = _space(
        small_table,
        exclude=["fc"],
        rules=[{"layers": ["conv.*"], "tie": True, "name": "convs", "bits": [4, 8], "patterns": ["unstructured"]}],
    )
    assert [d.name for d in space.decisions] == ["convs"]
    assert space.decisions[0].layers == ("conv1", "conv2") and space.excluded == ("fc",)
    candidate = space.decode({"convs/sparsity": 0.5, "convs/bits": 4})
    assert candidate["conv1"] == candidate["conv2"] == LayerChoice.make("unstructured", 0.5, 4)
    assert "fc" not in candidate


def test_first_matching_rule_wins_and_inherits_default(small_table):
    space = _space(small_table, rules=[{"layers": ["fc"], "bits": [8]}, {"layers": ["fc", "conv2"], "bits": [2]}])
    by_name = {d.name: d for d in space.decisions}
    assert by_name["fc"].bits == (8,) and by_name["conv2"].bits == (2,)
    assert by_name["fc"].sparsities == (0.0, 0.25, 0.5, 0.75, 0.9)
    assert "fc/bits" not in space.param_names()


def test_no_layer_or_no_pattern_left_is_a_clear_error(small_table):
    with pytest.raises(ConfigError, match="no layer left"):
        _space(small_table, exclude=[".*"])
    with pytest.raises(ConfigError, match="no allowed pattern fits layer.*conv1"):
        _space(small_table, rules=[{"layers": ["conv1"], "patterns": ["2:4"]}])


def test_suggest_decode_params_round_trip(small_table):
    space = _space(small_table)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = []

    def objective(trial):
        candidate = space.suggest(trial)
        assert space.decode(trial.params) == candidate
        assert space.decode(space.params_of(candidate)) == candidate  # dense has several spellings
        seen.append(candidate)
        return 0.0, 0.0

    study.optimize(objective, n_trials=40)
    nm_trials = [t for t in study.trials if t.params.get("fc/pattern") == "2:4"]
    assert nm_trials and all("fc/sparsity" not in t.params for t in nm_trials)
    for candidate in seen:
        for d in space.decisions:
            assert candidate[d.layers[0]] in d.distinct_choices()


def test_enqueued_candidate_comes_back(small_table):
    space = _space(small_table)
    wanted = Candidate({
        "conv1": LayerChoice.make("channel", 0.25, 4),
        "conv2": LayerChoice.make("2:4", 0, 8),
        "fc": LayerChoice.make("dense", 0, 32),
    })
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(space.params_of(wanted))
    got = []
    study.optimize(lambda t: (got.append(space.suggest(t)), (0.0, 0.0))[1], n_trials=1)
    assert got == [wanted]


def test_uniform_and_global_magnitude_candidates(small_table):
    space = _space(small_table)
    uniform = space.uniform_candidates()
    assert len({c.key for c in uniform}) == len(uniform)
    for candidate in uniform:
        bits = {choice.bits for choice in candidate.values()}
        assert len(bits) == 1
    # 2:4 for conv1 is impossible, so it snaps to unstructured 50%
    nm = [c for c in uniform if c["conv2"].pattern == "2:4"]
    assert nm and all(c["conv1"] == LayerChoice.make("unstructured", 0.5, c["conv2"].bits) for c in nm)
    gm = space.global_magnitude_candidates(small_table)
    at_90 = [c for c in gm if c["conv2"].sparsity == 0.9 and c["conv1"].sparsity == 0.5]
    assert at_90, "0.93 snaps to 0.9 and 0.6 to 0.5"
    warm = space.warm_start_candidates(small_table, count=8, seed=0)
    assert len(warm) == 8 and len({c.key for c in warm}) == 8
    assert space.warm_start_candidates(small_table, count=8, seed=0) == warm


def test_snap_chooses_nearest_allowed(small_table):
    space = _space(small_table, default={"sparsity": [0.5, 0.9], "patterns": ["channel"], "bits": [4, 8]})
    got = space.snap({name: LayerChoice.make("unstructured", 0.7, 6) for name in small_table.names})
    assert all(c == LayerChoice.make("channel", 0.5, 8) for c in got.values())


@pytest.mark.parametrize("patterns, sparsity", list(itertools.product(
    [["unstructured"], ["channel", "2:4"], ["dense", "1:4"]], [[0.0], [0.3, 0.6]])))
def test_every_distinct_choice_has_params(small_table, patterns, sparsity):
    space = _space(small_table, default={"patterns": patterns, "sparsity": sparsity, "bits": [4, 32]},
                   rules=[{"layers": ["conv1"], "patterns": ["unstructured"]}])
    for d in space.decisions:
        for choice in d.distinct_choices():
            assert d.decode(d.params_of(choice)) == choice


def test_a_rule_that_matches_no_layer_is_an_error_with_a_close_match():
    from autosparse.config.schema import ConfigError
    from autosparse.config.space_rules import SpaceConfig
    from autosparse.space.discovery import discover
    from autosparse.workload.models import DigitsCNN

    table, _ = discover(DigitsCNN(1, 8, 8, 10).eval(), (1, 8, 8))
    for space, where in [({"rules": [{"layers": ["convv1"], "bits": [8]}]}, "space.rules[0].layers"),
                         ({"exclude": ["fc3"]}, "space.exclude"),
                         ({"include": ["conv.*", "head"]}, "space.include")]:
        with pytest.raises(ConfigError) as err:
            SearchSpace.build(SpaceConfig.model_validate(space), table)
        assert str(err.value).startswith(where) and "matches no layer" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean conv1"):
        SearchSpace.build(SpaceConfig.model_validate({"rules": [{"layers": ["convv1"]}]}), table)
