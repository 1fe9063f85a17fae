"""Settings shared by the API and the workers: one `Settings`, read from `WARP_*` variables.

With no `WARP_DATABASE_URL` the service keeps its state in a SQLite file under `WARP_HOME`
(embedded mode, see `client.embedded`); production points it at PostgreSQL. Workers need
only Redis and the artifact store, never the database.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
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
