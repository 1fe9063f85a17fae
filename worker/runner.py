"""Runs one job from a worker's task process: `warp run` as a child process group
(worker.process), reported through Redis.

The runner needs Redis and the artifact store only. It holds the job's lease (its heartbeat
is a thread here, beside the job's processes, never in them), checks the spec, starts the
job's processes and relays their events (throttled progress), polls the cancel and pause
flags, and stops every process on cancel, pause, timeout or a lost lease. How the processes
ended decides the rest: succeeded (the artifacts are uploaded), failed, cancelled, or
killed, which is no end at all: `AttemptLost` hands the job back to Celery, and its next
delivery resumes from the checkpoint in the job's work directory. One `finished` event
closes every job.

A pause ends the attempt, not the job: the processes stop at their next step as for a
cancel, a `paused` event is published, and the work directory (the checkpoint, the
localised inputs) stays for the delivery that a resume sends; nothing marks the job done.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Literal

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from service.config import settings
from service.lease import Lease
from service.protocol import (
    DONE_TTL_S,
    UPLOAD_PREFIX,
    EventPublisher,
    attempts_since_resume,
    job_key,
    redis_client,
)
from service.sources import job_model, source_problems
from service.status import JobStatus
from service.storage import ArtifactStore
from warp_core.events import Event
from warp_core.preflight import PreflightError, check_spec
from warp_core.spec import DatasetRef, JobSpec, format_validation_error
from worker.process import LOG_NAME, JobProcess, tail

log = logging.getLogger(__name__)

RELAY_S = 0.1
"""How often the runner reads the job's new events and looks at its processes."""

Stopped = Literal["cancelled", "paused", "timeout", "taken_over"]


class AttemptLost(RuntimeError):
    """The job's processes were killed (a rank or the launcher: SIGKILL, the OOM killer) or
    stopped by someone other than the service: the attempt ends without finishing the job,
    which runs again from its checkpoint."""


class JobRunner:
    def __init__(self, job_id: str, spec: dict[str, Any], client: redis.Redis | None = None):
        self.job_id = job_id
        self.raw_spec = spec
        self.client = client or redis_client(settings.resolved_redis_url)
        self.events = EventPublisher(self.client, settings.event_stream, job_id)
        self.store = ArtifactStore(settings.resolved_artifact_url)
        self.out = settings.resolved_work_dir / job_id
        self._last_poll = 0.0
        self._last_progress = 0.0

    def run(self) -> JobStatus | str:
        """Run the job to a terminal status and report it; returns that status.

        Raises LeaseHeld when another live worker is running the job (the task retries).
        A delivery of a job that has already finished does nothing, and neither does one of
        a paused job (a message that was on the queue when it was paused).
        """
        if finished := self.client.get(job_key(self.job_id, "done")):
            return finished.decode()
        if self.client.exists(job_key(self.job_id, "cancel")):
            return self.finish("cancelled")
        if self.client.exists(job_key(self.job_id, "pause")):
            return "paused"
        with Lease(self.client, self.job_id, settings.lease_s) as self.lease:
            attempt = self.client.incr(job_key(self.job_id, "attempt"))
            if attempts_since_resume(self.client, self.job_id) > settings.max_attempts:
                return self.give_up(attempt)
            self.events.publish("started", attempt=attempt, worker=socket.gethostname())
            return self.attempt(attempt)

    def give_up(self, attempt: int) -> JobStatus:
        """Fail a job whose every attempt died, with what the last one printed if it ran here."""
        message = (
            f"the job was started {settings.max_attempts} times without finishing (its worker "
            f"or its processes died each time); giving up after {settings.max_attempts} attempts"
        )
        if last_words := tail(self.attempt_dir(attempt - 1) / LOG_NAME):
            message += f". The last attempt's output ended with:\n{last_words}"
        return self.finish("failed", error={"code": "too_many_attempts", "message": message})

    def attempt(self, number: int) -> JobStatus | str:
        """Run the job's processes once and report how they ended.

        Raises AttemptLost when they were killed: the job is not finished, and runs again.
        """
        try:
            spec = self.prepare()
            with JobProcess(
                spec, self.out / "output", self.attempt_dir(number), self.job_id
            ) as child:
                stopped = self.watch(child)
            return self.conclude(child, stopped)
        except AttemptLost:
            raise
        except PreflightError as exc:
            return self.finish("failed", error={"code": "invalid_job", "message": str(exc)})
        except SoftTimeLimitExceeded:  # before the processes started, or after they ended
            return self.timed_out()
        except Exception as exc:  # reported to the user; the worker stays healthy
            log.exception("job %s failed", self.job_id)
            message = f"{type(exc).__name__}: {exc}"
            return self.finish("failed", error={"code": "job_error", "message": message})

    def attempt_dir(self, number: int) -> Path:
        """An attempt's spec, event file and log: apart from the other attempts', so a late
        writer of an earlier one can never be read as this one."""
        return self.out / "attempts" / str(number)

    def watch(self, child: JobProcess) -> Stopped | None:
        """Relay the child's events until its processes end; returns why the runner stopped
        them, or None if they ended by themselves.

        Cancel, pause and timeout ask every rank to stop at its next step (SIGTERM), and kill
        what still runs after `stop_grace_s`; a lost lease kills at once: the job belongs to
        another worker now, and its processes must not run beside that worker's.
        """
        stopped: Stopped | None = None
        while child.poll() is None:
            try:
                self.relay(child)
                if self.lease.lost.wait(RELAY_S):
                    child.kill()
                    return "taken_over"
                if stopped is None and (stopped := self.stop_requested()):
                    child.stop(settings.stop_grace_s)
            except SoftTimeLimitExceeded:
                stopped = "timeout"
                child.stop(settings.stop_grace_s)
        self.relay(child)
        return stopped

    def conclude(self, child: JobProcess, stopped: Stopped | None) -> JobStatus | str:
        """Report the attempt by how its processes ended, and why they were stopped."""
        if stopped == "taken_over":
            log.warning("job %s: another worker took it over; this attempt stops", self.job_id)
            return "taken_over"
        if stopped == "timeout":
            return self.timed_out()
        ending = child.ending()
        if ending.status == "succeeded":
            return self.succeed()
        if stopped == "cancelled":
            return self.finish("cancelled")
        if stopped == "paused" and ending.status != "failed":
            return self.pause()
        if ending.status == "failed":
            return self.finish("failed", error={"code": "job_error", "message": ending.message})
        log.warning("job %s: attempt lost (%s); it runs again", self.job_id, ending.message)
        raise AttemptLost(ending.message)

    def succeed(self) -> JobStatus:
        output = self.out / "output"
        metrics = json.loads((output / "metrics.json").read_text())
        for stored in self.store.upload_outputs(output, self.job_id):
            self.events.publish(
                "artifact", name=stored.name, size=stored.size, sha256=stored.sha256
            )
        return self.finish("succeeded", metrics=metrics)

    def pause(self) -> JobStatus | str:
        """Report the job paused and keep its work directory for the resume. A cancel that
        came while it was stopping wins: the job is cancelled instead."""
        if self.client.exists(job_key(self.job_id, "cancel")):
            return self.finish("cancelled")
        self.events.publish("paused")
        return "paused"

    def timed_out(self) -> JobStatus:
        message = f"the job ran longer than {settings.job_soft_time_limit_s} s"
        return self.finish("failed", error={"code": "timeout", "message": message})

    def prepare(self) -> JobSpec:
        """The spec with uploaded files and other jobs' models made local, checked before the
        model is loaded."""
        try:
            spec = JobSpec.model_validate(self.raw_spec)
        except ValidationError as exc:
            raise PreflightError(format_validation_error(exc)) from exc
        if problems := source_problems(spec, settings.data_roots):
            raise PreflightError("; ".join(f"{p['field']}: {p['reason']}" for p in problems))
        spec = spec.map_datasets(self.localise).model_copy(
            update={"base_model": self.localise_model(spec.base_model)}
        )
        check_spec(spec)
        return spec

    def localise_model(self, base_model: str) -> str:
        """Copy a model another job exported (`job:<id>/<dir>`) next to this job and name it
        by its path; any other base model as it is."""
        if (named := job_model(base_model)) is None:
            return base_model
        local = self.out / "inputs" / "models" / named["job_id"] / named["dir"]
        copied = (local / "config.json").exists() or self.store.download_job_dir(
            named["job_id"], named["dir"], local
        )
        if not copied:
            raise PreflightError(f"base_model: {base_model} is not in the artifact store")
        return str(local)

    def localise(self, ref: DatasetRef) -> DatasetRef:
        """Copy an uploaded file (`file:<id>`) next to the job and point the reference at it."""
        if not ref.source.startswith(UPLOAD_PREFIX):
            return ref
        file_id = ref.source.removeprefix(UPLOAD_PREFIX)
        matches = self.store.fs.glob(self.store.file_path(file_id, "*"))
        if not matches:
            raise PreflightError(f"uploaded file {file_id} is not in the artifact store")
        local = self.out / "inputs" / f"{file_id}{Path(matches[0]).suffix}"
        if not local.exists():
            self.store.download(matches[0], local)
        return ref.model_copy(update={"source": str(local)})

    def relay(self, child: JobProcess) -> None:
        for event in child.events():
            self.forward(event)

    def forward(self, event: Event) -> None:
        """Publish a pipeline event; progress at most twice a second (and every phase's end)."""
        if event.kind == "progress":
            now = time.monotonic()
            last = event.data["step"] >= event.data["total_steps"]
            if not last and now - self._last_progress < 0.5:
                return
            self._last_progress = now
        self.events.publish(event.kind, event.phase, **event.data)

    def stop_requested(self) -> Literal["cancelled", "paused"] | None:
        """Whether the job was cancelled or paused (a cancel wins), looked up at most every
        `cancel_poll_s`, both flags in one round trip."""
        now = time.monotonic()
        if now - self._last_poll < settings.cancel_poll_s:
            return None
        self._last_poll = now
        cancel, pause = self.client.mget(
            job_key(self.job_id, "cancel"), job_key(self.job_id, "pause")
        )
        if cancel:
            return "cancelled"
        return "paused" if pause else None

    def finish(self, status: JobStatus, **data: Any) -> JobStatus:
        """The final event. Scratch space goes; a crash (no finish) keeps it for the resume."""
        self.events.publish("finished", status=status, **data)
        self.client.set(job_key(self.job_id, "done"), status, ex=DONE_TTL_S)
        shutil.rmtree(self.out, ignore_errors=True)
        return status
