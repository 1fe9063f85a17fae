"""Shared fixtures: the tiny offline Llama chat model of `warp_core.testing`."""

from __future__ import annotations

import os

# Tests never reach a hub: anything that tries fails at once instead of timing out.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

from warp_core.testing import save_checkpoint, tiny_llama, tiny_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama checkpoint (hidden 64, 2 layers, untied lm_head)."""
    return save_checkpoint(tiny_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    """One cache of toy aligned models for the session: the default model trains once, for
    the library-level effect test and the demo alike."""
    return tmp_path_factory.mktemp("toy-cache")
