"""Phase 1: one orthogonal basis per distinct layer input, from the safety data's activations.

For every distinct input x read by target layers (q/k/v share one, gate/up share one), the
uncentred second moment `G = sum_t x_t x_t^T` over non-padding tokens is accumulated in fp32
and decomposed as `G = U diag(lambda) U^T`, eigenvalues descending. Memory is one `in x in`
matrix per distinct input whatever the number of tokens.

In several processes each one accumulates the moments of its share of the batches; each sum
is reduced to the process that decomposes it (bases are dealt round-robin), and rank 0, the
one that saves them, receives every basis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from warp_core.distributed import Dealt, World
from warp_core.events import OnBatch
from warp_core.model import Target


@dataclass
class Bases:
    """`key_of[target name]` names the basis in `U` (and `eigenvalues`) that target uses."""

    key_of: dict[str, str]
    U: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]

    def for_target(self, target: Target) -> torch.Tensor:
        return self.U[self.key_of[target.name]]


def group_by_input(
    model: nn.Module, targets: list[Target], batch: dict[str, torch.Tensor]
) -> dict[str, list[Target]]:
    """Group targets that read the very same input tensor in one forward pass.

    Detected, not hard-coded, so any architecture works. References to the inputs are held
    until grouping ends, so two groups can never share a tensor identity by address reuse.
    Each group is keyed by its first target's name. A batch without an attention mask is
    one unpadded sequence: the planner's forward on the meta device (`warp_core.plan`),
    where a mask's values cannot be inspected, passes none.
    """
    seen: list[tuple[Target, torch.Tensor]] = []

    def recorder(target: Target) -> Callable:
        return lambda _module, args: seen.append((target, args[0]))

    handles = [t.module.register_forward_pre_hook(recorder(t)) for t in targets]
    mask = batch.get("attention_mask")
    try:
        with torch.no_grad():
            model(
                input_ids=batch["input_ids"][:1], attention_mask=None if mask is None else mask[:1]
            )
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[Target]]] = []
    for target, x in seen:
        group = next((g for tensor, g in groups if tensor is x), None)
        if group is None:
            groups.append((x, [target]))
        elif target not in group:
            group.append(target)
    return {members[0].name: members for _, members in groups}


def second_moments(
    model: nn.Module,
    groups: dict[str, list[Target]],
    batches: Iterable[Dealt],
    on_batch: OnBatch = None,
) -> dict[str, torch.Tensor]:
    """`G = sum_t x_t x_t^T` per group over the non-padding tokens of the batches that count,
    accumulated in fp32."""
    device = next(model.parameters()).device
    moments = {
        key: torch.zeros(
            members[0].module.in_features,
            members[0].module.in_features,
            dtype=torch.float32,
            device=device,
        )
        for key, members in groups.items()
    }
    token_mask: list[torch.Tensor] = []

    def accumulator(key: str) -> Callable:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0][token_mask[0]].float()
            moments[key].addmm_(x.T, x)

        return hook

    handles = [
        members[0].module.register_forward_pre_hook(accumulator(key))
        for key, members in groups.items()
    ]
    try:
        with torch.no_grad():
            for batch, counts in batches:
                mask = batch["attention_mask"].bool()
                token_mask[:] = [mask if counts else torch.zeros_like(mask)]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if on_batch:
                    on_batch()
    finally:
        for handle in handles:
            handle.remove()
    return moments


def eigenbasis(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U, lambda)` with `moment = U diag(lambda) U^T`, lambda descending and >= 0.

    The decomposition runs in fp64 (cheap next to the forward passes) so that `U` is
    orthogonal to fp32 precision; round-off negatives of a PSD matrix are clamped to zero.
    """
    eigenvalues, vectors = torch.linalg.eigh(moment.double())
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    return vectors.float().contiguous(), eigenvalues.clamp_min(0).float()


def build_bases(
    model: nn.Module,
    targets: list[Target],
    batches: list[dict[str, torch.Tensor]],
    on_batch: OnBatch = None,
    world: World | None = None,
) -> Bases:
    """Phase 1 end to end: group targets by input, accumulate moments, decompose them.

    In several processes, every rank passes all of `batches` and takes its share; the
    returned `Bases` hold every basis on rank 0 and none elsewhere.
    """
    world = world or World.alone(next(model.parameters()).device)
    groups = group_by_input(model, targets, batches[0])
    moments = second_moments(model, groups, world.deal(batches), on_batch)
    key_of = {t.name: key for key, members in groups.items() for t in members}
    owners = {key: index % world.size for index, key in enumerate(moments)}
    for key, owner in owners.items():
        world.reduce_(moments[key], dst=owner)
        if world.rank != owner:
            del moments[key]
    decomposed = {key: eigenbasis(moments.pop(key)) for key in list(moments)}
    bases: dict[str, torch.Tensor] = {}
    eigenvalues: dict[str, torch.Tensor] = {}
    for key, owner in owners.items():
        n = groups[key][0].module.in_features
        vectors, values = decomposed.pop(key, (None, None))
        vectors = world.to_main(vectors, owner, (n, n))
        values = world.to_main(values, owner, (n,))
        if world.main:
            bases[key], eigenvalues[key] = vectors, values
    return Bases(key_of, bases, eigenvalues)


ENERGY_FRACTION = 0.9
"""The share of energy whose directions `spectrum` counts (reported as `directions_90`)."""


def energy_directions(eigenvalues: torch.Tensor, fraction: float = ENERGY_FRACTION) -> int:
    """How many leading directions hold `fraction` of the energy (sum of eigenvalues)."""
    total = eigenvalues.sum()
    if total <= 0:
        return 0
    cumulative = eigenvalues.double().cumsum(0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))) + 1


def spectrum(bases: Bases) -> dict[str, dict[str, float | int]]:
    """Per basis: its size and the directions holding 90% of the energy."""
    report = {}
    for key, values in bases.eigenvalues.items():
        k = min(energy_directions(values), values.numel())
        report[key] = {"dim": values.numel(), "directions_90": k, "share": k / values.numel()}
    return report
