"""The lost-worker reaper on real PostgreSQL and Redis: a running job whose lease has lapsed
is sent again, failed after max_attempts, or cancelled if cancelling; never twice."""

from __future__ import annotations

import uuid

import pytest

from api.config import settings
from api.db import session_scope
from api.models import Job
from api.reaper import Reaper
from worker.lease import lease_key
from worker.protocol import JobEventMessage, attempt_key, done_key

QUEUE = "reaper-test"


@pytest.fixture()
def wire(redis_client, monkeypatch):
    """A stream and a queue of the test's own, which no live ingester or worker reads."""
    stream = f"warp:test-events:{uuid.uuid4().hex}"
    monkeypatch.setattr(settings, "event_stream", stream)
    monkeypatch.setattr(settings, "queue", QUEUE)
    redis_client.delete(QUEUE)
    yield stream
    redis_client.delete(stream, QUEUE)


@pytest.fixture()
def running_job(database):
    job_id = uuid.uuid4().hex
    with session_scope() as session:
        session.add(Job(id=job_id, status="running", spec={"method": "warp"}, attempt=1))
    yield job_id
    with session_scope() as session:
        session.delete(session.get(Job, job_id))


def set_status(job_id: str, status: str) -> None:
    with session_scope() as session:
        session.get(Job, job_id).status = status


def events(redis_client, stream: str) -> list[JobEventMessage]:
    return [JobEventMessage.decode(fields) for _id, fields in redis_client.xrange(stream)]


def test_a_job_without_a_lease_for_lease_s_is_sent_again_once(redis_client, wire, running_job):
    redis_client.set(attempt_key(running_job), 1)
    reaper = Reaper(redis_client)
    assert reaper.scan(now=100.0) == [], "a missing lease is only noticed, not acted on"
    assert reaper.scan(now=100.0 + settings.lease_s / 2) == []
    assert reaper.scan(now=100.0 + settings.lease_s) == [running_job]
    assert redis_client.llen(QUEUE) == 1, "the job's task is on the queue again"
    (requeued,) = events(redis_client, wire)
    assert requeued.kind == "requeued" and requeued.data["attempt"] == 1
    assert "no heartbeat" in requeued.data["reason"]
    other_replica = Reaper(redis_client)
    other_replica.scan(now=0.0)
    assert other_replica.scan(now=10.0 * settings.lease_s) == [], "one requeue per attempt"
    assert redis_client.llen(QUEUE) == 1


def test_a_live_lease_or_a_finished_job_is_left_alone(redis_client, wire, running_job):
    reaper = Reaper(redis_client)
    redis_client.set(lease_key(running_job), "a-live-worker", ex=60)
    try:
        assert reaper.scan(now=0.0) == [] and reaper.scan(now=1e6) == []
    finally:
        redis_client.delete(lease_key(running_job))
    redis_client.set(done_key(running_job), "succeeded", ex=60)
    assert reaper.scan(now=2e6) == [] and reaper.scan(now=3e6) == []
    assert events(redis_client, wire) == [] and redis_client.llen(QUEUE) == 0


def test_the_last_attempt_lost_fails_the_job(redis_client, wire, running_job):
    redis_client.set(attempt_key(running_job), settings.max_attempts)
    reaper = Reaper(redis_client)
    reaper.scan(now=0.0)
    assert reaper.scan(now=settings.lease_s) == [running_job]
    (finished,) = events(redis_client, wire)
    assert finished.kind == "finished" and finished.data["status"] == "failed"
    assert finished.data["error"]["code"] == "worker_lost"
    assert redis_client.get(done_key(running_job)) == b"failed"
    assert redis_client.llen(QUEUE) == 0


def test_a_cancelling_job_without_a_worker_ends_cancelled(redis_client, wire, running_job):
    set_status(running_job, "cancelling")
    reaper = Reaper(redis_client)
    reaper.scan(now=0.0)
    assert reaper.scan(now=settings.lease_s) == [running_job]
    (finished,) = events(redis_client, wire)
    assert finished.data["status"] == "cancelled" and redis_client.llen(QUEUE) == 0
