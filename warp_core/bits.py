"""Boolean masks packed eight to a byte: a WaRP mask costs 1 bit per coefficient held
through Phase 3 instead of the 1 byte of a `torch.bool` tensor, and is expanded for one
target at a time when its gradient is masked."""

from __future__ import annotations

import math

import torch

_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=device)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """`mask` (bool, any shape) as uint8 bytes, row-major, the last byte padded with False."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _bit_values(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor of `shape` that `pack` made `packed` from."""
    bits = packed.unsqueeze(1).bitwise_and(_bit_values(packed.device)).ne(0)
    return bits.flatten()[: math.prod(shape)].view(shape)
