"""Bit-packed masks give back exactly the mask they were made from, a block of rows at a time."""

from __future__ import annotations

import math

import pytest
import torch

from warp_core import bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (64, 17), (2, 3, 11), (0, 6)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_pack_then_unpack_is_the_identity(shape, density):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < density
    packed = bits.pack(mask)
    rows = math.prod(shape[:-1])
    assert packed.dtype == torch.uint8 and packed.numel() == rows * -(-shape[-1] // 8)
    assert torch.equal(bits.unpack(packed, shape[-1]), mask)


def test_a_block_of_rows_unpacks_on_its_own():
    mask = torch.rand(10, 13, generator=torch.Generator().manual_seed(1)) < 0.3
    packed = bits.pack(mask)
    assert torch.equal(bits.unpack(packed[3:7], 13), mask[3:7])


def test_each_row_is_packed_least_significant_bit_first():
    mask = torch.tensor(
        [[True, False, False, False], [False, False, False, True], [True, False, False, False]]
    )
    assert bits.pack(mask).tolist() == [[1], [8], [1]]
    assert bits.pack(mask.flatten()).tolist() == [1 + 128, 1]
