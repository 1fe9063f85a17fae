"""Rotated gradients formed in the backward pass: `G_W U = sum_t g_t (x_t U)^T`.

A target's rotated gradient can be formed two ways with one result. From its weight gradient,
`(sum_t g_t x_t^T) U`, once the gradient is accumulated: `2 out in^2` FLOPs per rotation.
From each token's activation rotated first, `sum_t g_t (x_t U)^T`: `2 tokens in^2` FLOPs,
less whenever a target has more outputs than the step has tokens (lm_head, or any target at
small batches). `from_activations` is that cost model.

`rotated_backward(sinks)` swaps, for the length of a block, a target's forward for one whose
backward hands `(x, g)` (the layer's input and its output's gradient, one row per token) to
a sink instead of computing the weight gradient: Phase 3 returns the rotated gradient as the
weight's gradient (FSDP2 then reduces it like any gradient: a row of `G_W U` needs only that
row of `G_W`), Phase 2 accumulates its absolute value per batch and returns nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from warp_core.slots import RotatedSlot

Sink = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
"""`(x, g)` of one backward pass, `tokens x in` and `tokens x out` -> the weight's gradient
(or None when the sink keeps what it needs itself)."""


def from_activations(setting: str, tokens: int, out_features: int, rotations: int = 1) -> bool:
    """Whether the `gradient_rotation` setting forms `G_W U` from activations: always, never,
    or (`auto`) when that costs less than rotating an accumulated weight gradient `rotations`
    times (`2 T in^2` against `rotations x 2 out in^2` FLOPs)."""
    if setting == "auto":
        return tokens < rotations * out_features
    return setting == "activations"


def rotate_weight_gradient(x: torch.Tensor, g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`(g^T x) U` in fp32, the weight gradient computed as autograd computes it (in the
    layer's dtype: `(x^T g)^T`), then rotated."""
    return (x.t() @ g).t().float() @ basis


def rotate_activations(x: torch.Tensor, g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`g^T (x U)` in fp32: the activations rotated first."""
    return g.float().t() @ (x.float() @ basis)


class _RotatedLinear(torch.autograd.Function):
    """`F.linear` whose weight gradient is whatever the sink returns."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink):
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_x = grad_output @ weight if ctx.needs_input_grad[0] else None
        g = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = ctx.sink(x.reshape(-1, x.shape[-1]), g)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def _forward(module: nn.Linear, sink: Sink, x: torch.Tensor) -> torch.Tensor:
    return _RotatedLinear.apply(x, module.weight, module.bias, sink)


@contextmanager
def rotated_backward(sinks: dict[nn.Linear, Sink]) -> Iterator[None]:
    """Within the block, each module's backward hands `(x, g)` to its sink. Activation
    checkpointing recomputes through the same forward, so it works unchanged."""
    for module, sink in sinks.items():
        module.forward = partial(_forward, module, sink)
    try:
        yield
    finally:
        for module in sinks:
            del module.forward  # back to the class's own forward


class ActivationRotation:
    """Phase 3's `finetune.StepRotation`: per step, the WaRP targets whose rotated gradient
    `from_activations` forms in the backward pass (their weight gradient then already is
    `G_W U`); the others rotate their accumulated gradient in the optimizer step.

    `entries` are `(slot, module, is_head)`: the output head sees only the response tokens
    (`loss.response_loss_sum`), every other target all tokens. `rotations` is how many times
    a step rotates an accumulated gradient (2 when the norm pass forms it again).
    """

    def __init__(
        self, entries: list[tuple[RotatedSlot, nn.Linear, bool]], setting: str, rotations: int
    ) -> None:
        self.entries = entries
        self.setting = setting
        self.rotations = rotations

    @contextmanager
    def step(self, tokens: int, response_tokens: int) -> Iterator[None]:
        sinks: dict[nn.Linear, Sink] = {}
        for slot, module, is_head in self.entries:
            seen = response_tokens if is_head else tokens
            slot.grad_is_rotated = from_activations(
                self.setting, seen, module.out_features, self.rotations
            )
            if slot.grad_is_rotated:
                sinks[module] = partial(_rotated_weight_gradient, slot.basis)
        with rotated_backward(sinks):
            yield


def _rotated_weight_gradient(
    basis: Callable[[], torch.Tensor], x: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    return rotate_activations(x, g, basis())
