"""Datasets to token batches: loading, chat rendering, truncation, label masking, collation.

One rendering serves training and evaluation (WARP.md: the reference's formats differed):
`render_prompt` is exactly the prefix a model sees before it answers, and
`encode_example` appends the response tokens to those same prompt tokens.

Rendering: with a chat template, the prompt is the template applied to one user message
with the generation prompt, and the response is whatever the template adds for the
assistant turn (the answer and its end-of-turn marker). Without a chat template the plain
fallback is `"### User:\\n{prompt}\\n\\n### Assistant:\\n"` followed by the response and the
EOS token (a BOS token is prepended when the tokenizer has one).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import load_dataset

from warp_core.spec import LOCAL_FORMATS, DatasetRef

# `load_dataset("csv", ...)` would otherwise send a usage ping for every local file it reads,
# and stall for seconds where there is no network; jobs should not phone home.
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

PLAIN_PROMPT_FORMAT = "### User:\n{prompt}\n\n### Assistant:\n"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """A prompt/response pair; `meta` keeps what evaluators need (GSM8K answer, MBPP tests)."""

    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)


def _mbpp_prompt(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    return f"{row['text']}\nYour code should pass these tests:\n{tests}"


PRESET_FIELDS: dict[str, tuple[str, str]] = {
    "do-not-answer": ("question", "llama2-7b-chat_response"),
    "gsm8k": ("question", "answer"),
    "mbpp": ("text", "code"),
}
"""Default (prompt, response) columns per preset; MBPP's prompt also lists its tests."""

PRESET_META: dict[str, tuple[str, ...]] = {
    "gsm8k": ("answer",),
    "mbpp": ("test_list", "test_setup_code", "task_id"),
}


def load_rows(ref: DatasetRef) -> list[dict[str, Any]]:
    """Rows `[offset, offset + limit)` of the referenced dataset, as plain dicts."""
    if ref.is_local:
        path = Path(ref.source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {ref.source}")
        fmt = LOCAL_FORMATS[path.suffix.lower()]
        builder = "json" if fmt == "jsonl" else fmt  # one `datasets` builder reads both
        dataset = load_dataset(builder, data_files=str(path), split="train")
    else:
        dataset = load_dataset(ref.source, ref.config, split=ref.split)
    stop = len(dataset) if ref.limit is None else min(len(dataset), ref.offset + ref.limit)
    if ref.offset >= stop:
        raise ValueError(
            f"{ref.source}: offset {ref.offset} leaves no rows (the dataset has {len(dataset)})"
        )
    return [dict(row) for row in dataset.select(range(ref.offset, stop))]


def load_examples(ref: DatasetRef) -> list[Example]:
    """Load a dataset reference as prompt/response examples, applying its preset."""
    rows = load_rows(ref)
    prompt_field, response_field = PRESET_FIELDS.get(ref.preset or "", (None, None))
    prompt_field = ref.prompt_field or prompt_field
    response_field = ref.response_field or response_field
    columns = set(rows[0])
    for name, column in (("prompt_field", prompt_field), ("response_field", response_field)):
        if column not in columns:
            raise ValueError(
                f"{ref.source}: {name} {column!r} is not a column (columns: {sorted(columns)})"
            )
    use_mbpp_prompt = ref.preset == "mbpp" and ref.prompt_field is None
    examples = []
    for row in rows:
        prompt = _mbpp_prompt(row) if use_mbpp_prompt else str(row[prompt_field])
        meta = {key: row[key] for key in PRESET_META.get(ref.preset or "", ()) if key in row}
        examples.append(Example(prompt, str(row[response_field] or ""), meta))
    return examples


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The text a model reads before it answers `prompt` (training and evaluation alike)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return PLAIN_PROMPT_FORMAT.format(prompt=prompt)


def render_response(tokenizer: Any, prompt: str, response: str) -> str:
    """The text that follows `render_prompt` when the assistant answers with `response`."""
    if not tokenizer.chat_template:
        return response + (tokenizer.eos_token or "")
    prefix = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not full.startswith(prefix):
        raise ValueError("the chat template does not render the prompt as a prefix of the dialog")
    response_text = full[len(prefix) :]
    # Learning ends at the end-of-turn token: what a template adds after it (a newline) is
    # never generated, since generation stops there.
    eos = tokenizer.eos_token
    if eos and eos in response_text:
        response_text = response_text[: response_text.rindex(eos) + len(eos)]
    return response_text


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the rendered prompt; special tokens come from the template itself."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if not tokenizer.chat_template and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Encoded | None:
    """Prompt + response ids truncated to `max_length`, labels only on response tokens.

    Returns None when the prompt alone fills `max_length` (no response token would be
    learned from it); callers count and report those.
    """
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    response_text = render_response(tokenizer, example.prompt, example.response)
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    encoded = Encoded(input_ids, labels)
    return encoded if encoded.response_tokens else None


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> tuple[list[Encoded], int]:
    """Encode all examples; also return how many were dropped for having no response token."""
    encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
    kept = [item for item in encoded if item is not None]
    return kept, len(encoded) - len(kept)


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else EOS (padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding)."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    items: Sequence[Encoded], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive batches in the given order (the last one may be smaller)."""
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad_id)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle of `range(n)` for one epoch, reproducible on resume."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order
