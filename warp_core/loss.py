"""The response-token loss: what training minimises and evaluation reports.

Only response tokens are learned (prompt and padding labels are -100), and most positions of
a chat batch are prompt or padding. So the output head is applied to the hidden states of the
learned positions alone, which saves the full-vocabulary logits of all the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from warp_core.data import IGNORE_INDEX
from warp_core.distributed import World
from warp_core.events import OnBatch

HEAD_CHUNK_TOKENS = 1024
"""Response positions whose logits exist at once when the loss is chunked: with a 32k
vocabulary, 0.4 GiB of fp32 logits and their gradients instead of 3 GiB for a micro-batch of
8 sequences of 1,024 tokens."""


def response_loss_sum(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], chunked: bool = False
) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens of `batch`, in fp32.

    Works for Hugging Face causal LMs whose logits are `lm_head(last hidden state)` with no
    post-processing (no logit scaling or soft-capping): the decoder and the head are called
    separately, through `get_decoder()` and `get_output_embeddings()`. `chunked` applies the
    head `HEAD_CHUNK_TOKENS` positions at a time and recomputes each chunk's logits in the
    backward pass (activation checkpointing), so one chunk's logits are alive at a time.
    """
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    learned = labels != IGNORE_INDEX
    positions, targets = hidden[:, :-1][learned], labels[learned]
    head = model.get_output_embeddings()
    if not chunked or len(targets) <= HEAD_CHUNK_TOKENS:
        return _head_loss(head, positions, targets)
    chunks = range(0, len(targets), HEAD_CHUNK_TOKENS)
    return sum(
        checkpoint(
            _head_loss,
            head,
            positions[start : start + HEAD_CHUNK_TOKENS],
            targets[start : start + HEAD_CHUNK_TOKENS],
            use_reentrant=False,
        )
        for start in chunks
    )


def _head_loss(head: nn.Module, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(positions).float(), targets, reduction="sum")


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens `response_loss_sum` sums over: the divisor of a mean loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def mean_response_loss(
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    world: World | None = None,
    on_batch: OnBatch = None,
) -> float:
    """Mean cross-entropy per response token over `batches`, without gradients, the model in
    evaluation mode meanwhile: the validation loss, and evaluation's utility loss.

    Token-weighted (summed loss / summed response tokens), so neither the batch size nor how
    examples of different lengths fall into batches changes it. In several processes each
    takes its share of the batches (`World.deal`) and the sums are added over them, so every
    process must call it; alone, `world` may be left out.
    """
    device = next(model.parameters()).device
    world = world or World.alone(device)
    loss, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch, counts in world.deal(batches):
            with torch.no_grad():  # not inference_mode: FSDP2 reuses the buffers it gathers into
                value = response_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            if counts:
                loss += value.item()
                tokens += response_tokens(batch)
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    totals = world.sum_(torch.tensor([loss, tokens], dtype=torch.float64, device=world.device))
    if totals[1] == 0:
        raise ValueError("no response token to take a loss over")
    return float(totals[0] / totals[1])
