"""Bit-packed masks give back exactly the mask they were made from."""

from __future__ import annotations

import pytest
import torch

from warp_core import bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (64, 17), (2, 3, 11)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_pack_then_unpack_is_the_identity(shape, density):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < density
    packed = bits.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(bits.unpack(packed, mask.shape), mask)


def test_the_packing_is_row_major_and_least_significant_bit_first():
    mask = torch.tensor(
        [[True, False, False, False], [False, False, False, True], [True, False, False, False]]
    )
    assert bits.pack(mask).tolist() == [1 + 128, 1]
