"""What Phase 3 trains, one weight at a time: a slot holds the trainable state of one weight
on this process (its rows, when FSDP2 shards the model) as a flat fp32 vector `master`, turns
the weight's gradient into the gradient of that state, and writes the state back.

- `RotatedSlot`, a WaRP target: the state is the rotated delta `dC` of `W = W0 + dC U^T`
  (WARP.md), kept only at the unfrozen coefficients. A frozen coefficient has no state at
  all, so no optimizer can move it, and the state costs `(1 - keep_ratio)` of a dense one.
- `PlainSlot`, a weight trained directly (plain fine-tuning, non-target parameters): the state
  is the weight itself, through an fp32 copy when its dtype is lower.

Both work a block of rows at a time (`BLOCK_ELEMENTS` coefficients at most), so the fp32
temporaries of an optimizer step never exceed one block, whatever the weight's size (a 7B
model's lm_head has 131M coefficients). A block's state is a contiguous range of `master`:
the unfrozen coefficients of its rows, in row-major order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from warp_core import bits

BLOCK_ELEMENTS = 1 << 24
"""The most coefficients a slot rotates, masks or writes back at once (64 MiB in fp32)."""


@dataclass(frozen=True)
class Block:
    """A range of a slot's local rows, and the range of its state those rows hold."""

    rows: slice
    state: slice


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 DTensor, else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def row_blocks(free_per_row: torch.Tensor, columns: int) -> list[Block]:
    """Blocks of at most `BLOCK_ELEMENTS` coefficients over rows holding `free_per_row`
    trainable coefficients each. A process holding no row of the weight still gets one empty
    block: it then gathers the weight's basis when the others do, and no collective waits."""
    rows = free_per_row.numel()
    if rows == 0:
        return [Block(slice(0, 0), slice(0, 0))]
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    ends = torch.cat([free_per_row.new_zeros(1), free_per_row.cumsum(0)]).tolist()
    starts = range(0, rows, step)
    stops = [min(start + step, rows) for start in starts]
    return [
        Block(slice(start, stop), slice(ends[start], ends[stop]))
        for start, stop in zip(starts, stops, strict=True)
    ]


class Slot(Protocol):
    """One trained weight's state on this process, and the way to and from the weight."""

    name: str
    param: nn.Parameter
    """The model's parameter (an FSDP2 DTensor when the model is sharded)."""
    master: torch.Tensor
    """The trained state, flat fp32 (what AdamW updates)."""
    decays: bool
    """Whether weight decay applies (matrices do, vectors such as norms do not)."""
    columns: int
    """Coefficients per row (1 for a vector)."""
    blocks: list[Block]

    def gradient(self, block: Block) -> torch.Tensor:
        """The gradient of the block's state, fp32, flat in `master`'s order (rotated and
        masked for a WaRP target: frozen coefficients have no entry)."""

    def compress(self, block: Block, values: torch.Tensor) -> torch.Tensor:
        """A rows x columns block of values at the block's state entries, flat."""

    def dense(self, block: Block, flat: torch.Tensor) -> torch.Tensor:
        """A flat block of state (or of its moments) as rows x columns, zero elsewhere:
        the inverse of `compress`."""

    def write_back(self, block: Block) -> None:
        """Make the block's rows of the model weight reflect `master`."""

    def release_grad(self) -> None:
        """Drop the weight's gradient once the slot has stepped."""


class RotatedSlot:
    """A WaRP target trained through its rotated delta: `W = W0 + dC U^T`.

    `basis` returns `U` (gathered on demand when the bases are sharded). `frozen` is this
    process's rows of the mask (True = frozen), held bit-packed and expanded a block at a time.
    `grad_is_rotated` says the weight's gradient already is `G_W U` (formed from the
    activations, `warp_core.rotation`); otherwise the block is rotated here.
    """

    decays = True

    def __init__(
        self,
        name: str,
        weight: nn.Parameter,
        basis: Callable[[], torch.Tensor],
        frozen: torch.Tensor | None,
        state_device: torch.device,
        base_device: torch.device,
    ) -> None:
        rows = local(weight.detach())
        self.name = name
        self.param = weight
        self.basis = basis
        self.columns = rows.shape[1]
        self.base = _copy_to(rows, base_device)
        self.frozen_bits = None if frozen is None else bits.pack(frozen)
        free = torch.full((rows.shape[0],), self.columns, dtype=torch.long)
        if frozen is not None:
            free -= frozen.sum(dim=1).cpu()
        self.blocks = row_blocks(free, self.columns)
        self.master = torch.zeros(int(free.sum()), dtype=torch.float32, device=state_device)
        self.grad_is_rotated = False

    def _frozen(self, block: Block) -> torch.Tensor:
        return bits.unpack(self.frozen_bits[block.rows], self.columns)

    def gradient(self, block: Block) -> torch.Tensor:
        grad = local(self.param.grad)[block.rows].float()
        return self.compress(block, grad if self.grad_is_rotated else grad @ self.basis())

    def compress(self, block: Block, values: torch.Tensor) -> torch.Tensor:
        if self.frozen_bits is None:
            return values.reshape(-1)
        return values[~self._frozen(block)]

    def dense(self, block: Block, flat: torch.Tensor) -> torch.Tensor:
        rows = block.rows.stop - block.rows.start
        device = self.base.device if self.frozen_bits is None else self.frozen_bits.device
        flat = flat.to(device)
        if self.frozen_bits is None:
            return flat.view(rows, self.columns)
        full = torch.zeros(rows, self.columns, dtype=flat.dtype, device=device)
        return full.masked_scatter_(~self._frozen(block), flat)

    @torch.no_grad()
    def write_back(self, block: Block) -> None:
        weight = local(self.param)
        delta = self.dense(block, self.master[block.state]).to(weight.device)
        base = self.base[block.rows].to(weight.device, non_blocking=True).float()
        weight[block.rows].copy_(torch.addmm(base, delta, self.basis().T))

    def release_grad(self) -> None:
        self.param.grad = None


class PlainSlot:
    """A parameter trained directly, through an fp32 master copy when its dtype is lower or
    its state lives on another device (`offload: optimizer_state`)."""

    def __init__(self, name: str, param: nn.Parameter, state_device: torch.device) -> None:
        values = local(param.detach())
        self.name = name
        self.param = param
        self.decays = param.dim() >= 2
        self.rows = values.shape[0] if values.dim() else 1
        self.columns = values.numel() // max(self.rows, 1)
        self.shared = values.dtype == torch.float32 and values.device == state_device
        master = values if self.shared else _copy_to(values, state_device, torch.float32)
        self.master = master.view(-1)
        self.blocks = row_blocks(torch.full((self.rows,), self.columns), self.columns)

    def gradient(self, block: Block) -> torch.Tensor:
        grad = local(self.param.grad).view(self.rows, self.columns)[block.rows].float()
        return self.compress(block, grad)

    def compress(self, block: Block, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1)

    def dense(self, block: Block, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(-1, self.columns)

    @torch.no_grad()
    def write_back(self, block: Block) -> None:
        if not self.shared:
            values = local(self.param).view(self.rows, self.columns)
            values[block.rows].copy_(self.dense(block, self.master[block.state]))

    def release_grad(self) -> None:
        self.param.grad = None


def _copy_to(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A copy of `tensor` on `device` (in `dtype`), made in one allocation; pinned in host
    memory when it comes from a GPU, so it can travel back without blocking."""
    pinned = device.type == "cpu" and tensor.device.type == "cuda"
    copy = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=device, pin_memory=pinned)
    return copy.copy_(tensor)
