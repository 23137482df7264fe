"""Stored zeros and the cheapest index: the counts the size objective and the packed writer share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autosparse.compress.footprint import StoredZeros, cheapest_storage, storage_options
from autosparse.compress.storage import kept_part, stored_zeros
from autosparse.compress.bitpack import (
    _BitReader,
    _relative_mask,
    _uint_bits,
    relative_codes,
)


def test_fillers_by_hand():
    # nonzeros at 0, 2 and 12: gaps 1, 2, 10
    tensor = torch.zeros(16)
    tensor[[0, 2, 12]] = 1.0
    zeros = stored_zeros(tensor)
    assert zeros.nonzeros == 3
    # w=1 (step 1): 0 + 1 + 9 fillers; w=2 (step 3): 0 + 0 + 3; w=3 (step 7): 0 + 0 + 1; w>=4: 0
    assert zeros.fillers[:4] == (10, 3, 1, 0)
    assert stored_zeros(torch.zeros(5)) == StoredZeros(0, (0,) * 8)


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8])
def test_relative_codes_round_trip_and_match_the_count(width):
    generator = torch.Generator().manual_seed(width)
    tensor = (torch.rand(7, 45, generator=generator) > 0.93).float()
    codes = relative_codes(tensor.numpy() != 0, width)
    zeros = stored_zeros(tensor)
    assert len(codes) == zeros.nonzeros + zeros.fillers[width - 1]
    assert codes.max() < 2 ** width
    bits = np.packbits(_uint_bits(codes, width), bitorder="little").tobytes()
    mask = _relative_mask(_BitReader(bits, len(codes) * width, "t"), (7, 45), zeros.nonzeros,
                          width, len(codes) * width)
    assert torch.equal(mask, tensor != 0)


def test_cheapest_storage_by_hand():
    # 1000 values in 10 rows, 20 nonzero at 4 bits, evenly spread (gap 50)
    zeros = StoredZeros(20, tuple((50 - 1) // (2 ** w - 1) * 20 for w in range(1, 9)))
    options = storage_options(1000, 10, 4, zeros)
    assert options["dense"] == (0, 4000) and options["bitmask"] == (1000, 80)
    assert options["csr"] == (20 * 7 + 10 * 7, 80)  # ceil(log2 100) = 7, ceil(log2 101) = 7
    assert options["relative6"] == ((20 + 0) * 6, 80)  # gap 50 fits 6 bits (up to 63)
    assert options["relative5"] == ((20 + 20) * 5, 80)  # one filler per gap at 5 bits (31)
    assert cheapest_storage(1000, 10, 4, zeros) == ("relative6", 120, 80)
    full = StoredZeros(1000, (0,) * 8)
    assert cheapest_storage(1000, 10, 4, full)[0] == "dense"  # ties go to the first: dense


def test_kept_part_keeps_rows_and_columns_in_order():
    weight = torch.arange(24.0).reshape(4, 3, 2)
    part = kept_part(weight, torch.tensor([True, False, True, True]), torch.tensor([False, True, True]))
    assert part.shape == (3, 2, 2) and part[0, 0, 0] == 2.0 and part[2, 1, 1] == 23.0
