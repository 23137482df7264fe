import json

import pytest

from autosparse.space.candidate import DENSE_FP32, Candidate, LayerChoice


def test_canonical_forms_hash_alike():
    a = Candidate({"x": LayerChoice.make("unstructured", 0.0, 8)})
    b = Candidate({"x": LayerChoice.make("channel", 0.0, 8, "taylor")})
    assert a == b and a.key == b.key
    nm = LayerChoice.make("2:4", 0.9, 4)
    assert nm.sparsity == 0.5 and nm.pattern == "2:4"


def test_json_round_trip_over_every_pattern():
    choices = {
        "a": LayerChoice.make("unstructured", 0.75, 4, "taylor"),
        "b": LayerChoice.make("1:4", 0, 8),
        "c": LayerChoice.make("channel", 0.25, 32),
        "d": LayerChoice.make("dense", 0.3, 16),
    }
    candidate = Candidate(choices)
    again = Candidate.from_json(candidate.to_json())
    assert again == candidate and again.key == candidate.key
    assert json.loads(candidate.to_json())["b"]["sparsity"] == 0.75
    assert len({candidate, again}) == 1


def test_missing_layers_are_dense_fp32():
    assert Candidate({}).get_choice("anything") == DENSE_FP32


@pytest.mark.parametrize(
    "args, message",
    [
        (("diagonal", 0.5, 8), "pattern"),
        (("unstructured", 0.5, 1), "bits"),
        (("unstructured", 0.5, 24), "bits"),
        (("unstructured", 1.0, 8), "sparsity"),
        (("4:4", 0.5, 8), "pattern"),
        (("unstructured", 0.5, 8, "random"), "criterion"),
    ],
)
def test_invalid_choices_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        LayerChoice.make(*args)


def test_describe_is_short():
    assert LayerChoice.make("2:4", 0, 8).describe() == "2:4/int8"
    assert LayerChoice.make("unstructured", 0.75, 4).describe() == "unstructured 75%/int4"
    assert DENSE_FP32.describe() == "dense/fp32"
