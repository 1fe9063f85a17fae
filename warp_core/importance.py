"""Phase 2: importance of each rotated coefficient for the refusals, and the masks it implies.

Coefficients of a target are `C = W U` (input side rotated). For each safety batch, the
cross-entropy of the refusal tokens is back-propagated and `I += |(dL/dW) U|` accumulated in
fp32; nothing is updated. The mask freezes the top `keep_ratio` of `I`, with an exact count.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from warp_core.basis import Bases
from warp_core.events import OnBatch
from warp_core.model import Target


def importance_scores(
    model: nn.Module,
    targets: list[Target],
    bases: Bases,
    batches: Iterable[dict[str, torch.Tensor]],
    on_batch: OnBatch = None,
) -> dict[str, torch.Tensor]:
    """`I = sum_b |(dL_b/dW) U|` per target weight (fp32, the weight's shape).

    `batches` carry labels that are -100 on prompt and padding tokens, so `L_b` is the mean
    loss of the refusal tokens of batch `b`; the batch size is part of the statistic.
    """
    scores = {t.param_name: torch.zeros_like(t.weight, dtype=torch.float32) for t in targets}
    flags = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for target in targets:
        target.weight.requires_grad_(True)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for target in targets:
                rotated = target.weight.grad.float() @ bases.for_target(target)
                scores[target.param_name].add_(rotated.abs_())
            if on_batch:
                on_batch()
    finally:
        model.zero_grad(set_to_none=True)
        for param, flag in flags.items():
            param.requires_grad_(flag)
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
