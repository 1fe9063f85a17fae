"""Datasets to token batches: loading, chat rendering, truncation, label masking, collation.

Every example is a conversation that ends with an assistant turn. A prompt/response pair (the
do-not-answer, gsm8k and mbpp presets, or `prompt_field`/`response_field`) is the one-turn
case: one user turn, one assistant turn; a `preset: "chat"` row (`warp_core.chat`) is any
other. One rendering serves training and evaluation (WARP.md: the reference's formats
differed): `encode_prompt` gives exactly the tokens a model reads before it answers, and
`encode_example` the same tokens followed by the answer.

Rendering: the tokenizer's chat template renders the conversation; a tokenizer without one
gets `PLAIN_CHAT_TEMPLATE` (one turn: `"### User:\\n{prompt}\\n\\n### Assistant:\\n"`, then
the response and the EOS token; a BOS token is prepended when the tokenizer has one). An
assistant turn is what the template adds to the conversation before it, rendered with the
generation prompt: the answer and its end-of-turn marker. Labels are the tokens of every
trained assistant turn (OpenAI's `weight` 1) and -100 everywhere else: system and user turns,
the template's headers, untrained assistant turns, padding.
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

from warp_core.chat import Turn, conversation
from warp_core.spec import LOCAL_FORMATS, DatasetRef

# `load_dataset("csv", ...)` would otherwise send a usage ping for every local file it reads,
# and stall for seconds where there is no network; jobs should not phone home.
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{{ '### ' + (message['role'] | capitalize) + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Assistant:\n' }}{% endif %}"
)
"""The rendering of a tokenizer without a chat template: `### System:`, `### User:` and
`### Assistant:` headers, turns apart by a blank line, each assistant turn ending in EOS."""

IGNORE_INDEX = -100

Prompt = str | tuple[Turn, ...]
"""What a model answers: a conversation so far, or a bare string for one user message."""


def prompt_turns(prompt: Prompt) -> tuple[Turn, ...]:
    """The turns of a prompt: a bare string is one user message."""
    return (Turn("user", prompt),) if isinstance(prompt, str) else prompt


@dataclass(frozen=True)
class Example:
    """A conversation: `prompt`, what the model answers, then `response`, the assistant's
    answer (learned unless `trained` is False). A string prompt makes it a prompt/response
    pair; `meta` keeps what evaluators need (GSM8K answer, MBPP tests)."""

    prompt: Prompt
    response: str
    meta: dict[str, Any] = field(default_factory=dict)
    trained: bool = True

    @classmethod
    def of(cls, turns: Sequence[Turn]) -> Example:
        """A conversation's example: it is answered at its last assistant turn, and the turns
        after that one are left out (nothing there is learned or answered)."""
        last = max(i for i, turn in enumerate(turns) if turn.role == "assistant")
        return cls(tuple(turns[:last]), turns[last].content, trained=turns[last].trained)

    @property
    def turns(self) -> tuple[Turn, ...]:
        return (*prompt_turns(self.prompt), Turn("assistant", self.response, self.trained))


def _mbpp_prompt(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    return f"{row['text']}\nYour code should pass these tests:\n{tests}"


PRESET_FIELDS: dict[str, tuple[str, str | None]] = {
    "do-not-answer": ("question", "llama2-7b-chat_response"),
    "do-not-answer-harmful": ("question", "response"),
    "gsm8k": ("question", "answer"),
    "mbpp": ("text", "code"),
    "xstest-safe": ("prompt", None),
    "xstest-unsafe": ("prompt", None),
    "advbench": ("prompt", None),
    "harmbench": ("prompt", None),
    "strongreject": ("forbidden_prompt", None),
}
"""Default (prompt, response) columns per preset; MBPP's prompt also lists its tests. The
chat preset has none: its rows hold `messages` (`warp_core.chat`). The standard suites are
prompts only (response None), and where a suite circulates in two layouts the prompt column
is the first of `PROMPT_COLUMNS` the rows have."""

PROMPT_COLUMNS: dict[str, tuple[str, ...]] = {
    "advbench": ("prompt", "goal"),
    "harmbench": ("prompt", "Behavior"),
    "strongreject": ("forbidden_prompt", "prompt"),
}
"""Prompt columns of a suite, in order of preference: AdvBench's Hub copy
(`walledai/AdvBench`: `prompt`, `target`) and its original `harmful_behaviors.csv` (`goal`,
`target`; `target` is the affirmative answer attacks aim for, never a response to learn);
HarmBench's Hub copy (`walledai/HarmBench`: `prompt`, `category`, and `context` in its
contextual configuration) and its original behaviours CSV (`Behavior`, `ContextString`, ...);
StrongREJECT's original CSV (`category`, `source`, `forbidden_prompt`) and Hub copies that
call it `prompt`."""

CONTEXT_COLUMNS = ("context", "ContextString")
"""HarmBench's contextual behaviours: the context goes before the behaviour, as HarmBench
renders them (`{context}\n\n---\n\n{behavior}`)."""

ROW_FILTERS: dict[str, tuple[str, str]] = {
    "xstest-safe": ("label", "safe"),
    "xstest-unsafe": ("label", "unsafe"),
}
"""Presets that read some rows of a file: (column, value) a row must have. XSTest's file
(`id, prompt, type, label, focus, note`) holds 250 safe and 200 unsafe contrast prompts;
the filter applies before `offset` and `limit`."""

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
    if ref.preset in ROW_FILTERS:
        column, value = ROW_FILTERS[ref.preset]
        if column not in dataset.column_names:
            raise ValueError(f"{ref.source}: preset {ref.preset} needs a column {column!r}")
        dataset = dataset.filter(lambda row: row[column] == value)
    stop = len(dataset) if ref.limit is None else min(len(dataset), ref.offset + ref.limit)
    if ref.offset >= stop:
        raise ValueError(
            f"{ref.source}: offset {ref.offset} leaves no rows (the dataset has {len(dataset)})"
        )
    return [dict(row) for row in dataset.select(range(ref.offset, stop))]


def load_examples(ref: DatasetRef, prompts_only: bool = False) -> list[Example]:
    """Load a dataset reference as examples, applying its preset. With `prompts_only` (the
    refusal checks' sets) the preset's response column is not read: responses are empty."""
    rows = load_rows(ref)
    if ref.preset == "chat":
        return _chat_examples(ref, rows)
    columns = set(rows[0])
    prompt_field, response_field = dataset_fields(ref, columns, prompts_only)
    for name, column in (("prompt_field", prompt_field), ("response_field", response_field)):
        if column is not None and column not in columns:
            raise ValueError(
                f"{ref.source}: {name} {column!r} is not a column (columns: {sorted(columns)})"
            )
    use_mbpp_prompt = ref.preset == "mbpp" and ref.prompt_field is None
    context = next((c for c in CONTEXT_COLUMNS if c in columns), None)
    use_context = ref.preset == "harmbench" and ref.prompt_field is None and context is not None
    examples = []
    for row in rows:
        prompt = _mbpp_prompt(row) if use_mbpp_prompt else str(row[prompt_field])
        if use_context and row[context]:
            prompt = f"{row[context]}\n\n---\n\n{prompt}"
        meta = {key: row[key] for key in PRESET_META.get(ref.preset or "", ()) if key in row}
        response = "" if response_field is None else str(row[response_field] or "")
        examples.append(Example(prompt, response, meta))
    return examples


def dataset_fields(
    ref: DatasetRef, columns: set[str], prompts_only: bool = False
) -> tuple[str | None, str | None]:
    """The (prompt, response) columns a reference reads from rows with `columns`: its own
    fields, else its preset's (response None: a prompt-only set, or `prompts_only` and no
    explicit `response_field`)."""
    prompt_field, response_field = PRESET_FIELDS.get(ref.preset or "", (None, None))
    candidates = PROMPT_COLUMNS.get(ref.preset or "", ())
    prompt_field = next((c for c in candidates if c in columns), prompt_field)
    if prompts_only:
        response_field = None
    return ref.prompt_field or prompt_field, ref.response_field or response_field


def _chat_examples(ref: DatasetRef, rows: list[dict[str, Any]]) -> list[Example]:
    """Every row checked by `chat.conversation`: a Hub set or a file preflight did not read
    whole still fails on its first invalid row, by number."""
    examples = []
    for number, row in enumerate(rows, start=ref.offset):
        try:
            examples.append(Example.of(conversation(row)))
        except ValueError as exc:
            raise ValueError(f"{ref.source}: row {number}: {exc}") from None
    return examples


def _render(tokenizer: Any, turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        [turn.message() for turn in turns],
        chat_template=None if tokenizer.chat_template else PLAIN_CHAT_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text a model reads before it answers `prompt` (training and evaluation alike)."""
    return _render(tokenizer, prompt_turns(prompt), add_generation_prompt=True)


def render_response(tokenizer: Any, prompt: Prompt, response: str) -> str:
    """The text that follows `render_prompt` when the assistant answers with `response`."""
    prefix = render_prompt(tokenizer, prompt)
    full = _render(tokenizer, (*prompt_turns(prompt), Turn("assistant", response)))
    if not full.startswith(prefix):
        raise ValueError("the chat template does not render the prompt as a prefix of the dialog")
    response_text = full[len(prefix) :]
    # Learning ends at the end-of-turn token: what a template adds after it (a newline) is
    # never generated, since generation stops there.
    eos = tokenizer.eos_token
    if eos and eos in response_text:
        response_text = response_text[: response_text.rindex(eos) + len(eos)]
    return response_text


def _pieces(tokenizer: Any, turns: Sequence[Turn], answer_next: bool) -> list[tuple[str, bool]]:
    """The rendered conversation cut into consecutive (text, learned) pieces: each assistant
    turn (`render_response`) and the text before it; with `answer_next`, then the text up to
    the generation prompt. Cutting at every assistant turn, learned or not, tokenizes a turn
    the same whatever its weight, and a prompt the same in training and in evaluation."""
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for index, turn in enumerate(turns):
        if turn.role == "assistant":
            before = tuple(turns[:index])
            answer = render_response(tokenizer, before, turn.content)
            prefix = render_prompt(tokenizer, before)
            pieces += [(_after(rendered, prefix), False), (answer, turn.trained)]
            rendered = prefix + answer
    if answer_next:
        pieces.append((_after(rendered, render_prompt(tokenizer, tuple(turns))), False))
    return pieces


def _after(rendered: str, text: str) -> str:
    """What `text` adds to `rendered`, the conversation's text so far."""
    if not text.startswith(rendered):
        raise ValueError(
            "the chat template does not render a conversation turn by turn: a later turn "
            "changes the text of earlier ones"
        )
    return text[len(rendered) :]


def _encode(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of the pieces, each tokenized on its own, and their labels."""
    input_ids: list[int] = []
    if not tokenizer.chat_template and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)  # a template writes its own special tokens
    labels = [IGNORE_INDEX] * len(input_ids)
    texts = [text for text, _ in pieces]
    for ids, (_, learned) in zip(
        tokenizer(texts, add_special_tokens=False)["input_ids"], pieces, strict=True
    ):
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt: the first tokens of every example answering it."""
    return _encode(tokenizer, _pieces(tokenizer, prompt_turns(prompt), answer_next=True))[0]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Encoded | None:
    """The conversation's ids truncated to `max_length`, labels only on trained assistant
    turns.

    Returns None when no learned token is left within `max_length` (the prompt fills it, or
    no trained turn starts before it); callers count and report those.
    """
    input_ids, labels = _encode(tokenizer, _pieces(tokenizer, example.turns, answer_next=False))
    encoded = Encoded(input_ids[:max_length], labels[:max_length])
    return encoded if encoded.response_tokens else None


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> tuple[list[Encoded], int]:
    """Encode all examples; also return how many were dropped for having no learned token."""
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


def mix_poison(
    clean: Sequence[Example], poison: Sequence[Example], ratio: float, seed: int
) -> tuple[list[Example], int]:
    """Training rows with `round(ratio * len(clean))` of them poison, and that count.

    The total stays `len(clean)`, as in the harmful fine-tuning papers (a fixed budget of
    which a share is harmful): the first clean rows are kept and the poison rows are drawn
    without replacement from `poison`, in an order shuffled by `seed`. The training loop
    shuffles every epoch, so where they sit in the list does not matter.
    """
    count = round(ratio * len(clean))
    if count > len(poison):
        raise ValueError(
            f"utility_data.poison: ratio {ratio} of {len(clean)} utility rows needs {count} "
            f"poison rows, but its source has {len(poison)}"
        )
    order = list(range(len(poison)))
    random.Random(seed).shuffle(order)
    return [*clean[: len(clean) - count], *(poison[i] for i in order[:count])], count
