"""What the pipeline reports while it runs, kept free of torch so clients can import it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


class Cancelled(Exception):
    """The job's should-stop check asked the pipeline to stop."""


@dataclass(frozen=True)
class Event:
    """A progress report. `kind` is phase_started, phase_finished, progress, log,
    `metrics` (`step`, `train_loss`, and `valid_loss` once taken: the step metrics that the
    results file and trackers record) or `checkpoint` (`step`, `path` of an exported model in
    the output directory, `metrics` at that step)."""

    kind: Literal["phase_started", "phase_finished", "progress", "log", "metrics", "checkpoint"]
    phase: str | None
    data: dict[str, Any] = field(default_factory=dict)


EventCallback = Callable[[Event], None]

OnBatch = Callable[[], None] | None
"""Called after every batch of a phase: the pipeline reports progress and may raise to cancel."""
