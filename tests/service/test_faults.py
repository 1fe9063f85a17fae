"""Faults injected into a running service (issues 5 and 11): killed workers and job processes,
a killed rank or launcher of a job on several processes, a lost worker host, an API restart,
Redis and PostgreSQL outages. No job may be lost, run
twice at once, or left `running` forever, and no event may be lost or duplicated.

The tests assert those guarantees, not the path taken to them: with a 2 s lease on a busy
machine a starved heartbeat can make the reaper send a job once more than the fault alone
would (a harmless duplicate: the lease and the done marker keep it from running twice), so
attempts and `requeued` events are counted as "at least", never "exactly"."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from service.protocol import job_key
from service.status import TERMINAL
from tests.service.conftest import DATABASE, create_database, drop_database
from tests.service.faults import (
    LEASE_S,
    MAX_ATTEMPTS,
    QUEUE,
    RECLAIM_S,
    FaultStack,
    RunsAtOnce,
    job_processes,
    wait,
)

PROGRESS = ("progress", "finetune")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("faults")
    name = f"{DATABASE}_faults"
    stack = FaultStack(home, name)
    stack.start_redis()
    create_database(name, stack.env)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.close()
        drop_database(name)


def submit(stack: FaultStack, spec: dict) -> str:
    response = stack.http.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def finished(stack: FaultStack, job_id: str, timeout_s: float = 300) -> dict:
    def done():
        job = stack.http.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    return wait(done, f"job {job_id} to finish", timeout_s, interval_s=0.3)


def model_sha256(stack: FaultStack, job_id: str) -> str:
    artifacts = stack.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    return next(a["sha256"] for a in artifacts if a["name"] == "model/model.safetensors")


def assert_gap_free(stack: FaultStack, job_id: str) -> list[dict]:
    """Every event the job published is stored once, in `seq` order, none missing.

    A batch a killed API had read but not stored stays pending in the stream until another
    API reclaims it (after `WARP_INGEST_RECLAIM_IDLE_MS`), possibly after the job's last
    event was stored: so this waits, a bounded time, for the whole sequence.
    """

    def complete() -> list[dict] | None:
        events = stack.events(job_id)
        published = int(stack.client.get(job_key(job_id, "seq")))
        return events if [e["seq"] for e in events] == list(range(1, published + 1)) else None

    return wait(complete, f"every event of job {job_id} to be stored", 20 * RECLAIM_S, 0.3)


def assert_resumed_from_checkpoint(events: list[dict]) -> None:
    """Every start after the first went on from a training checkpoint, not from step 1, and
    the job finished once."""
    starts = [i for i, e in enumerate(events) if e["kind"] == "started"]
    attempts = [events[i]["data"]["attempt"] for i in starts]
    assert attempts == sorted(set(attempts)) and attempts[0] == 1, attempts
    resumed = events[starts[1] :]
    assert any("fine-tuning resumes from" in str(e["data"]) for e in resumed)
    steps = [e["data"]["step"] for e in resumed if (e["kind"], e["phase"]) == PROGRESS]
    assert steps and min(steps) > 2, "training went on from the checkpoint, not from step 1"
    assert [e["kind"] for e in events].count("finished") == 1


@pytest.fixture(scope="module")
def reference(stack, long_job) -> str:
    """The same job run without faults: the weights every recovered run must reach."""
    worker = stack.start_worker()
    job_id = submit(stack, long_job)
    assert finished(stack, job_id)["status"] == "succeeded"
    stack.kill_worker_host(worker)
    return model_sha256(stack, job_id)


def test_a_job_whose_task_process_is_killed_mid_training_resumes_to_the_same_weights(
    stack, long_job, reference
):
    worker = stack.start_worker()
    job_id = submit(stack, long_job)
    wait(lambda: stack.has_checkpoint(job_id), "the first training checkpoint")
    stack.kill_task_process(worker)
    job = finished(stack, job_id)
    assert job["status"] == "succeeded" and 2 <= job["attempt"] <= MAX_ATTEMPTS, job
    events = assert_gap_free(stack, job_id)
    assert_resumed_from_checkpoint(events)
    assert model_sha256(stack, job_id) == reference
    stack.kill_worker_host(worker)


def test_a_lost_worker_host_is_noticed_and_its_job_runs_elsewhere(stack, long_job, reference):
    worker = stack.start_worker()
    job_id = submit(stack, long_job)
    wait(lambda: stack.has_checkpoint(job_id), "the first training checkpoint")
    stack.kill_worker_host(worker)
    wait(
        lambda: [e for e in stack.events(job_id) if e["kind"] == "requeued"],
        "the reaper to send the job again",
        timeout_s=10 * LEASE_S,
    )
    assert stack.http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    replacement = stack.start_worker()
    job = finished(stack, job_id)
    assert job["status"] == "succeeded" and 2 <= job["attempt"] <= MAX_ATTEMPTS, job
    assert_resumed_from_checkpoint(assert_gap_free(stack, job_id))
    assert model_sha256(stack, job_id) == reference
    stack.kill_worker_host(replacement)


def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(stack, long_job):
    worker = stack.start_worker()
    job_id = submit(stack, long_job)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait(
            lambda a=attempt: int(stack.client.get(job_key(job_id, "attempt")) or 0) == a,
            f"attempt {attempt} to start",
        )
        wait(lambda: stack.has_checkpoint(job_id), "a training checkpoint")
        stack.kill_task_process(worker)
    job = finished(stack, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] in {"too_many_attempts", "worker_lost"}, job["error"]
    assert job["attempt"] == MAX_ATTEMPTS
    assert_gap_free(stack, job_id)
    stack.kill_worker_host(worker)


def test_a_message_lost_with_the_worker_that_took_it_is_sent_again(stack, tiny_job):
    """Kombu's Redis transport pops a message (BRPOP) before the worker records it: a worker
    host that dies at that instant takes the message with it. Here the test pops it."""
    spec = {**tiny_job, "hyperparameters": {**tiny_job["hyperparameters"], "max_steps": 2}}
    job_id = submit(stack, spec)
    message = wait(lambda: stack.queued_message(job_id), "the job's message on the queue")
    assert stack.client.lrem(QUEUE, 1, message) == 1
    worker = stack.start_worker()
    job = finished(stack, job_id)
    assert job["status"] == "succeeded" and job["attempt"] >= 1, job
    events = assert_gap_free(stack, job_id)
    assert any(e["kind"] == "requeued" for e in events), "the reaper sent it again"
    assert [e["kind"] for e in events].count("finished") == 1
    stack.kill_worker_host(worker)


def test_an_api_restart_mid_job_loses_and_duplicates_no_event(stack, long_job):
    worker = stack.start_worker()
    job_id = submit(stack, long_job)
    wait(lambda: stack.has_checkpoint(job_id), "training to start")
    stack.kill_api()
    stack.start_api()
    job = finished(stack, job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 1
    events = assert_gap_free(stack, job_id)
    assert events[-1]["kind"] == "finished"
    stack.kill_worker_host(worker)


def test_a_job_submitted_while_redis_is_down_is_kept_and_sent_when_it_is_back(stack, tiny_job):
    worker = stack.start_worker()
    stack.stop_redis()
    spec = {**tiny_job, "hyperparameters": {**tiny_job["hyperparameters"], "max_steps": 2}}
    job_id = submit(stack, spec)
    job = stack.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued", "status reads keep working from PostgreSQL"
    ready = stack.http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] != "ok"
    assert ready.json()["database"] == "ok"
    stack.start_redis()
    assert finished(stack, job_id)["status"] == "succeeded"
    assert_gap_free(stack, job_id)
    stack.kill_worker_host(worker)


def test_postgres_down_answers_503_and_recovers_without_a_restart(stack, tiny_job):
    stack.pg_proxy.down()
    try:
        ready = stack.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"] != "ok"
        assert ready.json()["redis"] == "ok"
        for response in (
            stack.http.get(f"/v1/jobs/{uuid.uuid4().hex}"),
            stack.http.post("/v1/jobs", json=tiny_job),
            stack.http.get("/v1/jobs"),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "database_unavailable"
    finally:
        stack.pg_proxy.up()
    wait(lambda: stack.http.get("/readyz").status_code == 200, "readiness", timeout_s=30)
    assert stack.http.get("/v1/jobs").status_code == 200
    job_id = submit(stack, tiny_job)
    assert stack.http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def launcher(job_id: str) -> int | None:
    """The job's own process (`warp run`; torchrun for several), once it runs."""
    return next((pid for pid, rank in job_processes(job_id).items() if rank is None), None)


def assert_recovered(
    stack: FaultStack, job_id: str, runs: RunsAtOnce, ranks: int, reference: str
) -> None:
    """Not lost: it ended succeeded, on a later attempt, from its checkpoint, with the
    weights of the uninterrupted run; and never ran twice at once (one launcher and its
    `ranks` at most, at every moment)."""
    job = finished(stack, job_id)
    assert job["status"] == "succeeded" and 2 <= job["attempt"] <= MAX_ATTEMPTS, job
    assert (runs.launchers, runs.ranks) == (1, ranks), "one run at a time"
    assert_resumed_from_checkpoint(assert_gap_free(stack, job_id))
    assert model_sha256(stack, job_id) == reference


def test_a_killed_job_process_costs_the_attempt_and_the_job_resumes_to_the_same_weights(
    stack, long_job, reference
):
    """The job's own process, not the worker's: the task sees it end without an exit record
    and sends the job again at once."""
    worker = stack.start_worker()
    job_id = submit(stack, long_job)
    with RunsAtOnce(job_id) as runs:
        wait(lambda: stack.has_checkpoint(job_id), "the first training checkpoint")
        os.kill(wait(lambda: launcher(job_id), "the job's process"), signal.SIGKILL)
        assert_recovered(stack, job_id, runs, 0, reference)
    stack.kill_worker_host(worker)


# -- a job on several processes (2 "GPUs": 2 gloo processes on this CPU-only machine) -------


@pytest.fixture(scope="module")
def two_process_job(long_job) -> dict:
    return {**long_job, "resources": {"gpus": 2}}


@pytest.fixture(scope="module")
def two_process_reference(stack, two_process_job) -> str:
    """The 2-process job run without faults, by a worker for 2 GPUs."""
    worker = stack.start_worker(gpus=2)
    job_id = submit(stack, two_process_job)
    job = finished(stack, job_id)
    assert job["status"] == "succeeded", job
    assert job["metrics"]["world_size"] == 2
    stack.kill_worker_host(worker)
    return model_sha256(stack, job_id)


def running_ranks(job_id: str) -> dict[int, int]:
    """rank -> pid of the job's ranks, once all of its 2 ranks run."""
    ranks = {rank: pid for pid, rank in job_processes(job_id).items() if rank is not None}
    return ranks if len(ranks) == 2 else {}


def test_a_rank_killed_mid_training_costs_the_attempt_and_the_job_resumes_to_the_same_weights(
    stack, two_process_job, two_process_reference
):
    worker = stack.start_worker(gpus=2)
    job_id = submit(stack, two_process_job)
    with RunsAtOnce(job_id) as runs:
        wait(lambda: stack.has_checkpoint(job_id), "the first sharded checkpoint")
        os.kill(wait(lambda: running_ranks(job_id), "both ranks")[1], signal.SIGKILL)
        assert_recovered(stack, job_id, runs, 2, two_process_reference)
    stack.kill_worker_host(worker)


def test_a_killed_launcher_takes_its_ranks_along_and_the_job_resumes_to_the_same_weights(
    stack, two_process_job, two_process_reference
):
    worker = stack.start_worker(gpus=2)
    job_id = submit(stack, two_process_job)
    with RunsAtOnce(job_id) as runs:
        wait(lambda: stack.has_checkpoint(job_id), "the first sharded checkpoint")
        ranks = set(wait(lambda: running_ranks(job_id), "both ranks").values())
        os.kill(wait(lambda: launcher(job_id), "the launcher"), signal.SIGKILL)
        wait(lambda: not ranks & set(job_processes(job_id)), "its ranks to die", timeout_s=10)
        assert_recovered(stack, job_id, runs, 2, two_process_reference)
    stack.kill_worker_host(worker)
