"""The response-token loss: what training minimises and evaluation reports.

Only response tokens are learned (prompt and padding labels are -100), and most positions of
a chat batch are prompt or padding. So the output head is applied to the hidden states of the
learned positions alone, which saves the full-vocabulary logits of all the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from warp_core.data import IGNORE_INDEX


def response_loss_sum(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens of `batch`, in fp32.

    Works for Hugging Face causal LMs whose logits are `lm_head(last hidden state)` with no
    post-processing (no logit scaling or soft-capping): the decoder and the head are called
    separately, through `get_decoder()` and `get_output_embeddings()`.
    """
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    learned = labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][learned])
    return F.cross_entropy(logits.float(), labels[learned], reduction="sum")


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens `response_loss_sum` sums over: the divisor of a mean loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
