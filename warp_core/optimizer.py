"""AdamW one slot block at a time, and the learning-rate schedule.

The update is torch's own (`torch.optim.adamw.adamw`, the kernel behind `torch.optim.AdamW`),
called per block of a slot's flat state, so that a step never needs every gradient alive at
once. The moments live beside each slot's `master`, in fp32 or, when asked, bf16: the update
is then computed in fp32 from upcast copies and the moments rounded back. The schedule is
transformers' (`get_scheduler`), read as a pure function of the step so that a resumed run
uses exactly the learning rates of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw
from transformers import get_scheduler

from warp_core.slots import Block, Slot
from warp_core.spec import Hyperparameters

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Moments:
    """A slot's AdamW state: flat moments in `master`'s order, and its update count."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor


class SlotAdamW:
    """AdamW over the slots' masters: `update` steps one block, `finish` counts the step."""

    def __init__(self, hp: Hyperparameters, total_steps: int) -> None:
        self.hp = hp
        self.dtype = STATE_DTYPES[hp.optimizer_state_dtype]
        self.moments: dict[str, Moments] = {}
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=hp.learning_rate)
        floor = {"min_lr_rate": hp.min_lr_rate} if hp.lr_scheduler == "cosine_with_min_lr" else None
        self._schedule = get_scheduler(
            hp.lr_scheduler,
            placeholder,
            num_warmup_steps=math.ceil(hp.warmup_ratio * total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=floor,
        )

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based), as `LambdaLR` computes it."""
        return self.hp.learning_rate * self._schedule.lr_lambdas[0](step)

    def state(self, slot: Slot) -> Moments:
        """The slot's moments, made (zeros) at its first update."""
        if slot.name not in self.moments:
            zeros = torch.zeros_like(slot.master, dtype=self.dtype)
            self.moments[slot.name] = Moments(
                zeros, zeros.clone(), torch.tensor(0.0, dtype=torch.float32)
            )
        return self.moments[slot.name]

    def update(self, slot: Slot, block: Block, grad: torch.Tensor, lr: float) -> None:
        """One AdamW update of the block's state with its (clipped) gradient."""
        moments = self.state(slot)
        master = slot.master[block.state]
        exp_avg, exp_avg_sq = moments.exp_avg[block.state], moments.exp_avg_sq[block.state]
        if self.dtype != torch.float32:
            exp_avg, exp_avg_sq = exp_avg.float(), exp_avg_sq.float()
        step = moments.step.clone()  # every block starts from the slot's count
        adamw(
            [master],
            [grad.to(master.device, non_blocking=True)],
            [exp_avg],
            [exp_avg_sq],
            [],
            [step],
            amsgrad=False,
            beta1=self.hp.adam_beta1,
            beta2=self.hp.adam_beta2,
            lr=lr,
            weight_decay=self.hp.weight_decay if slot.decays else 0.0,
            eps=1e-8,
            maximize=False,
        )
        if self.dtype != torch.float32:
            moments.exp_avg[block.state] = exp_avg
            moments.exp_avg_sq[block.state] = exp_avg_sq

    def finish(self, slot: Slot) -> None:
        """Count one update of `slot` (after all its blocks)."""
        self.state(slot).step += 1
