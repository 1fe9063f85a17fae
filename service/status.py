"""A job's statuses: the one place they are spelled.

queued -> running -> succeeded | failed | cancelled. A running job being cancelled is
`cancelling` until its worker stops. A job can be paused and resumed: a queued one is
`paused` at once; a running one is `pausing` until its worker stops it at its next step,
then `paused`, its checkpoint kept in its work directory. Resuming a paused job queues it
again, and its next worker continues from that checkpoint. A paused job holds no worker, so
it neither counts against a key's active jobs nor is watched by the reaper.
"""

from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal[
    "queued",
    "running",
    "pausing",
    "paused",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
]
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
ACTIVE: tuple[JobStatus, ...] = ("queued", "running", "pausing", "cancelling")
"""Holding a worker or waiting for one: what a key's `max_active_jobs` counts."""
STOPPING: tuple[JobStatus, ...] = ("pausing", "cancelling")
"""Asked to stop: a worker still holds the job until it reaches its next step."""
