"""Tables: API keys, jobs, their events and artifacts, uploaded files. PostgreSQL is the
source of truth."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from api.db import Base, UtcDateTime, utcnow
from service.status import TERMINAL


class ApiKey(Base):
    """A caller. Only the key's SHA-256 is stored: keys are 256-bit random tokens, so a fast
    hash is as safe as a slow one and costs nothing per request."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    rate_limit_per_minute: Mapped[int | None] = mapped_column()
    max_active_jobs: Mapped[int | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str | None] = mapped_column(String(16))
    progress_fraction: Mapped[float] = mapped_column(default=0.0)
    progress_step: Mapped[int] = mapped_column(default=0)
    progress_total_steps: Mapped[int] = mapped_column(default=0)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(default=0)
    last_seq: Mapped[int] = mapped_column(default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    """OpenAI's `suffix`: part of the fine-tuned model's name."""
    user_metadata: Mapped[dict[str, str] | None] = mapped_column(JSON)
    """OpenAI's `metadata`: up to 16 string pairs the caller attached (the spec holds
    everything the job runs with, `seed` and `integrations` included)."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (Index("ix_jobs_created_at_id", "created_at", "id"),)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column()
    kind: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str | None] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    ingested_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (Index("uq_job_events_job_id_seq", "job_id", "seq", unique=True),)


class Artifact(Base):
    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


FilePurpose = Literal["fine-tune", "fine-tune-results"]
"""OpenAI's purposes that the files API knows: uploads are `fine-tune`; a job's step-metrics
file is `fine-tune-results`."""


class UploadedFile(Base):
    """A file of the files API: an upload (`fine-tune`), or a job's step-metrics results
    (`fine-tune-results`, `job_id` set), whose content is that job's artifact."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32), server_default="fine-tune")
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    """The job whose results file this is (jobs are never deleted, so no foreign key)."""
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column()
    """Parsed at upload; not counted for a job's results file."""
    columns: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (Index("ix_files_created_at_id", "created_at", "id"),)
