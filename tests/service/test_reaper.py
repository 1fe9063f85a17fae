"""The lost-worker reaper on real PostgreSQL and Redis: a running job whose lease has lapsed
is sent again, failed after max_attempts, or cancelled if cancelling; a sent job whose
message vanished from the queue is sent again; a job waiting in the queue is left alone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from api.db import session_scope, utcnow
from api.dispatch import message_job_id, send
from api.models import Job
from api.reaper import Reaper
from service.config import settings
from service.protocol import JobEventMessage, job_key, job_queue

QUEUE = "reaper-test"
EIGHT_GPUS = {"method": "warp", "resources": {"gpus": 8}}


@pytest.fixture()
def wire(redis_client, monkeypatch):
    """A stream and queues of the test's own, which no live ingester or worker reads."""
    stream = f"warp:test-events:{uuid.uuid4().hex}"
    monkeypatch.setattr(settings, "event_stream", stream)
    monkeypatch.setattr(settings, "queue", QUEUE)
    queues = (job_queue(1), job_queue(8))
    redis_client.delete(*queues)
    yield stream
    redis_client.delete(stream, *queues)


def job_row(spec: dict | None = None, **fields) -> Iterator[str]:
    job_id = uuid.uuid4().hex
    with session_scope() as session:
        session.add(Job(id=job_id, spec=spec or {"method": "warp"}, **fields))
    yield job_id
    with session_scope() as session:
        session.delete(session.get(Job, job_id))


@pytest.fixture()
def running_job(database):
    yield from job_row(status="running", attempt=1)


@pytest.fixture()
def sent_job(database):
    """Queued and handed to the broker (the dispatcher is done with it)."""
    yield from job_row(status="queued", dispatched_at=utcnow())


def set_status(job_id: str, status: str) -> None:
    with session_scope() as session:
        session.get(Job, job_id).status = status


def events(redis_client, stream: str, job_id: str) -> list[JobEventMessage]:
    """The job's events on the test stream (other tests may leave running jobs about)."""
    messages = [JobEventMessage.decode(fields) for _id, fields in redis_client.xrange(stream)]
    return [message for message in messages if message.job_id == job_id]


@pytest.fixture()
def sent_job_for_8_gpus(database):
    yield from job_row(EIGHT_GPUS, status="queued", dispatched_at=utcnow())


def queued(redis_client, job_id: str, gpus: int = 1) -> int:
    """How many deliveries of the job wait on the test queue of `gpus` GPUs."""
    messages = redis_client.lrange(job_queue(gpus), 0, -1)
    return sum(message_job_id(raw) == job_id for raw in messages)


def lost(reaper: Reaper, now: float, job_id: str) -> bool:
    return job_id in reaper.scan(now=now)


def test_a_job_without_a_lease_for_lease_s_is_sent_again_once(redis_client, wire, running_job):
    redis_client.set(job_key(running_job, "attempt"), 1)
    reaper = Reaper(redis_client)
    assert not lost(reaper, 100.0, running_job), "a missing lease is only noticed"
    assert not lost(reaper, 100.0 + settings.lease_s / 2, running_job)
    assert lost(reaper, 100.0 + settings.lease_s, running_job)
    assert queued(redis_client, running_job) == 1, "the job's task is on the queue again"
    (requeued,) = events(redis_client, wire, running_job)
    assert requeued.kind == "requeued" and requeued.data["attempt"] == 1
    assert "no heartbeat" in requeued.data["reason"]
    other_replica = Reaper(redis_client)
    other_replica.scan(now=0.0)
    assert not lost(other_replica, 10.0 * settings.lease_s, running_job), "it waits in the queue"
    assert queued(redis_client, running_job) == 1


def test_a_live_lease_or_a_finished_job_is_left_alone(redis_client, wire, running_job):
    reaper = Reaper(redis_client)
    redis_client.set(job_key(running_job, "lease"), "a-live-worker", ex=60)
    try:
        assert not lost(reaper, 0.0, running_job) and not lost(reaper, 1e6, running_job)
    finally:
        redis_client.delete(job_key(running_job, "lease"))
    redis_client.set(job_key(running_job, "done"), "succeeded", ex=60)
    assert not lost(reaper, 2e6, running_job) and not lost(reaper, 3e6, running_job)
    assert events(redis_client, wire, running_job) == [] and queued(redis_client, running_job) == 0


def test_the_last_attempt_lost_fails_the_job(redis_client, wire, running_job):
    redis_client.set(job_key(running_job, "attempt"), settings.max_attempts)
    reaper = Reaper(redis_client)
    reaper.scan(now=0.0)
    assert lost(reaper, settings.lease_s, running_job)
    (finished,) = events(redis_client, wire, running_job)
    assert finished.kind == "finished" and finished.data["status"] == "failed"
    assert finished.data["error"]["code"] == "worker_lost"
    assert redis_client.get(job_key(running_job, "done")) == b"failed"
    assert queued(redis_client, running_job) == 0


def test_a_cancelling_job_without_a_worker_ends_cancelled(redis_client, wire, running_job):
    set_status(running_job, "cancelling")
    reaper = Reaper(redis_client)
    reaper.scan(now=0.0)
    assert lost(reaper, settings.lease_s, running_job)
    (finished,) = events(redis_client, wire, running_job)
    assert finished.data["status"] == "cancelled" and queued(redis_client, running_job) == 0


def test_a_sent_job_whose_message_vanished_is_sent_again(redis_client, wire, sent_job):
    """What a worker dying as Redis hands it the message (kombu's BRPOP window) leaves."""
    reaper = Reaper(redis_client)
    assert not lost(reaper, 0.0, sent_job)
    assert lost(reaper, settings.lease_s, sent_job)
    assert queued(redis_client, sent_job) == 1
    (requeued,) = events(redis_client, wire, sent_job)
    assert requeued.kind == "requeued" and "no worker started it" in requeued.data["reason"]
    assert not lost(Reaper(redis_client), 0.0, sent_job)
    assert not lost(reaper, 10.0 * settings.lease_s, sent_job), "it waits in the queue now"


def test_a_job_waiting_in_the_queue_is_left_alone_however_long(redis_client, wire, sent_job):
    send(sent_job, {"method": "warp"})
    reaper = Reaper(redis_client)
    assert not lost(reaper, 0.0, sent_job) and not lost(reaper, 1e6, sent_job)
    assert queued(redis_client, sent_job) == 1 and events(redis_client, wire, sent_job) == []


def test_a_job_for_8_gpus_is_sent_again_to_their_queue_and_left_alone_there(
    redis_client, wire, sent_job_for_8_gpus
):
    """Each GPU count has a queue of its own: the reaper looks for the job in its queue, and
    sends it again there, where only workers for 8 GPUs take it."""
    job_id = sent_job_for_8_gpus
    reaper = Reaper(redis_client)
    assert not lost(reaper, 0.0, job_id)
    assert lost(reaper, settings.lease_s, job_id), "its message vanished: sent again"
    assert queued(redis_client, job_id, gpus=8) == 1 and queued(redis_client, job_id) == 0
    assert not lost(reaper, 1e6, job_id), "waiting in the queue of 8 GPUs: left alone"


def test_a_pausing_job_without_a_worker_is_paused_not_sent_again(redis_client, wire, running_job):
    """Its checkpoint is on the work volume, where the delivery that a resume sends finds it."""
    set_status(running_job, "pausing")
    reaper = Reaper(redis_client)
    reaper.scan(now=0.0)
    assert lost(reaper, settings.lease_s, running_job)
    (paused,) = events(redis_client, wire, running_job)
    assert paused.kind == "paused" and "no heartbeat" in paused.data["reason"]
    assert queued(redis_client, running_job) == 0
    assert not redis_client.exists(job_key(running_job, "done")), "not finished"


def test_a_paused_job_is_left_alone_however_long(redis_client, wire, running_job):
    set_status(running_job, "paused")
    reaper = Reaper(redis_client)
    assert not lost(reaper, 0.0, running_job) and not lost(reaper, 1e6, running_job)
    assert events(redis_client, wire, running_job) == [] and queued(redis_client, running_job) == 0


def test_attempts_before_a_resume_do_not_count_against_max_attempts(
    redis_client, wire, running_job
):
    redis_client.set(job_key(running_job, "attempt"), settings.max_attempts)
    redis_client.set(job_key(running_job, "resumed_at"), settings.max_attempts - 1)
    reaper = Reaper(redis_client)
    reaper.scan(now=0.0)
    assert lost(reaper, settings.lease_s, running_job)
    (requeued,) = events(redis_client, wire, running_job)
    assert requeued.kind == "requeued" and requeued.data["attempt"] == 1
    assert queued(redis_client, running_job) == 1
