"""Settings shared by the API and the workers: one `Settings`, read from `WARP_*` variables.

With no `WARP_DATABASE_URL` the service keeps its state in a SQLite file under `WARP_HOME`
(embedded mode, see `client.embedded`); production points it at PostgreSQL. Workers need
only Redis and the artifact store, never the database.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WARP_", extra="ignore")

    home: Path = Field(Path(".warp"), description="Where embedded state and work dirs live.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL (postgresql+psycopg://...); default: SQLite in home."
    )
    redis_url: str | None = Field(
        None, description="Broker, event stream and cancel flags (redis://host:6379/0)."
    )
    artifact_url: str | None = Field(
        None, description="fsspec URL of the artifact store (file:///..., s3://...)."
    )
    work_dir: Path | None = Field(
        None, description="Worker-local scratch space for running jobs (checkpoints)."
    )
    queue: str = Field(
        "gpu",
        description="Name of the job queues: jobs for one GPU go to this queue, jobs for N "
        "GPUs to QUEUE-xN (service.protocol.job_queue).",
    )
    worker_gpus: int = Field(
        1, ge=1, description="GPUs of this worker: it consumes the queue of jobs for that many."
    )
    event_stream: str = Field("warp:events", description="Redis Stream carrying job events.")
    ingest_group: str = Field("ingesters", description="Consumer group of the API ingesters.")
    ingest_reclaim_idle_ms: int = Field(
        30_000, description="Pending events idle this long are reclaimed from dead consumers."
    )
    job_soft_time_limit_s: int = Field(
        3 * 24 * 3600, description="A job is asked to stop (and fails) after this long."
    )
    job_time_limit_s: int = Field(
        3 * 24 * 3600 + 600, description="The worker child is killed after this long."
    )
    max_upload_bytes: int = Field(100 * 1024 * 1024, description="Largest accepted upload.")
    cancel_poll_s: float = Field(0.5, description="How often a running job checks its flag.")
    stop_grace_s: float = Field(
        60.0,
        gt=0,
        description="A job asked to stop (cancelled, timed out) gets this long to reach its "
        "next step and exit before its processes are killed.",
    )
    lease_s: float = Field(
        30.0, gt=0, description="A worker's hold on a job lapses this long after it dies."
    )
    max_attempts: int = Field(
        3, ge=1, description="Deliveries of one job before it fails instead of running again."
    )
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Directories jobs may read local models and data from (JSON list); "
        "empty: Hub ids and uploads only. Embedded mode allows everything.",
    )
    gpu_memory_gib: dict[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="The worker classes and their GPUs (JSON object: GPU count -> GiB of each "
        'GPU, e.g. {"1": 80, "8": 80}). When set, the API refuses a job whose resources.gpus '
        "is not a class, or whose predicted memory per process (warp_core.plan) does not fit "
        "its class's GPUs. Empty: no memory check.",
    )
    auth_required: bool = Field(
        True, description="Require an API key; only embedded mode turns this off."
    )
    auth_cache_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Seconds an API process reuses a key lookup (0: look up every request). "
        "Revocation still applies at the next request through Redis.",
    )
    rate_limit_per_minute: int = Field(
        1200, ge=1, description="Requests per minute per API key (a key may set its own)."
    )
    max_active_jobs: int = Field(
        8, ge=1, description="Queued or running jobs per API key (a key may set its own)."
    )

    @model_validator(mode="after")
    def _stop_before_the_hard_time_limit(self) -> Settings:
        """A timed-out job is asked to stop and given `stop_grace_s`; the hard limit must come
        later, or it would kill the worker child mid-stop and Celery would requeue the job
        instead of reporting its timeout."""
        if self.job_soft_time_limit_s + self.stop_grace_s >= self.job_time_limit_s:
            raise ValueError(
                "WARP_JOB_TIME_LIMIT_S must exceed WARP_JOB_SOFT_TIME_LIMIT_S + "
                "WARP_STOP_GRACE_S (a timed-out job is stopped, then reported)"
            )
        return self

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.home / 'warp.db').resolve()}"

    @cached_property
    def resolved_artifact_url(self) -> str:
        return self.artifact_url or (self.home / "artifacts").resolve().as_uri()

    @cached_property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or (self.home / "work").resolve()

    @cached_property
    def resolved_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "WARP_REDIS_URL is not set: point it at Redis, or start everything with "
                "`warp serve` (embedded mode)"
            )
        return self.redis_url


settings = Settings()
