"""Event ingestion against real PostgreSQL and Redis: idempotent, ordered, crash-safe."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from api.db import session_scope, utcnow
from api.ingest import Ingester, apply_events
from api.models import Artifact, Job, JobEvent
from service.protocol import EventPublisher, JobEventMessage
from warp_core.testing import example_job


@pytest.fixture()
def job_id(database) -> str:
    job_id = uuid.uuid4().hex
    with session_scope() as session:
        # A spec as the API stores it: every view of the job (the OpenAI one too) reads it.
        spec = example_job("/models/absent").model_dump(mode="json")
        session.add(Job(id=job_id, status="queued", spec=spec, created_at=utcnow()))
    return job_id


def message(job_id: str, seq: int, kind: str, phase: str | None = None, **data) -> JobEventMessage:
    return JobEventMessage(job_id, seq, kind, phase, data, 1_700_000_000.0 + seq)


def job_and_events(job_id: str) -> tuple[Job, list[int]]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        seqs = list(session.scalars(select(JobEvent.seq).where(JobEvent.job_id == job_id)))
        return job, sorted(seqs)


def test_replayed_events_are_ingested_once(job_id):
    batch = [
        message(job_id, 1, "started", attempt=1),
        message(job_id, 2, "phase_started", "basis"),
        message(job_id, 3, "progress", "basis", step=1, total_steps=4, fraction=0.1),
    ]
    with session_scope() as session:
        assert apply_events(session, batch) == 3
    with session_scope() as session:
        assert apply_events(session, batch) == 0
    job, seqs = job_and_events(job_id)
    assert seqs == [1, 2, 3]
    assert (job.status, job.phase, job.attempt, job.progress_step) == ("running", "basis", 1, 1)


def test_late_events_never_move_a_job_backwards(job_id):
    with session_scope() as session:
        apply_events(
            session,
            [
                message(job_id, 1, "started", attempt=1),
                message(job_id, 3, "progress", "finetune", step=9, total_steps=10, fraction=0.9),
                message(job_id, 4, "artifact", name="metrics.json", size=3, sha256="ab"),
                message(job_id, 5, "finished", status="succeeded", metrics={"after": {}}),
            ],
        )
    with session_scope() as session:
        apply_events(
            session,
            [
                message(job_id, 2, "progress", "basis", step=1, total_steps=4, fraction=0.1),
            ],
        )
    job, seqs = job_and_events(job_id)
    assert seqs == [1, 2, 3, 4, 5]
    assert (job.status, job.phase, job.progress_fraction) == ("succeeded", "finetune", 1.0)
    with session_scope() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)
            )
            == 1
        )


def test_a_cancelling_job_stays_cancelling_until_it_finishes(job_id):
    with session_scope() as session:
        session.get(Job, job_id).status = "cancelling"
    with session_scope() as session:
        apply_events(session, [message(job_id, 1, "started", attempt=1)])
    assert job_and_events(job_id)[0].status == "cancelling"
    with session_scope() as session:
        apply_events(session, [message(job_id, 2, "finished", status="cancelled")])
    assert job_and_events(job_id)[0].status == "cancelled"


def test_a_dead_consumers_pending_events_are_reclaimed(job_id, redis_client, monkeypatch):
    """A consumer that read events and died before acking: another one takes them over."""
    from service.config import settings

    stream = f"warp:test-events:{uuid.uuid4().hex}"
    monkeypatch.setattr(settings, "event_stream", stream)
    monkeypatch.setattr(settings, "ingest_reclaim_idle_ms", 0)
    publisher = EventPublisher(redis_client, stream, job_id)
    for step in range(1, 4):
        publisher.publish("progress", "basis", step=step, total_steps=3, fraction=step / 10)
    dead = Ingester(redis_client, consumer="dead")
    dead.ensure_group()
    taken = redis_client.xreadgroup(dead.group, "dead", {stream: ">"}, count=10)
    assert len(taken[0][1]) == 3  # read, never acknowledged: the consumer "crashed"

    survivor = Ingester(redis_client, consumer="survivor")
    assert survivor.step(block_ms=10) == 3
    assert job_and_events(job_id)[1] == [1, 2, 3]
    assert redis_client.xpending(stream, dead.group)["pending"] == 0
    redis_client.delete(stream)
