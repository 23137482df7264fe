"""The pure parts of benchmarks/search_quality_targets.py: the default rule and the
compression-at-equal-accuracy comparison with the by-hand recipe."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.helpers import benchmark_module


@pytest.fixture(scope="module")
def targets():
    return benchmark_module("search_quality_targets.py")


def results(rows: list[tuple[str, str, int, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["model", "method", "seed", "hv5_val", "cr_drop1",
                                       "test_drop_at_cr_drop1"])


def test_compression_is_paired_by_model_and_seed(targets):
    frame = results([("a", "grid-global", 0, 1.0, 10.0, 0.5),
                     ("a", "grid-global", 1, 1.0, 4.0, 1.0),
                     ("a", "hybrid", 0, 1.0, 20.0, 0.8), ("a", "hybrid", 1, 1.0, 2.0, 0.2),
                     ("b", "hybrid", 0, 1.0, 5.0, 0.1)])  # no grid-global on b: left out
    gains = targets.compression_gains(frame).set_index("seed")
    assert list(gains.index) == [0, 1]
    assert gains.loc[0, "compression_ratio"] == pytest.approx(2.0)
    assert gains.loc[1, "compression_ratio"] == pytest.approx(0.5)
    assert gains.loc[1, "reference_test_drop"] == pytest.approx(1.0)
    lines = "\n".join(targets.compression_lines(targets.compression_gains(frame)))
    # geometric mean of 2 and 0.5 is 1: one seed above, one below
    assert "| hybrid | 1.00× | +0.00 ± 1.00 | 1 / 1 of 2 | 0.50 (0.75) |" in lines


def test_a_front_with_no_point_within_the_drop_has_no_ratio(targets):
    frame = results([("a", "grid-global", 0, 1.0, 10.0, 0.5),
                     ("a", "ga", 0, 1.0, math.nan, math.nan)])
    assert targets.compression_gains(frame).empty


def test_default_changes_only_beyond_two_standard_errors(targets):
    val = pd.DataFrame({"model": ["a", "a", "b", "b"] * 2, "seed": [0, 1] * 4,
                        "method": ["ga"] * 4 + ["hybrid"] * 4,
                        "ratio": [1.0, 1.0, 1.0, 1.0, 1.10, 1.12, 1.09, 1.11]})
    chosen, rule = targets.choose_default(val, "hybrid", current="ga")
    assert chosen == "hybrid" and "becomes the default" in rule
    noisy = val.assign(ratio=[1.0, 1.0, 1.0, 1.0, 1.3, 0.8, 1.2, 0.9])
    chosen, rule = targets.choose_default(noisy, "hybrid", current="ga")
    assert chosen == "ga" and "the default stays" in rule


def test_ceiling_is_the_ideal_box_over_grid_globals_test_hypervolume(targets):
    frame = pd.DataFrame({"model": ["a", "a", "b"], "method": ["grid-global", "hybrid",
                                                               "grid-global"],
                          "seed": [0, 0, 0], "hv5_test": [0.04, 0.05, 0.05]})
    ceilings = targets.ceilings_on_test(frame)
    assert ceilings[("a", 0)] == pytest.approx(1.25)  # the whole 5-point box is 0.05
    assert ceilings[("b", 0)] == pytest.approx(1.0)
