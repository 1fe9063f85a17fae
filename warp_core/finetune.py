"""Phase 3: fine-tuning on the utility data, masked in rotated coordinates (or plain).

WaRP's trainable state per target is a delta `dC` (fp32, zeros) with `W = W0 + dC U^T`.
Forward and backward use the plain weight `W` in the model's dtype, so gradients `G_W`
accumulate over micro-batches as in ordinary training. Once per optimizer step each target
computes `G_C = (G_W U) * (1 - M)`, AdamW steps `dC` in rotated coordinates (frozen entries
have no state and never move), and `W = W0 + dC U^T` is written back. The plain baseline
(`method="full"`) runs this same loop with the weights themselves as state (`warp_core.slots`).

The optimizer step goes one slot, and one block of rows, at a time (`step_slots`): the
global gradient norm is taken in a first pass, then each block is clipped, updated and
written back, so only one block's fp32 gradient need be alive. In several processes each
takes its share of every micro-batch and FSDP2 sums the gradients (`warp_core.distributed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from warp_core.checkpoint import Checkpoint
from warp_core.data import IGNORE_INDEX, Encoded, collate, epoch_order
from warp_core.distributed import World
from warp_core.events import Cancelled
from warp_core.loss import response_loss_sum, response_tokens
from warp_core.optimizer import SlotAdamW
from warp_core.slots import Slot
from warp_core.spec import Hyperparameters


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


class StepRotation(Protocol):
    """Per step, which targets form their rotated gradient from activations
    (`warp_core.rotation`), installed for the step's forward and backward passes."""

    def step(self, tokens: int, response_tokens: int) -> AbstractContextManager[None]: ...


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
    world: World | None = None,
    rotation: StepRotation | None = None,
    keep_rotated: bool = True,
    chunked_loss: bool = False,
    checkpoint_steps: Collection[int] = (),
) -> int:
    """Run (or resume) the optimizer steps; returns the number of steps done.

    The loss of a step is the sum over its micro-batches of response-token losses divided
    by the step's response-token count, so the result does not depend on how a step is
    split into micro-batches or processes. `schedule` defaults to the job's `Schedule` over
    `examples`. Without a `checkpoint` nothing is saved or resumed. `check_stop` is called
    before every micro-batch and may raise to cancel (`Cancelled`: see below); the last
    checkpoint stays for a later resume. `keep_rotated` holds each block's gradient between
    the norm pass and the update instead of forming it again (`step_slots`); `chunked_loss`
    recomputes the output head's logits a chunk at a time (`loss.response_loss_sum`).

    `on_step` runs in every process after each step, before that step's checkpoint: what it
    writes (a results row, an exported model) is then always there for the step a resumed
    run starts from, and it may run collectives (a validation loss, gathering the model).
    A checkpoint is saved every `checkpoint_every` steps, at the last, and at each of
    `checkpoint_steps` (where models are exported: a resumed run never exports one again),
    and when `check_stop` raises `Cancelled`, at the last completed step if it is not saved
    yet: a stopped run resumes where it stopped, and ends as an uninterrupted one would.
    """
    world = world or World.alone(next(model.parameters()).device)
    schedule = schedule or Schedule(len(examples), hp)
    optimizer = SlotAdamW(hp, schedule.total_steps)
    first_step = checkpoint.restore(slots, optimizer) if checkpoint else 0
    model.train()
    saved = first_step
    for step in range(first_step, schedule.total_steps):
        started = time.perf_counter()
        micro = [[examples[i] for i in ids] for ids in schedule.micro_batches(step)]
        labels = sum(_response_tokens(item) for batch in micro for item in batch)
        tokens = sum(len(item.input_ids) for batch in micro for item in batch)
        shares = [collate(_share(batch, world), pad_id) for batch in micro]
        try:
            with rotation.step(tokens, labels) if rotation else nullcontext():
                loss = accumulate_gradients(model, shares, check_stop, labels, chunked_loss)
        except Cancelled:
            # A stop between two updates: the state is that of `step` completed steps
            # (the gradients half accumulated are not part of it). Saving it means a pause
            # loses no step; every rank agreed on the stop, so all save together.
            if checkpoint and saved != step:
                checkpoint.save(step, slots, optimizer)
            raise
        if world.size > 1:
            loss = float(world.sum_(torch.tensor([loss], device=world.device)).item())
        learning_rate = optimizer.learning_rate(step)
        norm = step_slots(slots, optimizer, learning_rate, hp.max_grad_norm, keep_rotated, world)
        model.zero_grad(set_to_none=True)
        done = step + 1
        if on_step:
            seconds = time.perf_counter() - started
            on_step(
                StepReport(done, schedule.total_steps, loss, learning_rate, norm, tokens, seconds)
            )
        due = done % hp.checkpoint_every == 0 or done in checkpoint_steps
        if checkpoint and (due or done == schedule.total_steps):
            checkpoint.save(done, slots, optimizer)
            saved = done
    model.eval()
    return schedule.total_steps


def _share(batch: list[Encoded], world: World) -> list[Encoded]:
    """This process's examples of a micro-batch: every `size`-th one. A process left
    without any runs the first one with no label, which adds nothing to any gradient but
    keeps its collectives in step with the others'."""
    mine = batch[world.rank :: world.size]
    if mine:
        return mine
    return [Encoded(batch[0].input_ids, [IGNORE_INDEX] * len(batch[0].input_ids))]


def _response_tokens(item: Encoded) -> int:
    """The tokens `response_loss_sum` learns in `item` (labels after the shift)."""
    return sum(label != IGNORE_INDEX for label in item.labels[1:])


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    check_stop: Callable[[], None] | None,
    label_tokens: int | None = None,
    chunked_loss: bool = False,
) -> float:
    """Backward over micro-batches; returns their share of the step's mean loss.

    `label_tokens` is the step's response-token count over all processes (default: these
    micro-batches' own).
    """
    device = next(model.parameters()).device
    if label_tokens is None:
        label_tokens = sum(response_tokens(mb) for mb in micro_batches)
    total = 0.0
    for batch in micro_batches:
        if check_stop:
            check_stop()
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = response_loss_sum(model, batch, chunked_loss) / max(label_tokens, 1)
        loss.backward()
        total += loss.item()
    return total


def step_slots(
    slots: Sequence[Slot],
    optimizer: SlotAdamW,
    learning_rate: float,
    max_norm: float | None,
    keep_rotated: bool,
    world: World,
) -> float:
    """One optimizer step, a slot block at a time; returns the gradient norm before clipping.

    With clipping, a first pass takes the global norm of the slots' gradients; the second
    clips, updates and writes back each block. `keep_rotated` holds each block's gradient
    between the passes (and drops the weight gradient it came from); otherwise the second
    pass forms it again, one more rotation per step for less memory. Clipping is
    `torch.nn.utils.clip_grad_norm_`'s (`max_norm / (norm + 1e-6)`, at most 1).
    """
    stepped = [slot for slot in slots if slot.param.grad is not None]
    norms: list[torch.Tensor] = []
    held: dict[tuple[int, int], torch.Tensor] = {}
    scale = None
    if max_norm is not None:
        for i, slot in enumerate(stepped):
            for j, block in enumerate(slot.blocks):
                gradient = slot.gradient(block)
                norms.append(torch.linalg.vector_norm(gradient))
                if keep_rotated:
                    held[i, j] = gradient
            if keep_rotated:
                slot.release_grad()
        total = _total_norm(norms, world)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for i, slot in enumerate(stepped):
        for j, block in enumerate(slot.blocks):
            grad = held.pop((i, j), None)
            if grad is None:
                grad = slot.gradient(block)
                if scale is None:
                    norms.append(torch.linalg.vector_norm(grad))
            if scale is not None:
                grad.mul_(scale.to(grad.device))
            optimizer.update(slot, block, grad, learning_rate)
            slot.write_back(block)
        optimizer.finish(slot)
        slot.release_grad()
    world.forget_gathered()
    return float(total if scale is not None else _total_norm(norms, world))


def _total_norm(norms: list[torch.Tensor], world: World) -> torch.Tensor:
    """The 2-norm of all gradients from the norms of their blocks, over all processes."""
    local = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return world.gradient_norm(local)
