"""Phase 2: importance of each rotated coefficient for the refusals, and the masks it implies.

Coefficients of a target are `C = W U` (input side rotated). For each safety batch, the
cross-entropy of the refusal tokens is back-propagated and `I += |(dL/dW) U|` accumulated in
fp32; nothing is updated. The mask freezes the top `keep_ratio` of `I`, with an exact count.

The rotated gradient of each batch is formed in the backward pass itself
(`warp_core.rotation`): the weights stay frozen, and each target hands its input and output
gradient to a sink that adds `|G_b U|` to its score, from the weight gradient or from the
activations, whichever costs less. In several processes each one scores its share of the
batches into scores of the whole weights, which are summed into rank 0's at the end: the sum
over batches of the absolute values, exactly as one process would take it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from warp_core.basis import Bases
from warp_core.distributed import World
from warp_core.events import OnBatch
from warp_core.model import Target
from warp_core.rotation import (
    Sink,
    from_activations,
    rotate_activations,
    rotate_weight_gradient,
    rotated_backward,
)


def importance_scores(
    model: nn.Module,
    targets: list[Target],
    bases: Bases,
    batches: Sequence[dict[str, torch.Tensor]],
    on_batch: OnBatch = None,
    world: World | None = None,
    gradient_rotation: str = "auto",
) -> dict[str, torch.Tensor]:
    """`I = sum_b |(dL_b/dW) U|` per target weight (fp32, the weight's shape).

    `batches` carry labels that are -100 on prompt and padding tokens, so `L_b` is the mean
    loss of the refusal tokens of batch `b`; the batch size is part of the statistic. In
    several processes every rank passes all of `batches`; the sums are rank 0's.
    """
    world = world or World.alone(next(model.parameters()).device)
    scores = {
        t.param_name: torch.zeros(t.weight.shape, dtype=torch.float32, device=world.device)
        for t in targets
    }
    counts = [True]

    def sink(target: Target) -> Sink:
        def add(x: torch.Tensor, g: torch.Tensor) -> None:
            if counts[0]:
                out = target.module.out_features
                from_x = from_activations(gradient_rotation, x.shape[0], out)
                rotate = rotate_activations if from_x else rotate_weight_gradient
                scores[target.param_name].add_(rotate(x, g, bases.for_target(target)).abs_())

        return add

    flags = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()  # gradients reach the targets' inputs
    try:
        with rotated_backward({t.module: sink(t) for t in targets}):
            for batch, counted in world.deal(batches):
                counts[0] = counted
                model(**batch).loss.backward()
                if on_batch:
                    on_batch()
    finally:
        model.disable_input_require_grads()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    for values in scores.values():
        world.reduce_(values)
    return scores


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly `k` True entries where `scores` is largest (ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view(scores.shape)


def masks_from_importance(
    scores: dict[str, torch.Tensor], keep_ratio: float, scope: str
) -> dict[str, torch.Tensor]:
    """Boolean masks, True = frozen: the top `keep_ratio` of importance.

    `module` scope freezes `round(keep_ratio * numel)` coefficients of every weight; `global`
    (the original WaRP) freezes the top `round(keep_ratio * total)` across all of them, so
    some weights keep more and others less.
    """
    if scope == "module":
        return {
            name: _top_k_mask(values, round(keep_ratio * values.numel()))
            for name, values in scores.items()
        }
    flat = torch.cat([values.flatten() for values in scores.values()])
    frozen = _top_k_mask(flat, round(keep_ratio * flat.numel()))
    masks, start = {}, 0
    for name, values in scores.items():
        masks[name] = frozen[start : start + values.numel()].view(values.shape)
        start += values.numel()
    return masks


def random_scores(
    shapes: dict[str, torch.Size], seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Scores that make `masks_from_importance` freeze a random set of the same size: the
    ablation that shows whether the importance ranking matters."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(shape, generator=generator).to(device) for name, shape in shapes.items()
    }
