"""A job's statuses: the one place they are spelled.

queued -> running -> succeeded | failed | cancelled; a running job being cancelled is
`cancelling` until its worker stops.
"""

from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
ACTIVE: tuple[JobStatus, ...] = tuple(s for s in STATUSES if s not in TERMINAL)
