"""Moves job events from the Redis Stream into the database (the source of truth).

Each API process runs one consumer of a consumer group. A batch is written in one
transaction and acknowledged only after the commit, so a crash between the two replays the
batch; the unique (job_id, seq) key makes the replay a no-op. Entries left pending by a dead
consumer are reclaimed after `ingest_reclaim_idle_ms`. Events move a job's status, phase and
progress forward only (by `seq`); terminal statuses and artifacts apply whatever the order.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime

import redis
from prometheus_client import Gauge
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from api.db import session_scope
from api.files.service import RESULTS_FILE, results_file
from api.models import Artifact, Job, JobEvent
from service.config import settings
from service.protocol import JobEventMessage
from service.status import STOPPING

log = logging.getLogger(__name__)
INGEST_LAG = Gauge("warp_event_ingestion_lag_seconds", "Age of the last ingested event")
INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def apply_events(session: Session, messages: list[JobEventMessage]) -> int:
    """Store new events and fold them into their jobs; returns how many were new."""
    new = 0
    insert = INSERTS[session.bind.dialect.name]
    for message in messages:
        job = session.get(Job, message.job_id, with_for_update=True)
        if job is None:
            log.warning("event for unknown job %s dropped", message.job_id)
            continue
        created = datetime.fromtimestamp(message.ts, UTC)
        row = {
            "job_id": message.job_id,
            "seq": message.seq,
            "kind": message.kind,
            "phase": message.phase,
            "data": message.data,
            "created_at": created,
        }
        statement = insert(JobEvent).values(row).on_conflict_do_nothing().returning(JobEvent.id)
        if session.execute(statement).first() is None:
            continue  # already ingested
        new += 1
        _fold(session, job, message, created)
    return new


def _fold(session: Session, job: Job, message: JobEventMessage, at: datetime) -> None:
    data = message.data
    if message.kind == "artifact":
        session.merge(
            Artifact(job_id=job.id, name=data["name"], size=data["size"], sha256=data["sha256"])
        )
        if data["name"] == RESULTS_FILE:  # the fine-tuning API's result file
            session.merge(results_file(job, data["size"], data["sha256"]))
    elif message.kind == "finished" and not job.finished:
        job.status, job.finished_at = data["status"], at
        job.metrics = data.get("metrics")
        if error := data.get("error"):
            job.error_code, job.error_message = error["code"], error["message"]
        if job.status == "succeeded":
            job.progress_fraction = 1.0
    elif message.seq > job.last_seq and not job.finished:
        if message.kind == "started":
            job.status = _started(job.status)
            job.attempt = max(job.attempt, data["attempt"])
            job.started_at = job.started_at or at
        if message.phase:
            job.phase = message.phase
        if "fraction" in data:
            job.progress_fraction = data["fraction"]
        if message.kind == "progress":
            job.progress_step, job.progress_total_steps = data["step"], data["total_steps"]
        if message.kind == "paused" and job.status != "cancelling":
            job.status = "paused"
    job.last_seq = max(job.last_seq, message.seq)


def _started(status: str) -> str:
    """A job's status once a worker has started it: running, unless it was asked to stop
    meanwhile (a pause that found it queued has set `paused`; the worker now stopping it
    makes it `pausing` until it reports `paused`)."""
    if status in STOPPING:
        return status
    return "pausing" if status == "paused" else "running"


class Ingester:
    def __init__(self, client: redis.Redis, consumer: str | None = None) -> None:
        self.client = client
        self.stream = settings.event_stream
        self.group = settings.ingest_group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._last_reclaim = 0.0

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def step(self, block_ms: int = 1000) -> int:
        """One round: reclaim dead consumers' entries, then read own pending or new ones."""
        handled = 0
        now = time.monotonic()
        if now - self._last_reclaim > settings.ingest_reclaim_idle_ms / 2000:
            self._last_reclaim = now
            _next, claimed, *_ = self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=settings.ingest_reclaim_idle_ms,
                count=500,
            )
            handled += self.handle(claimed)
        pending = self.client.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=500)
        entries = pending[0][1] if pending else []
        if not entries:
            fresh = self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=500, block=block_ms
            )
            entries = fresh[0][1] if fresh else []
        return handled + self.handle(entries)

    def handle(self, entries: list) -> int:
        """Commit a batch, then acknowledge it."""
        messages = [JobEventMessage.decode(fields) for _id, fields in entries if fields]
        if messages:
            with session_scope() as session:
                apply_events(session, messages)
            INGEST_LAG.set(max(0.0, time.time() - messages[-1].ts))
        if entries:
            self.client.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        return len(messages)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.ensure_group()
                while not stop.is_set():
                    self.step()
            except Exception as exc:  # Redis or the database is down: retry, lose nothing
                log.warning("ingester: %s", exc)
                stop.wait(1.0)
