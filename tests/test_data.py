"""Datasets to token batches on real files: local CSV/JSON/JSONL/Parquet loading and slicing,
the do-not-answer / GSM8K / MBPP presets on the shared offline copies, chat-template and plain
rendering, label masking, truncation, collation and the per-epoch shuffle. Offline only."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

from warp_core.data import (
    IGNORE_INDEX,
    Encoded,
    Example,
    batches,
    collate,
    encode_example,
    encode_examples,
    encode_prompt,
    epoch_order,
    load_examples,
    load_rows,
    pad_token_id,
    render_prompt,
    render_response,
)
from warp_core.spec import DatasetRef
from warp_core.testing import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DO_NOT_ANSWER = SHARED_DATA / "do-not-answer" / "data_en.csv"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
MBPP = SHARED_DATA / "mbpp" / "mbpp.jsonl"

ROWS = [
    {"instruction": f"Question number {i}, with a comma", "output": f"Answer {i}\nline two", "n": i}
    for i in range(6)
]


@pytest.fixture(scope="module", autouse=True)
def private_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the Arrow caches `load_dataset` writes for the test files out of the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf"))
        yield


def write_rows(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        frame.to_parquet(path, index=False)
    return path


def local_ref(path: Path, **fields) -> DatasetRef:
    return DatasetRef(
        source=str(path), **{"prompt_field": "instruction", "response_field": "output", **fields}
    )


def read_jsonl(path: Path, limit: int) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(limit), handle, strict=False)]


# --- loading local files --------------------------------------------------------------------


@pytest.fixture(params=["csv", "json", "jsonl", "parquet"])
def local_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return write_rows(tmp_path / f"pairs.{request.param}", ROWS)


def test_local_file_loads_whole(local_file: Path) -> None:
    examples = load_examples(local_ref(local_file))
    assert [ex.prompt for ex in examples] == [row["instruction"] for row in ROWS]
    assert [ex.response for ex in examples] == [row["output"] for row in ROWS]
    assert all(ex.meta == {} for ex in examples)


def test_local_file_offset_and_limit(local_file: Path) -> None:
    examples = load_examples(local_ref(local_file, offset=2, limit=3))
    assert [ex.prompt for ex in examples] == [row["instruction"] for row in ROWS[2:5]]
    assert [ex.response for ex in examples] == [row["output"] for row in ROWS[2:5]]


def test_limit_past_the_end_is_clipped(local_file: Path) -> None:
    examples = load_examples(local_ref(local_file, offset=4, limit=100))
    assert [ex.prompt for ex in examples] == [row["instruction"] for row in ROWS[4:]]


def test_non_string_columns_become_text(local_file: Path) -> None:
    examples = load_examples(local_ref(local_file, prompt_field="n", limit=2))
    assert [ex.prompt for ex in examples] == ["0", "1"]


def test_load_rows_keeps_every_column(local_file: Path) -> None:
    rows = load_rows(local_ref(local_file, offset=1, limit=1))
    assert rows == [ROWS[1]]


@pytest.mark.parametrize("which", ["prompt_field", "response_field"])
def test_missing_column_is_named(local_file: Path, which: str) -> None:
    with pytest.raises(ValueError, match=rf"{which} 'no_such_column' is not a column") as info:
        load_examples(local_ref(local_file, **{which: "no_such_column"}))
    assert "instruction" in str(info.value)  # the columns that do exist are listed


@pytest.mark.parametrize(("offset", "limit"), [(6, None), (6, 1), (50, 10)])
def test_offset_beyond_the_end_is_an_error(
    local_file: Path, offset: int, limit: int | None
) -> None:
    with pytest.raises(ValueError, match=rf"offset {offset} leaves no rows \(the dataset has 6\)"):
        load_examples(local_ref(local_file, offset=offset, limit=limit))


def test_missing_local_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.csv"):
        load_examples(local_ref(tmp_path / "absent.csv"))


def test_empty_response_cell_becomes_empty_text(tmp_path: Path) -> None:
    path = tmp_path / "holes.csv"
    path.write_text('instruction,output\n"a, b",x\nc,\n', encoding="utf-8")
    examples = load_examples(local_ref(path))
    assert [(ex.prompt, ex.response) for ex in examples] == [("a, b", "x"), ("c", "")]


# --- presets on the shared offline copies ---------------------------------------------------


def test_do_not_answer_preset() -> None:
    with DO_NOT_ANSWER.open(encoding="utf-8", newline="") as handle:
        expected = [row for _, row in zip(range(13), csv.DictReader(handle), strict=False)]
    examples = load_examples(
        DatasetRef(source=str(DO_NOT_ANSWER), preset="do-not-answer", offset=3, limit=10)
    )
    assert len(examples) == 10
    for example, row in zip(examples, expected[3:], strict=True):
        assert example.prompt == row["question"]
        assert example.response == row["llama2-7b-chat_response"]
        assert example.meta == {}


def test_gsm8k_preset() -> None:
    expected = read_jsonl(GSM8K_TRAIN, 5)
    examples = load_examples(DatasetRef(source=str(GSM8K_TRAIN), preset="gsm8k", limit=5))
    assert [ex.prompt for ex in examples] == [row["question"] for row in expected]
    assert [ex.response for ex in examples] == [row["answer"] for row in expected]
    assert [ex.meta for ex in examples] == [{"answer": row["answer"]} for row in expected]
    assert all("####" in ex.meta["answer"] for ex in examples)


def test_mbpp_preset() -> None:
    expected = read_jsonl(MBPP, 12)[10:]
    examples = load_examples(DatasetRef(source=str(MBPP), preset="mbpp", offset=10, limit=2))
    assert len(examples) == 2
    for example, row in zip(examples, expected, strict=True):
        assert example.prompt.startswith(row["text"])
        assert len(row["test_list"]) == 3
        for test in row["test_list"]:
            assert test.startswith("assert ")
            assert test in example.prompt
        assert example.response == row["code"]
        assert example.meta["test_list"] == row["test_list"]
        assert example.meta["test_setup_code"] == row["test_setup_code"]
        assert example.meta["task_id"] == row["task_id"]


def test_mbpp_explicit_prompt_field_overrides_the_preset_prompt() -> None:
    row = read_jsonl(MBPP, 1)[0]
    (example,) = load_examples(
        DatasetRef(source=str(MBPP), preset="mbpp", prompt_field="text", limit=1)
    )
    assert example.prompt == row["text"]
    assert example.meta["test_list"] == row["test_list"]


# --- rendering and encoding with a chat template --------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    questions = [row["question"] for row in read_jsonl(GSM8K_TRAIN, 300)]
    return train_tokenizer(questions, vocab_size=512)


@pytest.fixture(scope="module")
def plain_tokenizer():
    questions = [row["question"] for row in read_jsonl(GSM8K_TRAIN, 300)]
    tok = train_tokenizer(questions, vocab_size=512)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def gsm8k_examples() -> list[Example]:
    return load_examples(DatasetRef(source=str(GSM8K_TRAIN), preset="gsm8k", limit=4))


PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?"
RESPONSE = "He has 3 + 4 = 7 apples.\n#### 7"


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_render_prompt_ends_with_the_generation_prompt(tokenizer) -> None:
    text = render_prompt(tokenizer, PROMPT)
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert text.endswith("<|im_start|>assistant\n")


def test_prompt_plus_response_is_the_full_dialog(tokenizer, gsm8k_examples) -> None:
    for ex in [Example(PROMPT, RESPONSE), *gsm8k_examples]:
        full = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": ex.prompt},
                {"role": "assistant", "content": ex.response},
            ],
            tokenize=False,
        )
        rendered = render_prompt(tokenizer, ex.prompt) + render_response(
            tokenizer, ex.prompt, ex.response
        )
        # The dialog up to and including the assistant's end-of-turn token.
        assert rendered == full.rstrip("\n")
        assert render_response(tokenizer, ex.prompt, ex.response).startswith(ex.response)


def test_encode_prompt_is_the_rendered_prompt_without_extra_specials(tokenizer) -> None:
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    assert prompt_ids == ids(tokenizer, render_prompt(tokenizer, PROMPT))
    assert prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt_ids.count(tokenizer.bos_token_id) == 2  # user and assistant turns only
    assert tokenizer.decode(prompt_ids) == render_prompt(tokenizer, PROMPT)


def test_encode_example_masks_exactly_the_prompt(tokenizer, gsm8k_examples) -> None:
    for ex in [Example(PROMPT, RESPONSE), *gsm8k_examples]:
        prompt_ids = encode_prompt(tokenizer, ex.prompt)
        response_ids = ids(tokenizer, render_response(tokenizer, ex.prompt, ex.response))
        encoded = encode_example(tokenizer, ex, max_length=1024)
        assert encoded is not None
        assert encoded.input_ids == prompt_ids + response_ids
        assert encoded.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert encoded.labels[len(prompt_ids) :] == encoded.input_ids[len(prompt_ids) :]
        assert IGNORE_INDEX not in encoded.labels[len(prompt_ids) :]
        assert encoded.response_tokens == len(response_ids)


def test_response_is_the_answer_then_eos(tokenizer) -> None:
    encoded = encode_example(tokenizer, Example(PROMPT, RESPONSE), max_length=1024)
    assert encoded is not None
    eos = tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
    learned = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert learned[-1] == eos  # the model is taught to stop, and nothing after that
    assert tokenizer.decode(learned[:-1]) == RESPONSE


def test_truncation_keeps_the_prompt_and_cuts_the_response(tokenizer) -> None:
    example = Example(PROMPT, RESPONSE)
    full = encode_example(tokenizer, example, max_length=1024)
    assert full is not None
    n_prompt = len(encode_prompt(tokenizer, PROMPT))
    assert full.response_tokens > 3
    cut = encode_example(tokenizer, example, max_length=n_prompt + 3)
    assert cut is not None
    assert len(cut.input_ids) == len(cut.labels) == n_prompt + 3
    assert cut.input_ids == full.input_ids[: n_prompt + 3]
    assert cut.labels == full.labels[: n_prompt + 3]
    assert cut.input_ids[:n_prompt] == encode_prompt(tokenizer, PROMPT)
    assert cut.response_tokens == 3


@pytest.mark.parametrize("shortfall", [0, 5])
def test_prompt_filling_max_length_is_dropped(tokenizer, shortfall: int) -> None:
    long_prompt = " ".join([PROMPT] * 6)
    max_length = len(encode_prompt(tokenizer, long_prompt)) - shortfall
    assert encode_example(tokenizer, Example(long_prompt, RESPONSE), max_length) is None
    examples = [Example(PROMPT, RESPONSE), Example(long_prompt, RESPONSE), Example("Hi", "Hello")]
    kept, dropped = encode_examples(tokenizer, examples, max_length)
    assert dropped == 1
    assert kept == [encode_example(tokenizer, examples[i], max_length) for i in (0, 2)]


# --- the plain fallback (no chat template) --------------------------------------------------


def test_plain_prompt_format(plain_tokenizer) -> None:
    assert not plain_tokenizer.chat_template
    text = render_prompt(plain_tokenizer, PROMPT)
    assert text == f"### User:\n{PROMPT}\n\n### Assistant:\n"
    prompt_ids = encode_prompt(plain_tokenizer, PROMPT)
    assert prompt_ids == [plain_tokenizer.bos_token_id, *ids(plain_tokenizer, text)]


def test_plain_response_ends_with_eos(plain_tokenizer) -> None:
    assert render_response(plain_tokenizer, PROMPT, RESPONSE) == RESPONSE + "<|im_end|>"
    encoded = encode_example(plain_tokenizer, Example(PROMPT, RESPONSE), max_length=1024)
    assert encoded is not None
    prompt_ids = encode_prompt(plain_tokenizer, PROMPT)
    response_ids = [*ids(plain_tokenizer, RESPONSE), plain_tokenizer.eos_token_id]
    assert encoded.input_ids == prompt_ids + response_ids
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert encoded.input_ids[0] == plain_tokenizer.bos_token_id
    assert encoded.input_ids[-1] == plain_tokenizer.eos_token_id


def test_chat_template_tokenizer_is_unaffected_by_the_plain_copy(tokenizer, plain_tokenizer):
    assert tokenizer.chat_template
    assert render_prompt(tokenizer, "x") != render_prompt(plain_tokenizer, "x")


# --- collation and ordering -----------------------------------------------------------------


ITEMS = [
    Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]),
    Encoded([8, 9, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12]),
    Encoded([13], [13]),
]


def test_collate_pads_on_the_right() -> None:
    batch = collate(ITEMS, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0, 0],
        [8, 9, 10, 11, 12],
        [13, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, -100],
        [-100, -100, 10, 11, 12],
        [13, -100, -100, -100, -100],
    ]


def test_collate_uses_the_pad_id_only_for_padding() -> None:
    batch = collate(ITEMS, pad_id=99)
    assert (batch["input_ids"] == 99).sum().item() == 6
    assert ((batch["input_ids"] == 99) == (batch["attention_mask"] == 0)).all()


def test_collate_of_real_encodings(tokenizer, gsm8k_examples) -> None:
    kept, dropped = encode_examples(tokenizer, gsm8k_examples, max_length=1024)
    assert dropped == 0
    pad = pad_token_id(tokenizer)
    assert pad == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = collate(kept, pad)
    for row, item in enumerate(kept):
        n = len(item.input_ids)
        assert batch["input_ids"][row, :n].tolist() == item.input_ids
        assert batch["labels"][row, :n].tolist() == item.labels
        assert batch["attention_mask"][row].sum().item() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == pad).all()


def test_batches_are_consecutive() -> None:
    out = list(batches(ITEMS, batch_size=2, pad_id=0))
    assert [b["input_ids"].shape[0] for b in out] == [2, 1]
    assert out[1]["input_ids"].tolist() == [[13]]


@pytest.mark.parametrize("n", [0, 1, 2, 17, 100])
def test_epoch_order_is_a_permutation(n: int) -> None:
    assert sorted(epoch_order(n, seed=3, epoch=1)) == list(range(n))


def test_epoch_order_is_deterministic_and_varies() -> None:
    n = 50
    assert epoch_order(n, seed=7, epoch=2) == epoch_order(n, seed=7, epoch=2)
    per_epoch = [tuple(epoch_order(n, seed=7, epoch=e)) for e in range(5)]
    assert len(set(per_epoch)) == 5
    assert epoch_order(n, seed=7, epoch=0) != epoch_order(n, seed=8, epoch=0)
    assert epoch_order(n, seed=7, epoch=0) != list(range(n))
