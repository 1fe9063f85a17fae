"""Celery tasks, registered on the shared app. Kept thin: the work happens in
`worker.runner`, imported in the child.

Run one worker per machine (or per set of GPUs a job may use), started for its GPU count:
`WARP_WORKER_GPUS=8 celery -A worker.tasks:app worker --concurrency 1`. With no -Q it
consumes the queue of jobs for that many GPUs (`service.protocol.job_queue`; `gpu` for one)
and runs each as `warp run` with that many processes.
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
    from worker.runner import AttemptLost, JobRunner

    # Run from an empty directory of the job's own (this child runs only this job, and the
    # job's processes inherit it): a Hub-id-looking source can then never resolve to a
    # folder beside the code.
    scratch = settings.resolved_work_dir / job_id / "cwd"
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    try:
        return JobRunner(job_id, spec).run()
    except LeaseHeld as exc:
        # Another worker runs this job, or one that died still holds its lease: look again
        # once the lease would have lapsed.
        raise self.retry(countdown=settings.lease_s, exc=exc) from exc
    except AttemptLost as exc:
        # The job's processes were killed and this child is healthy: send the job again
        # now (to this queue; the lease is already released), and the next delivery resumes
        # it from its checkpoint, its `attempt` counted against WARP_MAX_ATTEMPTS. Ending
        # this child instead would requeue it too (reject on worker lost), but only through
        # Celery's crash path, logged as a lost worker; should the retry itself fail (Redis
        # down), the task fails and the API's reaper sends the job again.
        raise self.retry(countdown=0, exc=exc) from exc
