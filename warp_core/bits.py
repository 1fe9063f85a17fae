"""Boolean masks packed eight to a byte along their last dimension: a WaRP mask costs 1 bit
per coefficient held through Phase 3 instead of the 1 byte of a `torch.bool` tensor, and any
block of rows can be expanded on its own (`unpack(packed[rows], columns)`) when the gradient
of that block is masked."""

from __future__ import annotations

from functools import cache

import torch

_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=device)


@cache
def _bits_of_byte(device: torch.device) -> torch.Tensor:
    """Row b: the 8 bits of byte value b, least significant first (a lookup table: one
    gather per byte unpacks twice as fast as masking each bit on a CPU)."""
    return (
        torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)
    ) & 1 == 1


def pack(mask: torch.Tensor) -> torch.Tensor:
    """`mask` (bool, n columns) as uint8 of shape `(*mask.shape[:-1], ceil(n / 8))`: each
    row least significant bit first, its last byte padded with False."""
    columns = mask.shape[-1]
    flat = mask.reshape(-1, columns).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -columns % 8))
    packed = (flat.view(flat.shape[0], flat.shape[1] // 8, 8) * _bit_values(mask.device)).sum(
        dim=2, dtype=torch.uint8
    )
    return packed.view(*mask.shape[:-1], packed.shape[1])


def unpack(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The bool tensor with `columns` columns that `pack` made `packed` from."""
    bits = _bits_of_byte(packed.device)[packed.long()]
    return bits.flatten(-2)[..., :columns]
