"""What the jobs endpoints answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Row

from api.models import Artifact, Job, JobEvent
from service.status import JobStatus


class Progress(BaseModel):
    fraction: float = Field(ge=0, le=1)
    step: int
    total_steps: int

    @classmethod
    def of(cls, job: Job | Row) -> Progress:
        """A job's progress as both views of it (native and OpenAI) show it."""
        return cls(
            fraction=job.progress_fraction,
            step=job.progress_step,
            total_steps=job.progress_total_steps,
        )


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    status: JobStatus
    phase: Literal["basis", "importance", "finetune", "evaluate"] | None
    progress: Progress
    spec: dict[str, Any]
    metrics: dict[str, Any] | None
    error: JobError | None
    attempt: int = Field(description="1 on the first run, +1 on each redelivery (0: not started)")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job | Row) -> JobOut:
        """A job as answered: an ORM `Job`, or a row of `service.JOB_OUT_COLUMNS`."""
        return cls(
            id=job.id,
            status=job.status,
            phase=job.phase,
            progress=Progress.of(job),
            spec=job.spec,
            metrics=job.metrics,
            error=JobError(code=job.error_code, message=job.error_message or "")
            if job.error_code
            else None,
            attempt=job.attempt,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class EventOut(BaseModel):
    """A `JobEvent` row as it is answered (`EventOut.of(row)`)."""

    model_config = ConfigDict(from_attributes=True)

    seq: int
    kind: str
    phase: str | None
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls.model_validate(event)


class ArtifactOut(BaseModel):
    """An `Artifact` row as it is answered (`ArtifactOut.of(row)`)."""

    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="Path inside the job's output directory")
    size: int
    sha256: str

    @classmethod
    def of(cls, artifact: Artifact) -> ArtifactOut:
        return cls.model_validate(artifact)


class Comparison(BaseModel):
    jobs: list[JobOut]
    labels: list[str] = Field(description="What each job is (`warp`, `full, poison 0.1`, ...)")
    refusal_rule: str | None = Field(description="The rule all compared jobs used, if one")
    markdown: str = Field(description="Before/after metrics per job as a Markdown table")
