"""How `warp` commands print: messages on stderr, results on stdout, `--json` for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console(stderr=True)
"""Messages and progress: stdout stays for results."""

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def emit(payload: Any, as_json: bool, human: Callable[[Any], object]) -> None:
    """Print a result as JSON, or for people with `human`."""
    if as_json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        human(payload)
