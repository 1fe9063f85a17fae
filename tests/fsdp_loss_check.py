"""Run under torchrun by tests/test_distributed.py: on a model sharded by FSDP2, the loss
computed a head chunk at a time (each chunk's logits recomputed in the backward pass, the
head unit gathered once per chunk) has the loss and the gradients of the loss computed whole.
Prints one JSON line from rank 0."""

from __future__ import annotations

import json

import torch

from tests.helpers import encoded_batches, utility_ref
from warp_core import loss
from warp_core.distributed import World
from warp_core.testing import tiny_llama, tiny_tokenizer


def loss_and_gradients(world: World, tokenizer, chunk: int) -> tuple[float, dict]:
    model = tiny_llama(tokenizer)
    world.shard(model)
    batch = encoded_batches(tokenizer, utility_ref(limit=4), batch_size=4)[0]
    loss.HEAD_CHUNK_TOKENS = chunk
    value = loss.response_loss_sum(model, batch, chunked=True)
    value.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return float(value), grads


def main() -> None:
    world = World.join("cpu")
    tokenizer = tiny_tokenizer()
    whole, whole_grads = loss_and_gradients(world, tokenizer, chunk=10**9)
    chunked, chunked_grads = loss_and_gradients(world, tokenizer, chunk=17)
    worst = max(
        float((chunked_grads[n] - g).abs().max() / g.abs().max()) for n, g in whole_grads.items()
    )
    if world.main:
        print(json.dumps({"whole": whole, "chunked": chunked, "gradient_difference": worst}))
    world.close()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
