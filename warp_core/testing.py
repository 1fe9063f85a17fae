"""Tiny Llama chat models built offline: the one recipe for tests, examples and benchmarks.

No pretrained weights can be downloaded where this project is tested, so a byte-level BPE
tokenizer is trained on the data slices shipped in `EXAMPLE_DATA`, given a ChatML chat
template, and a small `LlamaForCausalLM` is initialised from `LlamaConfig`. The result saves
and loads like any Hugging Face checkpoint. `build_tiny_model` adds the example job that
runs on it (`examples/build_tiny_model.py` is its command line).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from warp_core.data import load_examples
from warp_core.spec import EXAMPLE_DATA, XSTEST_PROMPTS, DatasetRef, JobSpec

SAFETY_SLICE = EXAMPLE_DATA / "do-not-answer.csv"
UTILITY_SLICE = EXAMPLE_DATA / "gsm8k.jsonl"
UTILITY_TEST_SLICE = EXAMPLE_DATA / "gsm8k-test.jsonl"

TOKENIZER_SLICES = ((SAFETY_SLICE, "do-not-answer", 300), (UTILITY_SLICE, "gsm8k", 400))
"""(slice, preset, rows) the tiny tokenizer is trained on, the first rows of each: fixed
counts, so the tokenizer, and every token count measured with it, stays the same when a
slice grows."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with a ChatML chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tokenizer_corpus() -> list[str]:
    """Harmful prompts with their refusals and GSM8K problems with their solutions, as the
    pipeline loads them (`TOKENIZER_SLICES`), one text per example."""
    return [
        f"{example.prompt}\n{example.response}"
        for path, preset, rows in TOKENIZER_SLICES
        for example in load_examples(DatasetRef(source=str(path), preset=preset, limit=rows))
    ]


def tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """The tokenizer of every tiny model: `train_tokenizer` on `tokenizer_corpus()`."""
    return train_tokenizer(tokenizer_corpus(), vocab_size)


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for tests (lm_head untied unless asked, like most
    chat models; small ones such as SmolLM2 tie it)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or int(hidden_size * 2.75),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def llama_2_7b_config() -> LlamaConfig:
    """meta-llama/Llama-2-7b-chat-hf's config as far as memory and FLOPs go: what the
    planner's tests, the API's memory check and the benchmarks predict for (a config alone,
    never weights)."""
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    """Write an ordinary Hugging Face checkpoint (safetensors + tokenizer) to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# -- the example job ---------------------------------------------------------------------------

EXAMPLE_HYPERPARAMETERS: dict[str, Any] = {
    # Sized for a randomly initialised 2-layer model on 2 CPU cores: 16 optimizer steps.
    "max_length": 256,
    "batch_size": 8,
    "grad_accum_steps": 2,
    "epochs": 1,
    "learning_rate": 1e-3,
    "keep_ratio": 0.1,
    "checkpoint_every": 8,
    "importance_batch_size": 2,
}


def xstest_slices(limit: int) -> dict[str, dict[str, Any]]:
    """`eval.benign` and `eval.contrast` cut to the first `limit` prompts of each XSTest set:
    what a job measures by default, in seconds instead of 450 generations."""
    return {
        name: {"source": str(XSTEST_PROMPTS), "preset": preset, "limit": limit}
        for name, preset in (("benign", "xstest-safe"), ("contrast", "xstest-unsafe"))
    }


QUICK: dict[str, Any] = {
    # Seconds of work instead of a minute: what the service tests and benchmarks submit.
    "safety_data": {"limit": 32},
    "utility_data": {"limit": 64},
    "eval": {"limit": 4, "max_new_tokens": 8, "utility_max_new_tokens": 8, **xstest_slices(4)},
    "hyperparameters": {"max_length": 192, "checkpoint_every": 2},
}


def example_job(base_model: str, seed: int = 0, quick: bool = False) -> JobSpec:
    """The example job on the shipped slices (`examples/spec.json` is it with relative
    paths); `quick` cuts it down to `QUICK` (the eval section is replaced, not merged)."""

    def ref(path: Path, preset: str, limit: int) -> dict[str, Any]:
        return {"source": str(path), "preset": preset, "limit": limit}

    spec: dict[str, Any] = {
        "base_model": base_model,
        "method": "warp",
        "safety_data": ref(SAFETY_SLICE, "do-not-answer", 200),
        "utility_data": ref(UTILITY_SLICE, "gsm8k", 256),
        "eval": {
            # harmful defaults to the 16 rows after the safety slice, benign and contrast to
            # XSTest's safe and unsafe prompts; GSM8K accuracy and held-out loss come from
            # the test split.
            "utility": ref(UTILITY_TEST_SLICE, "gsm8k", 16),
            "limit": 16,
            "max_new_tokens": 32,
            "utility_max_new_tokens": 64,
        },
        "hyperparameters": {**EXAMPLE_HYPERPARAMETERS, "seed": seed},
    }
    if quick:
        merged = ("safety_data", "utility_data", "hyperparameters")
        spec |= {key: {**spec[key], **QUICK[key]} for key in merged} | {"eval": QUICK["eval"]}
    return JobSpec.model_validate(spec)


def build_tiny_model(
    out: Path, vocab_size: int = 1024, seed: int = 0, quick: bool = False, **shape: int
) -> tuple[Path, Path]:
    """Write OUT/model (a random `tiny_llama` of `shape`) and OUT/spec.json (`example_job` on
    it, with absolute paths); return both paths. The same arguments give the same files."""
    out = out.resolve()
    tokenizer = tiny_tokenizer(vocab_size)
    model = tiny_llama(tokenizer, seed=seed, **shape)
    model_dir = save_checkpoint(model, tokenizer, out / "model")
    spec_path = out / "spec.json"
    spec = example_job(str(model_dir), seed, quick)
    spec_path.write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return model_dir, spec_path
