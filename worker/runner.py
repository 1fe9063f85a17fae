"""Runs one job inside a worker process: warp_core's pipeline, reported through Redis.

The runner needs Redis and the artifact store only. It publishes every pipeline event
(throttled progress), honours the cancel flag at every step, resumes from the job's work
directory after a redelivery, uploads the artifacts, and ends with one `finished` event.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from service.config import settings
from service.lease import Lease
from service.protocol import DONE_TTL_S, UPLOAD_PREFIX, EventPublisher, job_key, redis_client
from service.sources import source_problems
from service.status import JobStatus
from service.storage import ArtifactStore
from warp_core.preflight import PreflightError, check_spec
from warp_core.spec import DatasetRef, JobSpec, format_validation_error

log = logging.getLogger(__name__)


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
        A delivery of a job that has already finished does nothing.
        """
        if finished := self.client.get(job_key(self.job_id, "done")):
            return finished.decode()
        if self.client.exists(job_key(self.job_id, "cancel")):
            return self.finish("cancelled")
        with Lease(self.client, self.job_id, settings.lease_s) as self.lease:
            attempt = self.client.incr(job_key(self.job_id, "attempt"))
            if attempt > settings.max_attempts:
                message = (
                    f"the job was started {attempt - 1} times without finishing (its worker "
                    f"died each time); giving up after {settings.max_attempts} attempts"
                )
                return self.finish(
                    "failed", error={"code": "too_many_attempts", "message": message}
                )
            self.events.publish("started", attempt=attempt, worker=socket.gethostname())
            return self.attempt()

    def attempt(self) -> JobStatus | str:
        from warp_core.pipeline import Cancelled, run  # torch is imported in the child only

        try:
            spec = self.prepare()
            metrics = run(spec, self.out / "output", self.forward, self.should_stop)
            for stored in self.store.upload_outputs(self.out / "output", self.job_id):
                self.events.publish(
                    "artifact", name=stored.name, size=stored.size, sha256=stored.sha256
                )
            return self.finish("succeeded", metrics=metrics)
        except Cancelled:
            if self.lease.lost.is_set():
                log.warning("job %s: another worker took it over; this attempt stops", self.job_id)
                return "taken_over"
            return self.finish("cancelled")
        except PreflightError as exc:
            return self.finish("failed", error={"code": "invalid_job", "message": str(exc)})
        except SoftTimeLimitExceeded:
            message = f"the job ran longer than {settings.job_soft_time_limit_s} s"
            return self.finish("failed", error={"code": "timeout", "message": message})
        except Exception as exc:  # reported to the user; the worker stays healthy
            log.exception("job %s failed", self.job_id)
            message = f"{type(exc).__name__}: {exc}"
            return self.finish("failed", error={"code": "job_error", "message": message})

    def prepare(self) -> JobSpec:
        """The spec with uploaded files made local, checked before the model is loaded."""
        try:
            spec = JobSpec.model_validate(self.raw_spec)
        except ValidationError as exc:
            raise PreflightError(format_validation_error(exc)) from exc
        if problems := source_problems(spec, settings.data_roots):
            raise PreflightError("; ".join(f"{p['field']}: {p['reason']}" for p in problems))
        spec = spec.map_datasets(self.localise)
        check_spec(spec)
        return spec

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

    def forward(self, event: Any) -> None:
        """Publish a pipeline event; progress at most twice a second (and every phase's end)."""
        if event.kind == "progress":
            now = time.monotonic()
            last = event.data["step"] >= event.data["total_steps"]
            if not last and now - self._last_progress < 0.5:
                return
            self._last_progress = now
        self.events.publish(event.kind, event.phase, **event.data)

    def should_stop(self) -> bool:
        """True once the job is cancelled, or once another worker has taken it over (then
        `attempt` stops without reporting: the job is that worker's now)."""
        if self.lease.lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll < settings.cancel_poll_s:
            return False
        self._last_poll = now
        return bool(self.client.exists(job_key(self.job_id, "cancel")))

    def finish(self, status: JobStatus, **data: Any) -> JobStatus:
        """The final event. Scratch space goes; a crash (no finish) keeps it for the resume."""
        self.events.publish("finished", status=status, **data)
        self.client.set(job_key(self.job_id, "done"), status, ex=DONE_TTL_S)
        shutil.rmtree(self.out, ignore_errors=True)
        return status
