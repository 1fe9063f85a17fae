"""Phase 3: fine-tuning on the utility data, masked in rotated coordinates (or plain).

WaRP's trainable state per target is a delta `dC` (fp32, zeros) with `W = W0 + dC U^T`.
Forward and backward use the plain weight `W` in the model's dtype, so gradients `G_W`
accumulate over micro-batches as in ordinary training. Once per optimizer step each target
computes `G_C = (G_W U) * (1 - M)`, AdamW steps `dC` in rotated coordinates (frozen entries
keep zero moments and never move), and `W = W0 + dC U^T` is written back. The plain
baseline (`method="full"`) runs this same loop with the weights themselves as state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import get_scheduler

from warp_core import bits
from warp_core.data import Encoded, collate, epoch_order
from warp_core.files import replacing
from warp_core.loss import response_loss_sum, response_tokens
from warp_core.spec import Hyperparameters


class Slot(Protocol):
    """One trainable tensor: `master` is what AdamW updates (fp32)."""

    name: str
    master: torch.Tensor

    def load_grad(self) -> None:
        """Set `master.grad` from the model parameter's accumulated gradient."""

    def write_back(self) -> None:
        """Make the model parameter reflect `master`."""


class RotatedSlot:
    """A target weight trained through its rotated delta: `W = W0 + dC U^T`.

    Its mask (True = frozen) is kept bit-packed and expanded only while its gradient is
    masked, so the masks of all targets cost 1 bit per coefficient, not 1 byte.
    """

    def __init__(
        self, name: str, weight: nn.Parameter, basis: torch.Tensor, frozen: torch.Tensor | None
    ) -> None:
        self.name = name
        self.weight = weight
        self.basis = basis
        self.frozen_bits = None if frozen is None else bits.pack(frozen)
        self.base = weight.detach().clone()
        self.master = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def load_grad(self) -> None:
        grad = self.weight.grad.float() @ self.basis
        if self.frozen_bits is not None:
            grad.masked_fill_(bits.unpack(self.frozen_bits, grad.shape), 0.0)
        self.master.grad = grad
        self.weight.grad = None  # one gradient per target alive at a time, not two

    @torch.no_grad()
    def write_back(self) -> None:
        self.weight.copy_(torch.addmm(self.base.float(), self.master, self.basis.T))


class PlainSlot:
    """A parameter trained directly, through an fp32 master copy when its dtype is lower."""

    def __init__(self, name: str, param: nn.Parameter) -> None:
        self.name = name
        self.param = param
        self.master = param if param.dtype == torch.float32 else param.detach().float()

    def load_grad(self) -> None:
        if self.master is not self.param:
            self.master.grad = self.param.grad.float()
            self.param.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        if self.master is not self.param:
            self.param.copy_(self.master)


@dataclass(frozen=True)
class StepReport:
    """What one optimizer step did; the pipeline turns it into a progress event."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int
    seconds: float


class StepSchedule(Protocol):
    """Which examples form each micro-batch of each optimizer step, as a pure function of
    the step number, so a resumed run sees exactly the batches it would have seen."""

    total_steps: int

    def micro_batches(self, step: int) -> list[list[int]]:
        """Indices into the example list, one list per micro-batch of `step`."""


class Schedule:
    """A job's `StepSchedule`: epochs of seeded shuffles, `batch_size` examples per
    micro-batch, `grad_accum_steps` micro-batches per step."""

    def __init__(self, n_examples: int, hp: Hyperparameters) -> None:
        self.n = n_examples
        self.hp = hp
        self.per_step = hp.batch_size * hp.grad_accum_steps
        self.steps_per_epoch = math.ceil(n_examples / self.per_step)
        self.total_steps = hp.max_steps or self.steps_per_epoch * hp.epochs

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n, self.hp.seed, epoch)
        chunk = order[index * self.per_step : (index + 1) * self.per_step]
        size = self.hp.batch_size
        return [chunk[i : i + size] for i in range(0, len(chunk), size)]


def build_optimizer(
    slots: Sequence[Slot], hp: Hyperparameters, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the fp32 masters (weight decay on matrices only) and the lr schedule."""
    matrices = [s.master for s in slots if s.master.dim() >= 2]
    vectors = [s.master for s in slots if s.master.dim() < 2]
    groups = [{"params": matrices, "weight_decay": hp.weight_decay}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2))
    scheduler = get_scheduler(
        hp.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(hp.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


class Checkpoint:
    """The resumable training state: step, masters, optimizer and scheduler.

    Written through `files.replacing`, so a crash mid-save leaves the previous checkpoint
    intact.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, step: int, slots: Sequence[Slot], optimizer, scheduler) -> None:
        state = {
            "step": step,
            "names": [s.name for s in slots],
            "masters": [s.master.detach().cpu() for s in slots],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        with replacing(self.path) as partial:
            torch.save(state, partial)

    def restore(self, slots: Sequence[Slot], optimizer, scheduler) -> int:
        """Load the saved state into `slots` and the optimizer; return the next step."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["names"] != [s.name for s in slots]:
            raise ValueError(f"{self.path} was written for other trainable parameters")
        with torch.no_grad():
            for slot, saved in zip(slots, state["masters"], strict=True):
                slot.master.copy_(saved)
                slot.write_back()
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state["step"]


def train(
    model: nn.Module,
    slots: Sequence[Slot],
    examples: Sequence[Encoded],
    hp: Hyperparameters,
    pad_id: int,
    checkpoint: Checkpoint | None,
    on_step: Callable[[StepReport], None] | None = None,
    check_stop: Callable[[], None] | None = None,
    schedule: StepSchedule | None = None,
) -> int:
    """Run (or resume) the optimizer steps; returns the number of steps done.

    The loss of a step is the sum over its micro-batches of response-token losses divided
    by the step's response-token count, so the result does not depend on how a step is
    split into micro-batches. `schedule` defaults to the job's `Schedule` over `examples`.
    Without a `checkpoint` nothing is saved or resumed. `check_stop` is called before every
    micro-batch and may raise to cancel; the last checkpoint stays for a later resume.
    """
    schedule = schedule or Schedule(len(examples), hp)
    optimizer, scheduler = build_optimizer(slots, hp, schedule.total_steps)
    first_step = checkpoint.restore(slots, optimizer, scheduler) if checkpoint else 0
    model.train()
    params = [s.master for s in slots]
    for step in range(first_step, schedule.total_steps):
        started = time.perf_counter()
        micro = [
            collate([examples[i] for i in ids], pad_id) for ids in schedule.micro_batches(step)
        ]
        loss, tokens = accumulate_gradients(model, micro, check_stop)
        for slot in slots:
            slot.load_grad()
        norm = _clip(params, hp.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        for slot in slots:
            slot.write_back()
        done = step + 1
        if checkpoint and (done % hp.checkpoint_every == 0 or done == schedule.total_steps):
            checkpoint.save(done, slots, optimizer, scheduler)
        if on_step:
            seconds = time.perf_counter() - started
            on_step(
                StepReport(done, schedule.total_steps, loss, learning_rate, norm, tokens, seconds)
            )
    model.eval()
    return schedule.total_steps


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    check_stop: Callable[[], None] | None,
) -> tuple[float, int]:
    """Backward over a step's micro-batches; returns its mean loss and its token count."""
    device = next(model.parameters()).device
    label_tokens = sum(response_tokens(mb) for mb in micro_batches)
    total = 0.0
    for batch in micro_batches:
        if check_stop:
            check_stop()
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = response_loss_sum(model, batch) / max(label_tokens, 1)
        loss.backward()
        total += loss.item()
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return total, tokens


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global gradient norm of the trainable state (clipped to `max_norm` when set)."""
    grads = [p for p in params if p.grad is not None]
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
