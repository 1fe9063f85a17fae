"""One job in several processes: the ranks torchrun starts, the model sharded by FSDP2, and
the few collectives WaRP adds to it.

`World.join()` reads torchrun's environment and joins its process group (NCCL on GPUs, gloo
on the CPU); alone, it is a world of one in which every collective is the identity, so the
phases have one code path. FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder
layer and the rest of the model by rows (`Shard(0)`, `torch.chunk`'s layout: `rows()`), and
sums gradients across ranks instead of averaging them, because each rank's loss is already
divided by the token count of the whole step. WaRP's own per-weight state (`W0`, `dC`, masks,
moments) lives on the rank that holds those rows; the bases, which a rotation needs whole,
are held as row shards too and gathered one at a time when used (`full`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from warp_core.model import resolve_device

T = TypeVar("T")

Dealt = tuple[dict[str, torch.Tensor], bool]
"""A batch and whether it counts (`World.deal`)."""

TIMEOUT = timedelta(hours=2)
"""How long a rank waits at a collective: rank 0 alone writes the model and computes masks,
which takes minutes on a 7B model while the others wait."""


@dataclass
class World:
    """This process's place in the job: its rank, how many there are, its device."""

    rank: int
    size: int
    device: torch.device
    mesh: object | None = None
    _gathered: tuple[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def alone(cls, device: torch.device) -> World:
        return cls(0, 1, device)

    @classmethod
    def join(cls, device: str | None = None) -> World:
        """The world torchrun set up (`WORLD_SIZE` > 1), else a world of one."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls.alone(resolve_device(device))
        from torch.distributed.device_mesh import init_device_mesh

        local_rank = int(os.environ["LOCAL_RANK"])
        chosen = resolve_device(device)
        if chosen.type == "cuda":
            chosen = torch.device("cuda", local_rank)
            torch.cuda.set_device(chosen)
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        mesh = init_device_mesh(chosen.type, (size,))
        return cls(dist.get_rank(), size, chosen, mesh)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes artifacts and reports events."""
        return self.rank == 0

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives (the identity in a world of one) -------------------------------------

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some rank (every rank must ask)."""
        if self.size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def most(self, value: int | None) -> int | None:
        """The largest of the ranks' values (None where no rank has one)."""
        if self.size == 1:
            return value
        found = torch.tensor([-1 if value is None else value], device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        peak = int(found.item())
        return None if peak < 0 else peak

    def reduce_(self, tensor: torch.Tensor, dst: int = 0) -> torch.Tensor:
        """Sum `tensor` over ranks into rank `dst`'s copy (the others' are left undefined)."""
        if self.size > 1:
            dist.reduce(tensor, dst)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(tensor, src)
        return tensor

    def gradient_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """The 2-norm over ranks of vectors whose local parts have norm `local_norm`."""
        if self.size == 1:
            return local_norm
        squared = self.sum_((local_norm.double() ** 2).to(self.device))
        return squared.sqrt().to(local_norm)

    def to_main(
        self, tensor: torch.Tensor | None, owner: int, shape: tuple[int, ...]
    ) -> torch.Tensor | None:
        """Rank 0's copy of the fp32 `tensor` of `shape` that rank `owner` holds (sent to it
        when another rank holds it); None on every other rank."""
        if owner == 0 or self.size == 1:
            return tensor if self.main else None
        if self.rank == owner:
            dist.send(tensor.contiguous(), 0)
        elif self.main:
            received = torch.empty(shape, dtype=torch.float32, device=self.device)
            dist.recv(received, owner)
            return received
        return None

    def deal(self, items: Sequence[T]) -> list[tuple[T, bool]]:
        """This rank's share of `items` (every `size`-th), each marked as counting, padded
        with copies of the first marked as not counting: every rank gets as many, so all run
        as many passes, and as many collectives, whatever their share."""
        mine = [(item, True) for item in items[self.rank :: self.size]]
        rounds = math.ceil(len(items) / self.size)
        return mine + [(items[0], False)] * (rounds - len(mine))

    # -- rows ------------------------------------------------------------------------------

    def rows(self, n: int) -> slice:
        """This rank's rows of an `n`-row tensor sharded as FSDP2 shards it (`torch.chunk`:
        ceil(n / size) rows each, the last ranks fewer or none)."""
        chunk = math.ceil(n / self.size)
        start = min(self.rank * chunk, n)
        return slice(start, min(start + chunk, n))

    def full(self, key: str, rows: torch.Tensor, n: int) -> torch.Tensor:
        """The whole of a tensor of `n` rows of which each rank holds `rows()`. The last one
        gathered is kept, so targets that share a basis gather it once."""
        if self.size == 1:
            return rows
        if self._gathered is not None and self._gathered[0] == key:
            return self._gathered[1]
        self._gathered = None  # free the previous one before gathering the next
        chunk = math.ceil(n / self.size)
        padded = rows.new_zeros(chunk, *rows.shape[1:])
        padded[: rows.shape[0]] = rows
        gathered = rows.new_empty(chunk * self.size, *rows.shape[1:])
        dist.all_gather_into_tensor(gathered, padded)
        self._gathered = (key, gathered[:n])
        return self._gathered[1]

    def forget_gathered(self) -> None:
        self._gathered = None

    # -- the model -------------------------------------------------------------------------

    def shard(self, model: nn.Module) -> None:
        """FSDP2 over every decoder layer (the classes transformers marks as not to be
        split), the output head, the decoder and the model; gradients are summed over ranks.

        The head and the decoder are units of their own because the training loss calls
        them one after the other (`loss.response_loss_sum`), not through the model's
        forward; the head must therefore not be tied to the input embeddings. FSDP2 takes
        the first unit to run a forward as the root of the model: one token through the whole
        model makes it the model itself, whichever phase a resumed job starts in.
        """
        if self.size == 1:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        layers = set(getattr(model, "_no_split_modules", None) or ())
        for module in list(model.modules()):
            if type(module).__name__ in layers:
                fully_shard(module, mesh=self.mesh)
        fully_shard(model.get_output_embeddings(), mesh=self.mesh)
        fully_shard(model.get_decoder(), mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain sum, gloo has no other
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device))
