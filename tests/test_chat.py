"""Chat data (OpenAI's `messages` JSONL, `preset: "chat"`): the label mask of a multi-turn
conversation token by token, the one-turn case against prompt/response pairs, weights,
truncation, the prompt evaluation answers, every validation problem with its line, preflight,
and a WaRP job on chat files from end to end. Offline, on the tiny models of warp_core.testing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from warp_core.chat import Turn, chat_problems, conversation
from warp_core.data import (
    IGNORE_INDEX,
    Example,
    encode_example,
    encode_examples,
    encode_prompt,
    load_examples,
)
from warp_core.pipeline import Pipeline
from warp_core.preflight import PreflightError, check_spec
from warp_core.spec import DatasetRef, JobSpec
from warp_core.testing import SAFETY_SLICE, UTILITY_SLICE

SYSTEM = "You are a careful assistant."
DIALOG = [
    ("system", SYSTEM),
    ("user", "Tom has 3 apples and buys 4 more. How many apples does he have?"),
    ("assistant", "He has 3 + 4 = 7 apples."),
    ("user", "And if he eats 2 of them?"),
    ("assistant", "He has 7 - 2 = 4 apples.", 0),  # a wrong answer, left out of the loss
    ("user", "Check that again."),
    ("assistant", "7 - 2 = 5, so he has 5 apples."),
]
"""System, user, assistant, user, assistant with weight 0, user, assistant."""


def chat_row(*turns: tuple) -> dict[str, Any]:
    """`{"messages": [...]}` from (role, content) or (role, content, weight) tuples."""
    messages = [{"role": role, "content": content} for role, content, *_ in turns]
    for message, (_, _, *weight) in zip(messages, turns, strict=True):
        if weight:
            message["weight"] = weight[0]
    return {"messages": messages}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module", autouse=True)
def private_datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep the Arrow caches `load_dataset` writes for the test files out of the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf"))
        yield


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template: the plain fallback renders."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


@pytest.fixture(scope="module")
def dialog() -> Example:
    return Example.of(conversation(chat_row(*DIALOG)))


# --- the label mask, token by token ----------------------------------------------------------


def test_multi_turn_labels_follow_the_chat_template_token_by_token(tokenizer, dialog) -> None:
    """Every token of the template's rendering is learned exactly when it lies in a trained
    assistant turn: its answer and the `<|im_end|>` closing it (not the newline after)."""
    messages = chat_row(*DIALOG)["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    learned_spans, cursor = [], 0
    for message in messages:
        start = rendered.index(message["content"], cursor)
        cursor = start + len(message["content"])
        if message["role"] == "assistant":
            cursor = rendered.index("<|im_end|>", cursor) + len("<|im_end|>")
            if message.get("weight", 1):
                learned_spans.append((start, cursor))
    text = rendered.removesuffix("\n")  # nothing after the last end-of-turn is learned
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)

    encoded = encode_example(tokenizer, dialog, max_length=4096)
    assert encoded is not None
    assert encoded.input_ids == whole["input_ids"]
    assert tokenizer.decode(encoded.input_ids) == text
    for position, (token, label, (start, end)) in enumerate(
        zip(encoded.input_ids, encoded.labels, whole["offset_mapping"], strict=True)
    ):
        inside = any(lo <= start and end <= hi for lo, hi in learned_spans)
        piece = tokenizer.convert_ids_to_tokens(token)
        assert label == (token if inside else IGNORE_INDEX), (position, piece, label)
    learned = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == f"{DIALOG[2][1]}<|im_end|>{DIALOG[6][1]}<|im_end|>"


def test_multi_turn_pieces_are_the_chatml_turns(tokenizer, dialog) -> None:
    """The same mask written out by hand: what ChatML renders, piece by piece."""
    (_, s), (_, u1), (_, a1), (_, u2), (_, a2, _), (_, u3), (_, a3) = DIALOG
    turn = "<|im_start|>{}\n{}<|im_end|>\n"
    answer = "<|im_start|>assistant\n"
    pieces = [
        (turn.format("system", s) + turn.format("user", u1) + answer, False),
        (f"{a1}<|im_end|>", True),
        ("\n" + turn.format("user", u2) + answer, False),
        (f"{a2}<|im_end|>", False),  # weight 0
        ("\n" + turn.format("user", u3) + answer, False),
        (f"{a3}<|im_end|>", True),
    ]
    input_ids, labels = [], []
    for text, learned in pieces:
        ids = tokens(tokenizer, text)
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    encoded = encode_example(tokenizer, dialog, max_length=4096)
    assert encoded is not None
    assert (encoded.input_ids, encoded.labels) == (input_ids, labels)


def test_multi_turn_without_a_chat_template_uses_the_plain_headers(plain_tokenizer, dialog):
    (_, s), (_, u1), (_, a1), (_, u2), (_, a2, _), (_, u3), (_, a3) = DIALOG
    eos = plain_tokenizer.eos_token
    pieces = [
        (f"### System:\n{s}\n\n### User:\n{u1}\n\n### Assistant:\n", False),
        (f"{a1}{eos}", True),
        (f"\n\n### User:\n{u2}\n\n### Assistant:\n", False),
        (f"{a2}{eos}", False),
        (f"\n\n### User:\n{u3}\n\n### Assistant:\n", False),
        (f"{a3}{eos}", True),
    ]
    input_ids, labels = [plain_tokenizer.bos_token_id], [IGNORE_INDEX]
    for text, learned in pieces:
        ids = tokens(plain_tokenizer, text)
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    encoded = encode_example(plain_tokenizer, dialog, max_length=4096)
    assert encoded is not None
    assert (encoded.input_ids, encoded.labels) == (input_ids, labels)


# --- the one-turn case and the prompt/response presets --------------------------------------


@pytest.fixture(scope="module")
def gsm8k_pairs() -> list[Example]:
    return load_examples(DatasetRef(source=str(UTILITY_SLICE), preset="gsm8k", limit=12))


@pytest.mark.parametrize("template", [True, False], ids=["template", "plain"])
def test_a_one_turn_chat_row_encodes_like_the_pair(
    tokenizer, plain_tokenizer, gsm8k_pairs, tmp_path, template: bool
) -> None:
    tok = tokenizer if template else plain_tokenizer
    chat_file = write_jsonl(
        tmp_path / "chat.jsonl",
        [chat_row(("user", ex.prompt), ("assistant", ex.response)) for ex in gsm8k_pairs],
    )
    chats = load_examples(DatasetRef(source=str(chat_file), preset="chat"))
    assert [chat.prompt for chat in chats] == [(Turn("user", ex.prompt),) for ex in gsm8k_pairs]
    assert [chat.response for chat in chats] == [ex.response for ex in gsm8k_pairs]
    for max_length in (48, 4096):  # truncated and whole
        assert encode_examples(tok, chats, max_length) == encode_examples(
            tok, gsm8k_pairs, max_length
        )
    for chat, pair in zip(chats, gsm8k_pairs, strict=True):
        assert encode_prompt(tok, chat.prompt) == encode_prompt(tok, pair.prompt)


# --- what is learned and what is answered ----------------------------------------------------


@pytest.mark.parametrize("weights", [(1, 0, 1), (0, 1, 0), (1, 1, 1), (0, 0, 1), (1, 0, 0)])
@pytest.mark.parametrize("template", [True, False], ids=["template", "plain"])
def test_only_assistant_turns_of_weight_1_are_learned(
    tokenizer, plain_tokenizer, weights: tuple[int, ...], template: bool
) -> None:
    tok = tokenizer if template else plain_tokenizer
    answers = ["Paris.", "Twelve.", "Blue."]
    turns = [("system", SYSTEM)]
    for number, (answer, weight) in enumerate(zip(answers, weights, strict=True)):
        turns += [("user", f"Question {number}?"), ("assistant", answer, weight)]
    example = Example.of(conversation(chat_row(*turns)))
    encoded = encode_example(tok, example, max_length=4096)
    assert encoded is not None
    learned = [label for label in encoded.labels if label != IGNORE_INDEX]
    expected = "".join(f"{a}{tok.eos_token}" for a, w in zip(answers, weights, strict=True) if w)
    assert tok.decode(learned) == expected
    assert example.trained == bool(weights[-1])


def test_the_prompt_answered_is_the_conversation_before_its_last_assistant_turn(
    tokenizer, dialog
) -> None:
    *before, last = conversation(chat_row(*DIALOG))
    assert dialog.prompt == tuple(before) and dialog.response == last.content
    prompt_ids = encode_prompt(tokenizer, dialog.prompt)
    encoded = encode_example(tokenizer, dialog, max_length=4096)
    assert encoded is not None
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids  # the tokens it was trained on
    assert tokenizer.decode(prompt_ids).endswith(
        f"{DIALOG[5][1]}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(encoded.input_ids[len(prompt_ids) :]) == f"{last.content}<|im_end|>"


def test_turns_after_the_last_assistant_turn_are_left_out(tokenizer) -> None:
    trailing = Example.of(conversation(chat_row(*DIALOG, ("user", "Thanks!"))))
    assert trailing == Example.of(conversation(chat_row(*DIALOG)))


def test_truncation_keeps_what_fits_and_drops_what_learns_nothing(tokenizer, dialog) -> None:
    full = encode_example(tokenizer, dialog, max_length=4096)
    assert full is not None
    learned = [i for i, label in enumerate(full.labels) if label != IGNORE_INDEX]
    first_answer_end = next(i for i, j in pairwise(learned) if j != i + 1)
    # Cut inside the weight-0 turn: the first answer is kept whole, nothing after it learned.
    cut = encode_example(tokenizer, dialog, max_length=first_answer_end + 8)
    assert cut is not None
    assert cut.input_ids == full.input_ids[: first_answer_end + 8]
    assert cut.labels == full.labels[: first_answer_end + 8]
    assert cut.response_tokens == first_answer_end + 1 - learned[0]
    # Cut before the first learned token: dropped, and counted.
    assert encode_example(tokenizer, dialog, max_length=learned[0]) is None
    kept, dropped = encode_examples(tokenizer, [dialog, dialog], max_length=learned[0])
    assert (kept, dropped) == ([], 2)
    kept, dropped = encode_examples(tokenizer, [dialog], max_length=learned[0] + 1)
    assert dropped == 0 and kept[0].response_tokens == 1


# --- validation: every problem with its line -------------------------------------------------


def assistant(content: str = "Fine.", **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **extra}


USER = {"role": "user", "content": "Hello?"}
LINES: list[tuple[str | bytes, str | None]] = [
    (json.dumps(chat_row(*DIALOG)), None),
    ("not json", "not JSON (Expecting value at column 1)"),
    ("", None),  # blank lines are skipped, and counted
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"prompt": "a", "response": "b"}), "messages must be a non-empty list of messages"),
    (json.dumps({"messages": []}), "messages must be a non-empty list of messages"),
    (json.dumps({"messages": ["Hello?"]}), "messages[0] must be an object"),
    (
        json.dumps({"messages": [USER, assistant(), {"role": "tool", "content": "42"}]}),
        "messages[2].role must be one of system, user, assistant",
    ),
    (json.dumps({"messages": [{"content": "Hello?"}]}), "messages[0].role must be one of "),
    (json.dumps({"messages": [USER, assistant(None)]}), "messages[1].content must be a string"),
    (
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        "messages[0].content must be a string",
    ),
    (
        json.dumps({"messages": [{**USER, "weight": 1}, assistant()]}),
        "messages[0].weight is only allowed on assistant messages",
    ),
    (json.dumps({"messages": [USER, assistant(weight=2)]}), "messages[1].weight must be 0 or 1"),
    (json.dumps({"messages": [USER, assistant(weight=True)]}), "messages[1].weight must be 0 or 1"),
    (json.dumps({"messages": [USER, assistant(weight="1")]}), "messages[1].weight must be 0 or 1"),
    (
        json.dumps({"messages": [assistant(), USER, assistant()]}),
        "messages[0].role must be system or user (nothing to answer yet)",
    ),
    (json.dumps({"messages": [USER, assistant(weight=0)]}), "no assistant turn with weight 1"),
    (json.dumps({"messages": [USER]}), "no assistant turn with weight 1"),
    (b'{"messages": "\xff"}', "not UTF-8 text"),
    (json.dumps({"messages": [USER, assistant(weight=1.0)], "id": 7}), None),
]
"""(line, its problem or None when it is valid): each line of the file below."""


@pytest.fixture()
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    encoded = [line if isinstance(line, bytes) else line.encode() for line, _ in LINES]
    path.write_bytes(b"\n".join(encoded) + b"\n")
    return path


def test_every_problem_is_reported_with_its_line(bad_file: Path) -> None:
    problems = chat_problems(bad_file)
    expected = [(number, why) for number, (_, why) in enumerate(LINES, 1) if why is not None]
    assert len(problems) == len(expected)
    for problem, (number, why) in zip(problems, expected, strict=True):
        assert problem.startswith(f"line {number}: {why}"), problem


def test_validation_stops_at_its_limit(bad_file: Path) -> None:
    assert chat_problems(bad_file, limit=2) == chat_problems(bad_file)[:2]


def test_a_valid_file_has_no_problem_and_an_empty_one_has_one(tmp_path: Path) -> None:
    valid = write_jsonl(tmp_path / "ok.jsonl", [chat_row(*DIALOG)] * 3)
    assert chat_problems(valid) == []
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n", encoding="utf-8")
    assert chat_problems(blank) == ["the file holds no conversation"]


def test_chat_validation_loads_without_torch() -> None:
    """The API checks uploads with it, and loads no torch to do so."""
    code = (
        "import sys, warp_core.chat\n"
        "heavy = {'torch', 'datasets', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- loading and preflight -------------------------------------------------------------------


def test_chat_rows_load_with_offset_limit_and_weights(tmp_path: Path) -> None:
    def turns(i: int) -> tuple[Turn, ...]:
        return (Turn("user", f"Q{i}"), Turn("assistant", f"A{i}", bool(i % 2)), Turn("user", "?"))

    rows = [
        chat_row(
            ("user", f"Q{i}"), ("assistant", f"A{i}", i % 2), ("user", "?"), ("assistant", "B")
        )
        for i in range(1, 6)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples = load_examples(DatasetRef(source=str(path), preset="chat", offset=1, limit=3))
    assert [(ex.prompt, ex.response, ex.trained) for ex in examples] == [
        (turns(i), "B", True) for i in range(2, 5)
    ]
    assert all(ex.meta == {} for ex in examples)


def test_an_invalid_row_fails_loading_with_its_number(tmp_path: Path) -> None:
    rows = [chat_row(*DIALOG), chat_row(("user", "Hi"), ("assistant", "Hello", 0))]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match=r"chat\.jsonl: row 1: no assistant turn with weight 1"):
        load_examples(DatasetRef(source=str(path), preset="chat"))


def chat_spec(model_dir: Path, safety: Path, utility: Path, **extra: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base_model": str(model_dir),
            "safety_data": {"source": str(safety), "preset": "chat"},
            "utility_data": {"source": str(utility), "preset": "chat"},
            "eval": {"enabled": False},
            **extra,
        }
    )


def test_preflight_reports_a_chat_file_by_line(model_dir, bad_file: Path, tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [chat_row(*DIALOG)] * 2)
    check_spec(chat_spec(model_dir, good, good))
    with pytest.raises(PreflightError) as info:
        check_spec(chat_spec(model_dir, good, bad_file))
    lines = str(info.value).splitlines()
    assert lines[0] == f"utility_data: {str(bad_file)!r} line 2: " + LINES[1][1]
    assert len(lines) == sum(why is not None for _, why in LINES)


def test_preflight_reads_the_first_row_of_other_chat_sources(model_dir, tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [chat_row(*DIALOG)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}])
    parquet = tmp_path / "chat.parquet"
    pd.DataFrame([chat_row(("user", "Hi"), ("assistant", "Hello", 0))]).to_parquet(parquet)
    with pytest.raises(PreflightError) as info:
        check_spec(chat_spec(model_dir, parquet, pairs))
    assert str(info.value).splitlines() == [
        f"safety_data: {str(parquet)!r} row 0: no assistant turn with weight 1",
        f"utility_data: {str(pairs)!r} line 1: messages must be a non-empty list of messages",
    ]
    check_spec(chat_spec(model_dir, good, good))


# --- a WaRP job on chat files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Refusals with a system prompt, and GSM8K as two-question conversations whose first
    answer is shown (weight 0) and second learned; held-out sets in the same form."""
    out = tmp_path_factory.mktemp("chat-data")
    refusals = load_examples(DatasetRef(source=str(SAFETY_SLICE), preset="do-not-answer"))
    problems = load_examples(DatasetRef(source=str(UTILITY_SLICE), preset="gsm8k"))

    def safety(examples: list[Example]) -> list[dict[str, Any]]:
        return [
            chat_row(("system", SYSTEM), ("user", ex.prompt), ("assistant", ex.response))
            for ex in examples
        ]

    def utility(examples: list[Example]) -> list[dict[str, Any]]:
        pairs = zip(examples[::2], examples[1::2], strict=True)
        return [
            chat_row(
                ("user", first.prompt),
                ("assistant", first.response, 0),
                ("user", second.prompt),
                ("assistant", second.response),
            )
            for first, second in pairs
        ]

    return {
        "safety": write_jsonl(out / "safety.jsonl", safety(refusals[:24])),
        "harmful": write_jsonl(out / "harmful.jsonl", safety(refusals[24:28])),
        "utility": write_jsonl(out / "utility.jsonl", utility(problems[:64])),
        "benign": write_jsonl(out / "benign.jsonl", utility(problems[64:72])),
        "held_out": write_jsonl(out / "held-out.jsonl", utility(problems[72:80])),
    }


def test_a_warp_job_runs_and_trains_on_chat_files(model_dir, chat_files, tmp_path) -> None:
    def ref(name: str) -> dict[str, Any]:
        return {"source": str(chat_files[name]), "preset": "chat"}

    spec = chat_spec(
        model_dir,
        chat_files["safety"],
        chat_files["utility"],
        eval={
            "harmful": ref("harmful"),
            "benign": ref("benign"),
            "contrast": ref("harmful"),
            "utility": ref("held_out"),
            "max_new_tokens": 8,
        },
        hyperparameters={
            "max_length": 768,  # the longest conversation, in the tiny tokenizer
            "batch_size": 4,
            "grad_accum_steps": 2,
            "epochs": 1,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "basis_batch_size": 4,
        },
    )
    check_spec(spec)
    events = []
    metrics = Pipeline(spec, tmp_path, events.append).run()

    assert (metrics["training"]["steps"], metrics["training"]["examples"]) == (4, 32)
    assert not [e for e in events if "dropped" in e.data.get("message", "")]
    before, after = metrics["before"], metrics["after"]
    rates = {"refusal_rate", "over_refusal_rate", "contrast_refusal_rate"}
    assert set(before) == set(after) == rates | {"utility_loss"}
    assert after["utility_loss"] < before["utility_loss"]
    samples = json.loads((tmp_path / "eval" / "after.json").read_text())["samples"]
    assert len(samples["harmful"]) == 4 and len(samples["benign"]) == 4
    assert [m["role"] for m in samples["harmful"][0]["prompt"]] == ["system", "user"]
    assert [m["role"] for m in samples["benign"][0]["prompt"]] == ["user", "assistant", "user"]
    base = load_file(model_dir / "model.safetensors")
    final = load_file(tmp_path / "model" / "model.safetensors")
    masks = load_file(tmp_path / "warp" / "masks.safetensors")
    assert set(masks) and all(not torch.equal(final[name], base[name]) for name in masks)
