"""The pure parts of benchmarks/search_quality_noise.py: a front's test hypervolume from its
per-image answers, the shared resampling, and the chance that every ratio reaches the target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.helpers import benchmark_module


@pytest.fixture(scope="module")
def noise():
    return benchmark_module("search_quality_noise.py")


def run(dense_right: int, points: list[tuple[int, float]], images: int = 100) -> dict:
    """A rebuilt run: the dense model right on the first ``dense_right`` images; each front
    point (right on its first k images, size_kb) of a 100 kB dense model."""
    answers = np.zeros((len(points), images), np.int8)
    for row, (right, _) in enumerate(points):
        answers[row, :right] = 1
    dense_answers = np.zeros(images, np.int8)
    dense_answers[:dense_right] = 1
    return {"objectives": ["accuracy", "size"], "dense": {"accuracy": 99.0, "size_kb": 100.0},
            "dense_answers": dense_answers,
            "front": pd.DataFrame({"size_kb": [size for _, size in points]}),
            "answers": answers}


def test_hypervolume_from_answers_is_the_area_above_dense_minus_five(noise):
    # dense 96 %, reference 91 %; one point at 95 % and 10 % of the size: 0.04 x 0.9
    assert noise.hv_of(run(96, [(95, 10.0)])) == pytest.approx(0.04 * 0.9)
    # two points: (97 %, 50 kB) adds the strip above 95 % at half the size axis
    assert noise.hv_of(run(96, [(95, 10.0), (97, 50.0)])) == pytest.approx(
        0.04 * 0.9 + 0.02 * 0.5)
    # resampling only the images the point got wrong: 0 %, below the reference
    assert noise.hv_of(run(96, [(95, 10.0)]), np.arange(95, 100)) == 0.0
    # an ideal point (dense accuracy, no size) is the ceiling
    assert noise.hv_of(run(96, [(96, 0.0)])) == pytest.approx(noise.CEILING_HV)


def test_a_method_against_itself_resamples_to_one(noise):
    same = run(96, [(95, 10.0), (97, 50.0)])
    ratios = noise.resampled_ratios({noise.REFERENCE: same, "ga": same}, 50,
                                    np.random.default_rng(0))
    assert np.allclose(ratios["ga"], 1.0)
    better = run(96, [(97, 10.0)])
    ratios = noise.resampled_ratios({noise.REFERENCE: same, "ga": better}, 200,
                                    np.random.default_rng(0))["ga"]
    assert ratios.std() > 0 and np.median(ratios) > 1.0


def test_chance_that_every_ratio_reaches_the_target(noise):
    sds = np.full(12, 0.08)
    assert noise.p_all(sds, 1.0 + noise.TARGET_EVERY) == pytest.approx(0.5 ** 12)
    chances = [noise.p_all(sds, g) for g in (1.05, 1.10, 1.20, 1.30)]
    assert chances == sorted(chances) and chances[-1] > 0.8
