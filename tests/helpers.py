"""Helpers shared by the tests: data references, specs and batches over the shipped slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from warp_core.data import batches, encode_examples, load_examples, pad_token_id
from warp_core.spec import DatasetRef, JobSpec
from warp_core.testing import SAFETY_SLICE, UTILITY_SLICE

REPO = Path(__file__).resolve().parents[1]


def safety_ref(limit: int = 24, offset: int = 0) -> dict[str, Any]:
    return {
        "source": str(SAFETY_SLICE),
        "preset": "do-not-answer",
        "limit": limit,
        "offset": offset,
    }


def utility_ref(limit: int = 32, offset: int = 0) -> dict[str, Any]:
    return {"source": str(UTILITY_SLICE), "preset": "gsm8k", "limit": limit, "offset": offset}


def make_spec(model_dir: Path, **hyperparameters: Any) -> JobSpec:
    """A small, fast job over the shipped data slices; keyword args override hyperparameters
    (plus `method` and `eval`, which override those top-level fields)."""
    eval_spec = hyperparameters.pop("eval", {"enabled": False})
    method = hyperparameters.pop("method", "warp")
    hp = {
        "max_length": 160,
        "batch_size": 4,
        "grad_accum_steps": 2,
        "epochs": 1,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "checkpoint_every": 2,
        "basis_batch_size": 4,
        **hyperparameters,
    }
    return JobSpec.model_validate(
        {
            "base_model": str(model_dir),
            "method": method,
            "safety_data": safety_ref(),
            "utility_data": utility_ref(),
            "eval": eval_spec,
            "hyperparameters": hp,
        }
    )


def encoded_batches(
    tokenizer: Any, ref: dict[str, Any], batch_size: int, max_length: int = 160
) -> list[dict[str, torch.Tensor]]:
    """Collated batches of a dataset reference, as the pipeline builds them."""
    items, _ = encode_examples(tokenizer, load_examples(DatasetRef(**ref)), max_length)
    return list(batches(items, batch_size, pad_token_id(tokenizer)))
