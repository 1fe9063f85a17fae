"""Cheap checks of a job before any GPU time is spent: can its model and data be found, and
do the data have the fields the spec names? Loads configs and a few rows, never weights; a
chat JSONL file is read whole, one line at a time, so an invalid conversation is reported by
its line before the job starts."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from warp_core.chat import chat_problems, conversation
from warp_core.data import dataset_fields, load_rows
from warp_core.spec import REFUSAL_SETS, DatasetRef, JobSpec


class PreflightError(ValueError):
    """The job cannot run as specified; the message says why, one problem per line."""


def check_spec(spec: JobSpec) -> None:
    """Raise PreflightError listing every problem found, or return quietly."""
    problems = _model_problems(spec.base_model)
    for where, ref in spec.dataset_refs():
        prompts_only = where in REFUSAL_SETS
        problems += [f"{where}: {problem}" for problem in _data_problems(ref, prompts_only)]
    if problems:
        raise PreflightError("\n".join(problems))


def _model_problems(base_model: str) -> list[str]:
    path = Path(base_model).expanduser()
    if base_model.startswith(("/", ".", "~")) and not path.is_dir():
        return [f"base_model: no such directory: {base_model}"]
    try:
        AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    except Exception as exc:  # any loader failure means the same thing to the user
        return [f"base_model: cannot load a model config from {base_model!r}: {exc}"]
    return []


def _data_problems(ref: DatasetRef, prompts_only: bool = False) -> list[str]:
    path = Path(ref.source).expanduser()
    if ref.preset == "chat" and ref.is_local and path.suffix.lower() == ".jsonl":
        try:
            problems = chat_problems(path)
        except OSError as exc:
            return [f"cannot read {ref.source!r}: {exc}"]
        if problems:
            return [f"{ref.source!r} {problem}" for problem in problems]
    try:
        first = load_rows(ref.model_copy(update={"limit": 1}))[0]
    except Exception as exc:
        return [f"cannot read {ref.source!r}: {exc}"]
    if ref.preset == "chat":  # beyond a JSONL file, the first row here; loading checks all
        try:
            conversation(first)
        except ValueError as exc:
            return [f"{ref.source!r} row {ref.offset}: {exc}"]
        return []
    columns = set(first)
    needed = {field for field in dataset_fields(ref, columns, prompts_only) if field}
    if ref.preset == "mbpp":
        needed.add("test_list")
    missing = sorted(str(column) for column in needed - columns)
    if missing:
        return [f"{ref.source!r} has no column {', '.join(missing)} (has {sorted(columns)})"]
    return []
