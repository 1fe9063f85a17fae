"""The resumable training state, sharded, through torch.distributed.checkpoint (DCP).

    checkpoints/finetune/latest.json          {"step": N, "dir": "step-0000000N"}
    checkpoints/finetune/step-0000000N/       one complete checkpoint:
        meta.json                             {"step", "names", "world_size"}
        slot-00000/ ...                       one DCP checkpoint per slot, in slot order

Each slot is saved as dense tensors of its weight's global shape (`master`, `exp_avg`,
`exp_avg_sq`, zero at frozen coefficients, and its update count `step`), each process
writing its rows. Dense global tensors make the checkpoint independent of how the job was
split: it resumes with another number of processes (DCP reads each process's new rows) and
its state compresses again against the masks on load. One DCP save per slot keeps one
weight's dense copy alive at a time.

`latest.json` is written last (write-then-rename) and older steps are removed after it, so it
always names a complete checkpoint: a process killed at any moment of a save leaves the
previous one in use.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard

from warp_core.distributed import World
from warp_core.export import read_json, write_json
from warp_core.optimizer import SlotAdamW
from warp_core.slots import Slot, local


class Checkpoint:
    def __init__(self, directory: Path, world: World) -> None:
        self.directory = directory
        self.world = world

    @property
    def exists(self) -> bool:
        return (self.directory / "latest.json").exists()

    @property
    def step(self) -> int:
        """The step the latest checkpoint holds, where a resumed run starts (0: none)."""
        return read_json(self.directory / "latest.json")["step"] if self.exists else 0

    def save(self, step: int, slots: Sequence[Slot], optimizer: SlotAdamW) -> None:
        """Write the state after `step` optimizer steps (every rank calls this)."""
        target = self.directory / f"step-{step:08d}"
        if self.world.main and target.exists():
            shutil.rmtree(target)  # a save of this step that a crash interrupted
        self.world.barrier()
        for index, slot in enumerate(slots):
            state = self._dense(slot, optimizer)
            with self._quiet():
                dcp.save(state, checkpoint_id=target / f"slot-{index:05d}", no_dist=self._alone)
        self.world.barrier()
        if self.world.main:
            meta = {"step": step, "names": [s.name for s in slots], "world_size": self.world.size}
            write_json(target / "meta.json", meta)
            write_json(self.directory / "latest.json", {"step": step, "dir": target.name})
            for old in self.directory.glob("step-*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()

    def restore(self, slots: Sequence[Slot], optimizer: SlotAdamW) -> int:
        """Load the latest state into `slots` and `optimizer`; return the next step (0 when
        there is no checkpoint)."""
        if not self.exists:
            return 0
        source = self.directory / read_json(self.directory / "latest.json")["dir"]
        meta = read_json(source / "meta.json")
        if meta["names"] != [s.name for s in slots]:
            raise ValueError(f"{source} was written for other trainable parameters")
        for index, slot in enumerate(slots):
            state = self._dense(slot, optimizer, empty=True)
            with self._quiet():
                dcp.load(state, checkpoint_id=source / f"slot-{index:05d}", no_dist=self._alone)
            self._compress(slot, optimizer, state)
        return meta["step"]

    @property
    def _alone(self) -> bool:
        return self.world.size == 1

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """DCP warns at every call that it runs in a single process: here it is meant to."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield

    def _dense(self, slot: Slot, optimizer: SlotAdamW, empty: bool = False) -> dict:
        """The slot's state as dense tensors of its weight's shape (this rank's rows)."""
        moments = optimizer.state(slot)
        flats = {
            "master": slot.master,
            "exp_avg": moments.exp_avg,
            "exp_avg_sq": moments.exp_avg_sq,
        }
        device = local(slot.param).device
        rows = sum(b.rows.stop - b.rows.start for b in slot.blocks)
        state: dict = {"step": moments.step.clone()}
        for key, flat in flats.items():
            values = torch.zeros(rows, slot.columns, dtype=flat.dtype, device=device)
            if not empty:
                for block in slot.blocks:
                    values[block.rows] = slot.dense(block, flat[block.state])
            state[key] = self._global(slot, values)
        return state

    def _global(self, slot: Slot, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows as the whole tensor DCP saves: a DTensor on a sharded model."""
        if not isinstance(slot.param, DTensor):
            return rows
        shape = (slot.param.shape[0], rows.shape[1])
        return DTensor.from_local(
            rows,
            slot.param.device_mesh,
            [Shard(0)],
            run_check=False,
            shape=shape,
            stride=(shape[1], 1),
        )

    def _compress(self, slot: Slot, optimizer: SlotAdamW, state: dict) -> None:
        moments = optimizer.state(slot)
        moments.step.copy_(state["step"])
        targets = {
            "master": slot.master,
            "exp_avg": moments.exp_avg,
            "exp_avg_sq": moments.exp_avg_sq,
        }
        with torch.no_grad():
            for key, flat in targets.items():
                values = local(state[key])
                for block in slot.blocks:
                    part = slot.compress(block, values[block.rows].to(flat.device))
                    flat[block.state] = part
            for block in slot.blocks:
                slot.write_back(block)
