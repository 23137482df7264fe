"""Shared fixtures: small, hand-checkable layer tables."""

import pytest
import torch

from autosparse.space.layers import LayerInfo, LayerTable


@pytest.fixture
def small_table() -> LayerTable:
    """conv1 (9-long rows: no 2:4), conv2 and fc (2:4 possible)."""
    return LayerTable(
        layers=(
            LayerInfo("conv1", "Conv2d", (16, 1, 3, 3), True, macs=16 * 9 * 64),
            LayerInfo("conv2", "Conv2d", (32, 16, 3, 3), True, macs=32 * 144 * 64),
            LayerInfo("fc", "Linear", (10, 64), True, macs=640),
        ),
        other_params=0,
        input_shape=(1, 8, 8),
        global_magnitude={0.5: {"conv1": 0.2, "conv2": 0.55, "fc": 0.4},
                          0.9: {"conv1": 0.6, "conv2": 0.93, "fc": 0.85}},
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box they thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
