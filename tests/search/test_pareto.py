"""Pareto masks and hypervolume against hand-computed cases, and the 2-D sweep against moocore."""

import moocore
import numpy as np
import pytest

from autosparse.search.pareto import hypervolume, hypervolume_history, pareto_mask

MIN2 = ["minimize", "minimize"]


def test_mask_minimise_both():
    values = np.array([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2]])
    assert pareto_mask(values, MIN2).tolist() == [True, True, True, False, True]


def test_mask_mixed_directions():
    # accuracy up, size down: (0.9, 10) dominates (0.8, 12); (0.95, 20) trades off
    values = np.array([[0.9, 10], [0.8, 12], [0.95, 20], [0.95, 25]])
    mask = pareto_mask(values, ["maximize", "minimize"])
    assert mask.tolist() == [True, False, True, False]


def test_mask_infeasible_and_nan_never_on_front():
    values = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5], [np.nan, 0.0]])
    feasible = np.array([False, True, True, True])
    # the infeasible (0, 0) would dominate everything; it must not hide the others
    assert pareto_mask(values, MIN2, feasible).tolist() == [False, True, True, False]
    assert not pareto_mask(values, MIN2, np.zeros(4, bool)).any()


def test_mask_empty_and_bad_direction():
    assert pareto_mask(np.empty((0, 2)), MIN2).shape == (0,)
    with pytest.raises(ValueError, match="direction"):
        pareto_mask(np.ones((2, 2)), ["minimize", "up"])


def test_hv_2d_hand_computed():
    values = np.array([[1, 3], [2, 2], [3, 1]])
    assert hypervolume(values, MIN2, [4, 4]) == pytest.approx(6.0)
    # a dominated point and a point outside the reference add nothing
    more = np.vstack([values, [[3, 3], [0, 5], [4, 0]]])
    assert hypervolume(more, MIN2, [4, 4]) == pytest.approx(6.0)


def test_hv_2d_maximise_minimise_mix():
    # accuracy (max) vs size (min), reference (0.5, 10): (0.9, 4) covers 0.4 x 6, and
    # (1.0, 8) adds the strip of accuracy 0.9..1.0 by size 8..10
    values = np.array([[0.9, 4.0], [1.0, 8.0]])
    assert hypervolume(values, ["maximize", "minimize"], [0.5, 10.0]) == pytest.approx(
        0.4 * 6 + 0.1 * 2
    )


def test_hv_3d_hand_computed():
    values = np.array([[1, 1, 1]])
    assert hypervolume(values, ["minimize"] * 3, [2, 3, 4]) == pytest.approx(1 * 2 * 3)
    # boxes [0,2]x[1,2]x[0,1] and [1,2]x[0,2]x[0,1] (volume 2 each) share [1,2]x[1,2]x[0,1]
    values = np.array([[0, 1, 0], [1, 0, 0]])
    assert hypervolume(values, ["minimize"] * 3, [2, 2, 1]) == pytest.approx(2 + 2 - 1)
    # maximise everything: mirror image
    assert hypervolume(-values, ["maximize"] * 3, [-2, -2, -1]) == pytest.approx(3.0)


def test_hv_edge_cases():
    assert hypervolume(np.empty((0, 2)), MIN2, [1, 1]) == 0.0
    assert hypervolume(np.array([[1, 1]]), MIN2, [1, 2]) == 0.0  # not strictly dominating
    assert hypervolume(np.array([[np.nan, 0.0], [0.0, 0.0]]), MIN2, [1, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_hv_2d_sweep_matches_moocore(seed):
    rng = np.random.default_rng(seed)
    values = rng.random((200, 2))
    ref = np.array([0.9, 0.95])
    inside = values[(values < ref).all(axis=1)]
    assert hypervolume(values, MIN2, ref) == pytest.approx(moocore.hypervolume(inside, ref=ref))
    directions = ["maximize", "minimize"]
    assert hypervolume(values, directions, [0.1, 0.95]) == pytest.approx(
        moocore.hypervolume(values[(values[:, 0] > 0.1) & (values[:, 1] < 0.95)],
                            ref=[0.1, 0.95], maximise=[True, False])
    )


@pytest.mark.parametrize("k", [2, 3, 4])
def test_history_monotone_and_matches_prefix(k):
    rng = np.random.default_rng(k)
    values = rng.random((60, k))
    values[7] = np.nan
    feasible = rng.random(60) > 0.2
    directions = ["maximize"] + ["minimize"] * (k - 1)
    ref = np.array([0.0] + [1.0] * (k - 1))
    history = hypervolume_history(values, directions, ref, feasible)
    assert len(history) == 60
    assert all(b >= a for a, b in zip(history, history[1:]))
    for i in (1, 10, 33, 60):
        ok = feasible[:i] & ~np.isnan(values[:i]).any(axis=1)
        assert history[i - 1] == pytest.approx(hypervolume(values[:i][ok], directions, ref))


def test_history_infeasible_adds_nothing():
    values = np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 0.5]])
    history = hypervolume_history(values, MIN2, [3, 3], feasible=[True, False, True])
    assert history == pytest.approx([4.0, 4.0, 4.0 + 0.5])


def test_history_is_fast_for_thousands():
    import time

    rng = np.random.default_rng(0)
    values = rng.random((3000, 2))
    start = time.perf_counter()
    history = hypervolume_history(values, ["maximize", "minimize"], [0.0, 1.0])
    assert time.perf_counter() - start < 5.0
    assert history[-1] == pytest.approx(hypervolume(values, ["maximize", "minimize"], [0.0, 1.0]))
