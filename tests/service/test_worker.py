"""Worker-side guarantees on a real Redis: one runner per job, bounded redeliveries."""

from __future__ import annotations

import time
import uuid

import pytest

from service.config import settings
from service.lease import Lease, LeaseHeld
from service.protocol import JobEventMessage, job_key
from worker.runner import JobRunner


@pytest.fixture()
def stream(redis_client, monkeypatch):
    name = f"warp:test-events:{uuid.uuid4().hex}"
    monkeypatch.setattr(settings, "event_stream", name)
    yield name
    redis_client.delete(name)


def published(redis_client, stream: str) -> list[JobEventMessage]:
    return [JobEventMessage.decode(fields) for _id, fields in redis_client.xrange(stream)]


def test_a_lease_admits_one_holder_and_lapses_when_it_dies(redis_client):
    job_id = uuid.uuid4().hex
    with Lease(redis_client, job_id, ttl_s=5), pytest.raises(LeaseHeld):
        Lease(redis_client, job_id, ttl_s=5).__enter__()
    assert not redis_client.exists(job_key(job_id, "lease")), "released on exit"
    redis_client.set(job_key(job_id, "lease"), "a-dead-worker", px=300)  # held, never renewed
    with pytest.raises(LeaseHeld):
        Lease(redis_client, job_id, ttl_s=5).__enter__()
    time.sleep(0.4)
    with Lease(redis_client, job_id, ttl_s=5):
        pass


def test_the_heartbeat_keeps_a_live_lease(redis_client):
    job_id = uuid.uuid4().hex
    with Lease(redis_client, job_id, ttl_s=0.6):
        time.sleep(1.5)
        assert redis_client.exists(job_key(job_id, "lease"))


def test_a_lapsed_lease_is_taken_back_unless_another_worker_has_it(redis_client):
    job_id = uuid.uuid4().hex
    with Lease(redis_client, job_id, ttl_s=0.6) as lease:
        redis_client.delete(job_key(job_id, "lease"))  # a heartbeat came too late
        time.sleep(0.5)
        assert redis_client.get(job_key(job_id, "lease")) == lease.token.encode()
        assert not lease.lost.is_set()
        redis_client.set(job_key(job_id, "lease"), "another-worker")  # lapsed and taken over
        time.sleep(0.5)
        assert lease.lost.is_set()
    assert redis_client.get(job_key(job_id, "lease")) == b"another-worker", "not released by us"
    redis_client.delete(job_key(job_id, "lease"))


def test_a_duplicate_delivery_does_not_run_beside_the_first(redis_client, stream):
    job_id = uuid.uuid4().hex
    with Lease(redis_client, job_id, ttl_s=5), pytest.raises(LeaseHeld):
        JobRunner(job_id, {}, redis_client).run()
    assert published(redis_client, stream) == []
    assert not redis_client.exists(job_key(job_id, "attempt"))


def test_a_job_that_keeps_dying_fails_after_max_attempts(redis_client, stream):
    job_id = uuid.uuid4().hex
    redis_client.set(job_key(job_id, "attempt"), settings.max_attempts)  # every earlier run died
    assert JobRunner(job_id, {}, redis_client).run() == "failed"
    (finished,) = published(redis_client, stream)
    assert finished.kind == "finished" and finished.data["status"] == "failed"
    assert finished.data["error"]["code"] == "too_many_attempts"


def test_a_delivery_of_a_finished_job_does_nothing(redis_client, stream):
    job_id = uuid.uuid4().hex
    assert JobRunner(job_id, {}, redis_client).run() == "failed"  # preflight: empty spec
    assert JobRunner(job_id, {}, redis_client).run() == "failed", "the recorded status"
    assert [e.kind for e in published(redis_client, stream)] == ["started", "finished"]
    assert redis_client.get(job_key(job_id, "attempt")) == b"1", "the late delivery never started"


STAGES = ["evaluate_before", "basis", "importance", "finetune", "evaluate_after"]


def stage_of(phase: str | None, data: dict) -> str | None:
    """The pipeline stage an event belongs to (evaluation events say before or after)."""
    return f"{phase}_{data['stage']}" if phase == "evaluate" and "stage" in data else phase


@pytest.mark.parametrize("stage", STAGES)
def test_a_cancel_in_any_stage_ends_the_job_cancelled_and_leaves_nothing(
    redis_client, stream, tiny_job, monkeypatch, stage
):
    """The cancel flag is raised the moment `stage` starts (as a user's cancel would land);
    the job stops there, reports `cancelled`, uploads nothing and removes its scratch."""
    monkeypatch.setattr(settings, "cancel_poll_s", 0.0)
    job_id = uuid.uuid4().hex
    runner = JobRunner(job_id, tiny_job, redis_client)
    forward = runner.forward

    def cancel_at_stage(event):
        forward(event)
        if event.kind == "phase_started" and stage_of(event.phase, event.data) == stage:
            redis_client.set(job_key(job_id, "cancel"), 1, ex=60)

    runner.forward = cancel_at_stage
    assert runner.run() == "cancelled"
    events = published(redis_client, stream)
    assert events[-1].kind == "finished" and events[-1].data["status"] == "cancelled"
    started = [stage_of(e.phase, e.data) for e in events if e.kind == "phase_started"]
    assert started[-1] == stage, "stopped in the stage it was cancelled in"
    finished = [stage_of(e.phase, e.data) for e in events if e.kind == "phase_finished"]
    assert stage not in finished and "artifact" not in {e.kind for e in events}
    assert not runner.out.exists(), "scratch space removed"
    assert not runner.store.fs.exists(runner.store.job_path(job_id, "")), "nothing uploaded"


def test_a_worker_refuses_sources_outside_its_roots_even_if_sent_directly(
    redis_client, stream, tiny_job
):
    """A message put on the queue by someone other than the API is checked again."""
    spec = {**tiny_job, "base_model": "/etc"}
    assert JobRunner(uuid.uuid4().hex, spec, redis_client).run() == "failed"
    finished = published(redis_client, stream)[-1]
    assert finished.data["error"]["code"] == "invalid_job"
    assert "base_model: /etc is outside the allowed roots" in finished.data["error"]["message"]
