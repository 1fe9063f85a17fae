"""Hands queued jobs to Celery. The jobs table is the outbox: a job is stored first and sent
after, so a submission survives a Redis outage and goes out when Redis is back."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from functools import cache

import redis
from sqlalchemy import select

from api.db import session_scope, utcnow
from api.models import Job
from service.celery_app import app as celery_app
from service.protocol import TASK, job_queue
from warp_core.spec import Resources

log = logging.getLogger(__name__)


def queue_of(spec: dict) -> str:
    """The queue of a stored job: the one of the GPU count it asks for (a spec stored before
    specs had `resources` asks for one)."""
    return job_queue(Resources.model_validate(spec.get("resources") or {}).gpus)


def send(job_id: str, spec: dict) -> None:
    """Put a job on the queue of the workers for its GPU count. retry=False: fail fast when
    Redis is down; the caller's loop tries again."""
    celery_app.send_task(
        TASK, args=[job_id, spec], task_id=job_id, queue=queue_of(spec), retry=False
    )


@cache
def _queue_keys(queue: str) -> tuple[str, ...]:
    """The Redis lists holding a queue, one per priority step (kombu's layout, asked of kombu
    itself so an upgrade that changes it is followed)."""
    with celery_app.pool.acquire(block=True) as connection:
        channel = connection.default_channel
        return tuple(channel._q_for_pri(queue, p) for p in channel.priority_steps)


def message_job_id(raw: bytes) -> str:
    """The job a raw queue message carries (its task id is the job id, see `send`)."""
    return json.loads(raw)["headers"]["id"]


def waiting_job_ids(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """Ids of the jobs whose message waits in one of `queues`, not yet taken by any worker.

    A message a worker has taken is gone from these lists (kombu's Redis transport pops it
    and records it as unacknowledged on the worker's side), so a job neither waiting here
    nor leased by a worker has no live delivery: its worker died, or the message was lost
    on the way to a worker that died as Redis handed it over (kombu's BRPOP window).
    """
    with client.pipeline(transaction=True) as pipe:  # one consistent snapshot
        for queue in sorted(set(queues)):
            for key in _queue_keys(queue):
                pipe.lrange(key, 0, -1)
        lists = pipe.execute()
    return {message_job_id(raw) for messages in lists for raw in messages}


def _send(job: Job) -> None:
    send(job.id, job.spec)
    job.dispatched_at = utcnow()


def dispatch_pending(limit: int = 100) -> int:
    """Send every queued, undispatched job; returns how many went out."""
    with session_scope() as session:
        query = (
            select(Job)
            .where(Job.status == "queued", Job.dispatched_at.is_(None))
            .order_by(Job.created_at)
            .limit(limit)
        )
        if session.bind.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)  # one API replica per job
        jobs = list(session.scalars(query))
        for job in jobs:
            _send(job)
        return len(jobs)


def dispatch_soon() -> None:
    """Send what is pending right after a job is stored, instead of at the loop's next turn
    (best effort: the loop catches what fails)."""
    try:
        dispatch_pending()
    except Exception as exc:  # Redis or the database is down: the loop retries
        log.warning("dispatch deferred: %s", exc)


def revoke(job_id: str) -> None:
    """Tell workers to drop a queued job (the cancel flag covers a worker that races it)."""
    celery_app.control.revoke(job_id)


def dispatch_forever(stop: threading.Event, interval_s: float = 1.0) -> None:
    while not stop.is_set():
        try:
            dispatch_pending()
        except Exception as exc:
            log.warning("dispatcher: %s", exc)
        stop.wait(interval_s)
