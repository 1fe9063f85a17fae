"""Worker-side guarantees on a real Redis: one runner per job, bounded redeliveries, and a
job's processes (`warp run`, a child process group of the test process, as of a worker's
task process) relayed, stopped and judged."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from service.config import Settings, settings
from service.lease import Lease, LeaseHeld
from service.protocol import JobEventMessage, job_key
from tests.service.faults import has_checkpoint, job_processes
from warp_core.events import Event
from worker.runner import AttemptLost, JobRunner


@pytest.fixture()
def stream(redis_client, monkeypatch):
    name = f"warp:test-events:{uuid.uuid4().hex}"
    monkeypatch.setattr(settings, "event_stream", name)
    yield name
    redis_client.delete(name)


def published(redis_client, stream: str) -> list[JobEventMessage]:
    return [JobEventMessage.decode(fields) for _id, fields in redis_client.xrange(stream)]


def on_event(runner: JobRunner, hook: Callable[[Event], None]) -> JobRunner:
    """Call `hook` after the runner relays each event of its job's processes: a fault lands
    at a known point of the job."""
    forward = runner.forward

    def forward_then_hook(event: Event) -> None:
        forward(event)
        hook(event)

    runner.forward = forward_then_hook
    return runner


def in_training(event: Event) -> bool:
    return event.kind == "progress" and event.phase == "finetune"


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


def test_the_hard_time_limit_must_leave_a_timed_out_job_its_grace_to_stop():
    with pytest.raises(ValidationError, match="WARP_JOB_TIME_LIMIT_S must exceed"):
        Settings(job_soft_time_limit_s=3600, job_time_limit_s=3630, stop_grace_s=60)
    assert Settings(job_soft_time_limit_s=3600, job_time_limit_s=3700, stop_grace_s=60)


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

    def cancel_at_stage(event: Event) -> None:
        if event.kind == "phase_started" and stage_of(event.phase, event.data) == stage:
            redis_client.set(job_key(job_id, "cancel"), 1, ex=60)

    runner = on_event(JobRunner(job_id, tiny_job, redis_client), cancel_at_stage)
    assert runner.run() == "cancelled"
    assert not job_processes(job_id), "every process of the job stopped"
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


def test_a_job_runs_as_its_own_processes_and_every_event_is_relayed_in_order(
    redis_client, stream, tiny_job
):
    job_id = uuid.uuid4().hex
    seen: set[int] = set()
    runner = on_event(
        JobRunner(job_id, tiny_job, redis_client), lambda _: seen.update(job_processes(job_id))
    )
    assert runner.run() == "succeeded"
    assert seen and os.getpid() not in seen, "the pipeline ran in processes of its own"
    assert not job_processes(job_id)
    events = published(redis_client, stream)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].kind == "started" and events[-1].kind == "finished"
    started = [stage_of(e.phase, e.data) for e in events if e.kind == "phase_started"]
    finished = [stage_of(e.phase, e.data) for e in events if e.kind == "phase_finished"]
    assert started == finished == STAGES
    for phase in {e.phase for e in events if e.kind == "progress"}:
        last = [e.data for e in events if (e.kind, e.phase) == ("progress", phase)][-1]
        assert last["step"] == last["total_steps"], f"{phase}: its last progress was relayed"
    metrics = events[-1].data["metrics"]
    assert metrics["method"] == "warp" and metrics["after"] is not None
    artifacts = {e.data["name"] for e in events if e.kind == "artifact"}
    assert {"metrics.json", "model/model.safetensors"} <= artifacts
    assert not any(name.startswith(("checkpoints/", "attempts/")) for name in artifacts)
    assert not runner.out.exists(), "scratch space removed"


def test_a_job_that_fails_in_its_processes_fails_with_their_message(
    redis_client, stream, tiny_job, tmp_path
):
    """Its weights are unreadable: the preflight (config and data) passes, loading fails."""
    model = tmp_path / "model"
    shutil.copytree(tiny_job["base_model"], model)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    job_id = uuid.uuid4().hex
    assert JobRunner(job_id, {**tiny_job, "base_model": str(model)}, redis_client).run() == "failed"
    error = published(redis_client, stream)[-1].data["error"]
    assert error["code"] == "job_error" and error["message"].startswith("SafetensorError: ")
    assert not job_processes(job_id)


def kill_in_training(runner: JobRunner, signum: int) -> JobRunner:
    """Send `signum` to every process of the job once it is training from a checkpoint."""

    def kill(event: Event) -> None:
        if in_training(event) and has_checkpoint(runner.out / "output"):
            for pid in job_processes(runner.job_id):
                os.kill(pid, signum)

    return on_event(runner, kill)


def test_a_killed_job_process_loses_the_attempt_and_the_next_one_resumes(
    redis_client, stream, long_job
):
    """No `finished` for a killed attempt: the job runs again (the task retries it) and goes
    on from its checkpoint, in a new attempt."""
    job_id = uuid.uuid4().hex
    runner = kill_in_training(JobRunner(job_id, long_job, redis_client), signal.SIGKILL)
    with pytest.raises(AttemptLost, match="killed"):
        runner.run()
    assert not job_processes(job_id)
    assert "finished" not in {e.kind for e in published(redis_client, stream)}
    assert not redis_client.exists(job_key(job_id, "lease")), "released for the next delivery"
    assert has_checkpoint(runner.out / "output"), "kept for the resume"

    assert JobRunner(job_id, long_job, redis_client).run() == "succeeded"
    events = published(redis_client, stream)
    second = [i for i, e in enumerate(events) if e.kind == "started"][1]
    assert events[second].data["attempt"] == 2
    resumed = events[second:]
    assert any("fine-tuning resumes from" in str(e.data) for e in resumed)
    assert [e.kind for e in events].count("finished") == 1


def test_a_job_whose_processes_keep_dying_fails_with_the_end_of_what_they_printed(
    redis_client, stream, long_job
):
    job_id = uuid.uuid4().hex
    redis_client.set(job_key(job_id, "attempt"), settings.max_attempts - 1)  # earlier ones died
    runner = kill_in_training(JobRunner(job_id, long_job, redis_client), signal.SIGKILL)
    with pytest.raises(AttemptLost):
        runner.run()
    assert JobRunner(job_id, long_job, redis_client).run() == "failed"
    error = published(redis_client, stream)[-1].data["error"]
    assert error["code"] == "too_many_attempts"
    last_words = error["message"].partition("The last attempt's output ended with:\n")[2]
    assert last_words.strip(), error["message"]


def test_a_job_whose_lease_is_taken_over_stops_at_once_and_reports_nothing(
    redis_client, stream, long_job, monkeypatch
):
    monkeypatch.setattr(settings, "lease_s", 0.6)
    job_id = uuid.uuid4().hex

    def take_over(event: Event) -> None:
        if in_training(event):
            redis_client.set(job_key(job_id, "lease"), "another-worker")

    assert on_event(JobRunner(job_id, long_job, redis_client), take_over).run() == "taken_over"
    assert not job_processes(job_id)
    assert "finished" not in {e.kind for e in published(redis_client, stream)}
    assert redis_client.get(job_key(job_id, "lease")) == b"another-worker"
    redis_client.delete(job_key(job_id, "lease"))


def test_a_job_that_ignores_its_stop_is_killed_after_the_grace(
    redis_client, stream, long_job, monkeypatch
):
    """Its processes are frozen (SIGSTOP) and then cancelled: SIGTERM cannot reach them, so
    they are killed after `stop_grace_s`, and the job still ends `cancelled`."""
    monkeypatch.setattr(settings, "cancel_poll_s", 0.0)
    monkeypatch.setattr(settings, "stop_grace_s", 1.0)
    job_id = uuid.uuid4().hex
    runner = kill_in_training(JobRunner(job_id, long_job, redis_client), signal.SIGSTOP)
    forward = runner.forward

    def cancel_once_frozen(event: Event) -> None:
        forward(event)
        if in_training(event) and has_checkpoint(runner.out / "output"):
            redis_client.set(job_key(job_id, "cancel"), 1, ex=60)

    runner.forward = cancel_once_frozen
    started = time.monotonic()
    assert runner.run() == "cancelled"
    assert time.monotonic() - started < 60, "not left frozen"
    assert not job_processes(job_id)


def test_a_job_past_its_soft_time_limit_is_stopped_and_fails_with_timeout(
    redis_client, stream, long_job
):
    """Celery raises SoftTimeLimitExceeded in the task process from a signal handler, at any
    point of the runner's loop; a timer does the same here, once training has begun."""

    def soft_time_limit(_signum: int, _frame: object) -> None:
        raise SoftTimeLimitExceeded()

    job_id = uuid.uuid4().hex
    armed = []

    def arm_in_training(event: Event) -> None:
        if in_training(event) and not armed:
            armed.append(signal.setitimer(signal.ITIMER_REAL, 0.3))

    previous = signal.signal(signal.SIGALRM, soft_time_limit)
    try:
        runner = on_event(JobRunner(job_id, long_job, redis_client), arm_in_training)
        assert runner.run() == "failed"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not job_processes(job_id)
    finished = published(redis_client, stream)[-1]
    assert finished.kind == "finished" and finished.data["error"]["code"] == "timeout"


def test_a_paused_job_stops_keeping_its_checkpoint_and_a_resume_finishes_it(
    redis_client, stream, long_job, monkeypatch
):
    """Pause: the processes stop at their next step, `paused` is reported, the work directory
    stays and nothing finishes; a delivery while paused does nothing; once resumed (the flag
    gone) the next delivery goes on from the checkpoint, its attempts counted afresh."""
    monkeypatch.setattr(settings, "cancel_poll_s", 0.0)
    job_id = uuid.uuid4().hex

    def pause_once_checkpointed(event: Event) -> None:
        if in_training(event) and has_checkpoint(runner.out / "output"):
            redis_client.set(job_key(job_id, "pause"), 1, ex=60)

    runner = on_event(JobRunner(job_id, long_job, redis_client), pause_once_checkpointed)
    assert runner.run() == "paused"
    assert not job_processes(job_id), "every process of the job stopped"
    kinds = [e.kind for e in published(redis_client, stream)]
    assert kinds[-1] == "paused" and "finished" not in kinds
    assert has_checkpoint(runner.out / "output"), "the work directory is kept for the resume"
    assert not redis_client.exists(job_key(job_id, "lease")) and not runner.client.get(
        job_key(job_id, "done")
    )

    assert JobRunner(job_id, long_job, redis_client).run() == "paused", "a delivery while paused"
    assert [e.kind for e in published(redis_client, stream)] == kinds

    redis_client.set(job_key(job_id, "resumed_at"), redis_client.get(job_key(job_id, "attempt")))
    redis_client.delete(job_key(job_id, "pause"))
    assert JobRunner(job_id, long_job, redis_client).run() == "succeeded"
    events = published(redis_client, stream)
    resumed = events[len(kinds) :]
    assert resumed[0].kind == "started" and resumed[0].data["attempt"] == 2
    assert any("fine-tuning resumes from" in str(e.data) for e in resumed)
    steps = [e.data["step"] for e in resumed if in_training(Event(e.kind, e.phase, e.data))]
    assert steps and min(steps) > 2, "training went on from the checkpoint"


def test_a_paused_job_that_is_cancelled_ends_cancelled_and_leaves_nothing(
    redis_client, stream, tiny_job
):
    """Cancelling a paused job sends it once more: its worker finds the cancel flag, reports
    `cancelled` and removes the work directory that the pause kept."""
    job_id = uuid.uuid4().hex
    runner = JobRunner(job_id, tiny_job, redis_client)
    (runner.out / "output").mkdir(parents=True)
    redis_client.set(job_key(job_id, "pause"), 1, ex=60)
    redis_client.set(job_key(job_id, "cancel"), 1, ex=60)
    assert runner.run() == "cancelled"
    (finished,) = published(redis_client, stream)
    assert finished.kind == "finished" and finished.data["status"] == "cancelled"
    assert not runner.out.exists()
