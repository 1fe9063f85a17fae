"""Celery tasks, registered on the shared app. Kept thin: the work happens in
`worker.runner`, imported in the child.

Run a worker per GPU: `celery -A worker.tasks:app worker -Q gpu --concurrency 1`.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from service.celery_app import app
from service.config import settings
from service.protocol import TASK

__all__ = ["app", "run_job"]


@app.task(name=TASK, bind=True, max_retries=None)
def run_job(self: Task, job_id: str, spec: dict[str, Any]) -> str:
    import os

    from service.lease import LeaseHeld
    from worker.runner import JobRunner

    # Run from an empty directory of the job's own (this child runs only this job): a
    # Hub-id-looking source can then never resolve to a folder beside the code.
    scratch = settings.resolved_work_dir / job_id / "cwd"
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    try:
        return JobRunner(job_id, spec).run()
    except LeaseHeld as exc:
        # Another worker runs this job, or one that died still holds its lease: look again
        # once the lease would have lapsed.
        raise self.retry(countdown=settings.lease_s, exc=exc) from exc
