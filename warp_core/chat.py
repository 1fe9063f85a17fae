"""Chat data in OpenAI's fine-tuning format: one conversation per JSON line,
`{"messages": [{"role": "system" | "user" | "assistant", "content": "...", "weight": 0 | 1}]}`.

The rules a conversation follows live here once: `warp_core.data` applies them to every row
it loads, and `chat_problems` to a whole file, line by line, before a job runs (preflight)
or when a file is uploaded (the API). Standard library only, so the API can check a file
without loading torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

MESSAGES = "messages"
"""The column (JSON key) of a chat row that holds its conversation."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation. `trained` is OpenAI's `weight` (False for 0): whether
    an assistant turn is learned. System and user turns are never learned, whatever it says."""

    role: Role
    content: str
    trained: bool = True

    def message(self) -> dict[str, str]:
        """The message as a chat template reads it."""
        return {"role": self.role, "content": self.content}


def conversation(row: Any) -> tuple[Turn, ...]:
    """The turns of one chat row; raises ValueError saying what makes it invalid chat data
    (`messages[2].role must be one of system, user, assistant`)."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    messages = row.get(MESSAGES)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{MESSAGES} must be a non-empty list of messages")
    turns = tuple(_turn(index, message) for index, message in enumerate(messages))
    # A template cannot render what an opening assistant turn answers: there is nothing.
    if turns[0].role == "assistant":
        raise ValueError(f"{MESSAGES}[0].role must be system or user (nothing to answer yet)")
    if not any(turn.role == "assistant" and turn.trained for turn in turns):
        raise ValueError("no assistant turn with weight 1")
    return turns


def _turn(index: int, message: Any) -> Turn:
    where = f"{MESSAGES}[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string")
    # None is an absent weight: loading a file gives every message the keys of all of them.
    weight = message.get("weight")
    if weight is None:
        return Turn(role, content)
    if role != "assistant":
        raise ValueError(f"{where}.weight is only allowed on assistant messages")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(f"{where}.weight must be 0 or 1")
    return Turn(role, content, weight == 1)


def chat_problems(path: str | Path, limit: int = 20) -> list[str]:
    """Why a chat JSON Lines file is not valid chat data, as `line N: reason` for its first
    `limit` invalid lines; empty when it is valid.

    Lines are read one at a time (time linear in the file's size, memory of one line), and
    reading stops at the `limit`-th problem. Blank lines are skipped, as loading skips them;
    line numbers count them, as an editor does.
    """
    problems: list[str] = []
    conversations = 0
    with Path(path).open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            conversations += 1
            problem = _line_problem(line)
            if problem is not None:
                problems.append(f"line {number}: {problem}")
                if len(problems) == limit:
                    break
    if not conversations:
        return ["the file holds no conversation"]
    return problems


def _line_problem(line: bytes) -> str | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at column {exc.colno})"
    try:
        conversation(row)
    except ValueError as exc:
        return str(exc)
    return None
