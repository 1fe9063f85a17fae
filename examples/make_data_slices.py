"""Regenerate the data slices shipped in warp_core/example_data/ from the project's shared
datasets.

Run from the repository root:

    python examples/make_data_slices.py [--src ../shared/data] [--out warp_core/example_data]

Each slice is a verbatim prefix or selection of the shared file (JSON Lines rows are copied
byte for byte; the Do-Not-Answer CSVs keep a subset of their columns), so running this again
gives identical files. The NOTICE files and README.md beside the slices are written by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

from warp_core.testing import EXAMPLE_DATA

DNA_ROWS = 300
DNA_COLUMNS = (
    "id",
    "risk_area",
    "types_of_harm",
    "specific_harms",
    "question",
    "llama2-7b-chat_response",
)
DNA_QUESTION_COLUMNS = ("id", "risk_area", "question")
DNA_MODELS = ("GPT4", "ChatGPT", "Claude", "ChatGLM2", "llama2-7b-chat", "vicuna-7b")
"""The six models whose answers data_en.csv holds, each with a human `<model>_harmful` label."""
DNA_HARMFUL_COLUMNS = ("id", "risk_area", "types_of_harm", "question", "model", "response")
GSM8K_TRAIN_ROWS = 2400  # the toy aligned model (warp_core/toy.py) needs ~2,400 (was 400)
GSM8K_TEST_ROWS = 100
MBPP_TASK_IDS = range(601, 701)  # the first 100 tasks of MBPP's train split (601-974)


def write_csv(out: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> int:
    """`rows` with only `columns`, as Python's `csv` writes them (quoted where needed, LF line
    ends); the number of rows."""
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def slice_do_not_answer(src: Path, out: Path) -> int:
    """The first `DNA_ROWS` rows of data_en.csv, keeping only `DNA_COLUMNS`."""
    with src.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(DNA_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{src}: missing columns {sorted(missing)}")
        rows = [row for _, row in zip(range(DNA_ROWS), reader, strict=False)]
    if len(rows) != DNA_ROWS:
        raise ValueError(f"{src}: {len(rows)} rows, expected at least {DNA_ROWS}")
    return write_csv(out, rows, DNA_COLUMNS)


def do_not_answer_questions(src: Path, out: Path) -> int:
    """Every row of do_not_answer_en.csv (751), keeping only `DNA_QUESTION_COLUMNS`."""
    with src.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(DNA_QUESTION_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{src}: missing columns {sorted(missing)}")
        rows = list(reader)
    return write_csv(out, rows, DNA_QUESTION_COLUMNS)


def do_not_answer_harmful(src: Path, out: Path) -> int:
    """Every answer of data_en.csv that its annotators labelled harmful (`<model>_harmful`
    is 1), one row per answer, in file order and then `DNA_MODELS` order: the compliant
    answers that poisoned fine-tuning data mixes in (`utility_data.poison`)."""
    with src.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    answers = [
        {**row, "model": model, "response": row[f"{model}_response"]}
        for row in rows
        for model in DNA_MODELS
        if row[f"{model}_harmful"] == "1"
    ]
    return write_csv(out, answers, DNA_HARMFUL_COLUMNS)


def head_lines(src: Path, out: Path, n: int) -> int:
    """The first `n` lines of a JSON Lines file, copied byte for byte."""
    with src.open("rb") as f:
        lines = [line for _, line in zip(range(n), f, strict=False)]
    if len(lines) != n:
        raise ValueError(f"{src}: {len(lines)} rows, expected at least {n}")
    out.write_bytes(b"".join(lines))
    return len(lines)


def select_mbpp(src: Path, out: Path, task_ids: range) -> int:
    """The MBPP rows whose task_id is in `task_ids`, in file order, copied byte for byte."""
    wanted = set(task_ids)
    with src.open("rb") as f:
        lines = [line for line in f if json.loads(line)["task_id"] in wanted]
    if len(lines) != len(wanted):
        raise ValueError(f"{src}: found {len(lines)} of the {len(wanted)} wanted task ids")
    out.write_bytes(b"".join(lines))
    return len(lines)


def make_slices(src: Path, out: Path) -> dict[str, int]:
    """Write every slice (and gsm8k.LICENSE) into `out`; return the row count per file."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {
        "do-not-answer.csv": slice_do_not_answer(
            src / "do-not-answer" / "data_en.csv", out / "do-not-answer.csv"
        ),
        "do-not-answer-questions.csv": do_not_answer_questions(
            src / "do-not-answer" / "do_not_answer_en.csv", out / "do-not-answer-questions.csv"
        ),
        "do-not-answer-harmful.csv": do_not_answer_harmful(
            src / "do-not-answer" / "data_en.csv", out / "do-not-answer-harmful.csv"
        ),
        "gsm8k.jsonl": head_lines(
            src / "gsm8k" / "train.jsonl", out / "gsm8k.jsonl", GSM8K_TRAIN_ROWS
        ),
        "gsm8k-test.jsonl": head_lines(
            src / "gsm8k" / "test.jsonl", out / "gsm8k-test.jsonl", GSM8K_TEST_ROWS
        ),
        "mbpp.jsonl": select_mbpp(src / "mbpp" / "mbpp.jsonl", out / "mbpp.jsonl", MBPP_TASK_IDS),
    }
    shutil.copyfile(src / "gsm8k" / "LICENSE", out / "gsm8k.LICENSE")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data"), help="shared data dir")
    parser.add_argument("--out", type=Path, default=EXAMPLE_DATA, help="output dir")
    args = parser.parse_args(argv)
    counts = make_slices(args.src, args.out)
    total = 0
    for name, rows in counts.items():
        size = (args.out / name).stat().st_size
        total += size
        print(f"{args.out / name}: {rows} rows, {size:,} bytes")
    print(f"total: {total:,} bytes")


if __name__ == "__main__":
    main()
