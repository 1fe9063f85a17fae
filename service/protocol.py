"""The wire between workers and the API: the task name, the job queues, every Redis key, and
the job event stream format.

A worker appends events to one Redis Stream; the API's ingester (api.ingest) writes them to
the database. Each event carries a per-job sequence number taken from a Redis counter in the
same atomic script as the append, so numbers are gap-free across retries and redeliveries and
the ingester can insert them idempotently.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.config import settings

TASK = "warp.run_job"
"""The Celery task that runs a job: `(job_id, spec)`, with the job id as the task id."""


def job_queue(gpus: int) -> str:
    """The Celery queue of jobs that run on `gpus` GPUs (`resources.gpus`), which only workers
    started for that many GPUs consume (`WARP_WORKER_GPUS`): `WARP_QUEUE` for one, as before
    there were several (so existing workers keep their jobs), `WARP_QUEUE-xN` for N."""
    return settings.queue if gpus == 1 else f"{settings.queue}-x{gpus}"


UPLOAD_PREFIX = "file:"
"""A dataset source `file:<id>` names a file uploaded through the API."""

JOB_MODEL_PREFIX = "job:"
"""A base model `job:<job_id>/<dir>` names a model another job exported: its `model` or one
of its intermediate checkpoints (`models/step-N`), read from the artifact store."""

# INCR and XADD in one script: no event can take a number without being appended.
_APPEND = """
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1], 'seq', seq, 'kind', ARGV[2],
           'phase', ARGV[3], 'data', ARGV[4], 'ts', ARGV[5])
return seq
"""


def redis_client(url: str) -> redis.Redis:
    """A client that rides out dropped connections and short outages (a Redis restart, a
    failover) by reconnecting with backoff for about ten seconds before giving up."""
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=10),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
    )


# -- every Redis key (Celery's own queue lists are kombu's, see api.dispatch) ---------------


JobKey = Literal["seq", "cancel", "pause", "attempt", "resumed_at", "lease", "done", "reaping"]


def job_key(job_id: str, name: JobKey) -> str:
    """A job's Redis key `warp:job:{job_id}:{name}`:

    - `seq`: the event counter, the next event's number;
    - `cancel`: set when the job is cancelled (a running job polls it);
    - `pause`: set while the job is paused or pausing (a running job polls it; a delivery
      that finds it leaves the job alone), removed when it is resumed;
    - `attempt`: how many times a worker has started the job (attempt numbers never repeat,
      so each attempt's directory is its own);
    - `resumed_at`: the attempt count when the job was last resumed: only the attempts after
      it count against `max_attempts` (`attempts_since_resume`), so pausing is no failure;
    - `lease`: the token of the worker running it, kept alive by its heartbeat (service.lease);
    - `done`: the final status, once finished: a late duplicate delivery, or the reaper, sees
      it and leaves the job alone;
    - `reaping`: taken by the one API replica that recovers a job found without a worker.
    """
    return f"warp:job:{job_id}:{name}"


CANCEL_FLAG_TTL_S = 30 * 24 * 3600
"""How long a cancel or pause flag stays: longer than any job runs or waits paused."""


def attempts_since_resume(client: redis.Redis, job_id: str) -> int:
    """The job's deliveries since it was submitted or last resumed: what `max_attempts`
    bounds. A paused attempt ended cleanly; the ones before a resume are not held against
    the job, while every attempt keeps its own number."""
    started, resumed_at = client.mget(job_key(job_id, "attempt"), job_key(job_id, "resumed_at"))
    return int(started or 0) - int(resumed_at or 0)


DONE_TTL_S = 30 * 24 * 3600
"""How long the done marker outlives the job: longer than any redelivery can be late."""


def revoked_key(key_id: str) -> str:
    """Set when an API key is revoked, so every API process refuses it at once."""
    return f"warp:key:{key_id}:revoked"


def rate_key(key_id: str, window: int) -> str:
    """An API key's request counter for one minute (`window` = minutes since the epoch)."""
    return f"warp:rate:{key_id}:{window}"


@dataclass(frozen=True)
class JobEventMessage:
    """One event as it travels on the stream."""

    job_id: str
    seq: int
    kind: str
    phase: str | None
    data: dict[str, Any]
    ts: float

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> JobEventMessage:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            job_id=text["job_id"],
            seq=int(text["seq"]),
            kind=text["kind"],
            phase=text["phase"] or None,
            data=json.loads(text["data"]),
            ts=float(text["ts"]),
        )


class EventPublisher:
    """Appends a job's events to the stream with their sequence numbers."""

    def __init__(self, client: redis.Redis, stream: str, job_id: str) -> None:
        self.client = client
        self.stream = stream
        self.job_id = job_id
        self._append = client.register_script(_APPEND)
        # Load it now: the first EVALSHA then finds it (fakeredis, in embedded mode, drops
        # the connection on a NOSCRIPT reply instead of letting the client load it).
        client.script_load(_APPEND)

    def publish(self, kind: str, phase: str | None = None, **data: Any) -> int:
        return int(
            self._append(
                keys=[job_key(self.job_id, "seq"), self.stream],
                args=[self.job_id, kind, phase or "", json.dumps(data), repr(time.time())],
            )
        )
