"""Finds unfinished jobs that no worker will run, and sends them to the queue again.

A worker renews its job's lease in Redis every `lease_s / 3` seconds (service.lease). If the
whole worker host disappears (power loss, a node drained with `kill -9`), Celery would only
redeliver the job's message after the broker's visibility timeout, which must exceed the
longest job: days during which the job would sit `running`. And a message can be lost
outright: kombu's Redis transport pops it (BRPOP) before the worker records it, so a worker
that dies at that instant takes the message with it and the job would stay `queued` forever.

The reaper watches instead. A job the database calls queued (and sent), running, pausing or
cancelling, whose message is not waiting in the queue and which no worker has leased, for
longer than `lease_s`, and which has not finished, has no live delivery. It is sent again
(the next worker resumes from the checkpoint if it shares the work directory), a cancelling
one ends `cancelled`, a pausing one is `paused` (its checkpoint is on the work volume, where
a resume finds it), and a running one that has used `max_attempts` since it was submitted
or resumed ends `failed` with `worker_lost`. A job whose message waits in the queue is left
alone however long it waits, and so is a paused one: nothing is meant to run it.

Its verdicts travel through the event stream like a worker's reports, so a job's events stay
gap-free and one ingester applies them. With several API replicas, a short-lived marker in
Redis lets one of them act.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import redis
from sqlalchemy import and_, or_, select

from api.db import session_scope
from api.dispatch import queue_of, send, waiting_job_ids
from api.models import Job
from service.config import settings
from service.protocol import DONE_TTL_S, EventPublisher, attempts_since_resume, job_key
from service.status import STOPPING

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.missing_since: dict[str, float] = {}

    def scan(self, now: float | None = None) -> list[str]:
        """One look at every unfinished, sent job; returns the ids of those found without a
        live delivery for `lease_s` (and sent again, cancelled or failed)."""
        now = time.monotonic() if now is None else now
        with session_scope() as session:
            sent = and_(Job.status == "queued", Job.dispatched_at.is_not(None))
            query = select(Job.id, Job.status, Job.spec).where(
                or_(sent, Job.status.in_(("running", *STOPPING)))
            )
            jobs = list(session.execute(query))
        self.missing_since = {
            job_id: since
            for job_id, since in self.missing_since.items()
            if job_id in {row.id for row in jobs}
        }
        waiting = waiting_job_ids(self.client, {queue_of(row.spec) for row in jobs})
        lost = []
        for job_id, status, spec in jobs:
            if job_id in waiting or self.client.exists(
                job_key(job_id, "lease"), job_key(job_id, "done")
            ):
                self.missing_since.pop(job_id, None)
                continue
            since = self.missing_since.setdefault(job_id, now)
            if now - since >= settings.lease_s and self.recover(job_id, status, spec):
                del self.missing_since[job_id]
                lost.append(job_id)
        return lost

    def recover(self, job_id: str, status: str, spec: dict) -> bool:
        """Requeue, cancel or fail a job without a worker; False if another replica did.

        The marker outlives the other replicas' stale looks: by the time it expires, a job
        sent again waits in the queue (or is leased by the worker that took it)."""
        if not self.client.set(
            job_key(job_id, "reaping"), 1, nx=True, ex=math.ceil(settings.lease_s)
        ):
            return False
        attempt = attempts_since_resume(self.client, job_id)
        events = EventPublisher(self.client, settings.event_stream, job_id)
        silence = f"no heartbeat from its worker for over {settings.lease_s:g} s"
        if status == "cancelling":
            self._finish(events, "cancelled")
        elif status == "pausing":
            events.publish("paused", reason=f"{silence}; paused at its last checkpoint")
        elif status == "running" and attempt >= settings.max_attempts:
            message = f"{silence} on attempt {attempt} of {settings.max_attempts}; giving up"
            self._finish(events, "failed", error={"code": "worker_lost", "message": message})
        else:
            reason = silence
            if status == "queued":
                reason = (
                    "its message left the queue but no worker started it within "
                    f"{settings.lease_s:g} s (the worker that took it died)"
                )
            send(job_id, spec)
            events.publish("requeued", reason=reason, attempt=attempt)
        log.warning("job %s has no live delivery (attempt %d, %s)", job_id, attempt, status)
        return True

    def _finish(self, events: EventPublisher, status: str, **data: object) -> None:
        self.client.set(job_key(events.job_id, "done"), status, ex=DONE_TTL_S)
        events.publish("finished", status=status, **data)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(settings.lease_s / 3):
            try:
                self.scan()
            except Exception as exc:  # the database or Redis is down: look again later
                log.warning("reaper: %s", exc)
