"""Job operations. Services flush but never commit: the request boundary does."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import TYPE_CHECKING

import redis
from sqlalchemy import bindparam, func, select, tuple_
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from api.auth import Caller, too_many
from api.db import utcnow
from api.dispatch import revoke, send
from api.errors import ApiError, conflict, invalid, not_found
from api.models import Artifact, Job, JobEvent, UploadedFile
from service.config import settings
from service.protocol import CANCEL_FLAG_TTL_S, UPLOAD_PREFIX, job_key
from service.sources import job_model, source_problems
from service.status import ACTIVE
from warp_core.spec import JobSpec

if TYPE_CHECKING:
    from warp_core.plan import ModelShape, Plan


def request_hash(spec: JobSpec, **labels: object) -> str:
    """The identity of a submission: its spec and the labels stored beside it."""
    spec_json = spec.model_dump(mode="json")
    body = {"spec": spec_json, **labels} if labels else spec_json
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(
    session: Session,
    spec: JobSpec,
    idempotency_key: str | None,
    caller: Caller,
    suffix: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[Job, bool]:
    """A new queued job, or the one already created with this idempotency key and body.

    Returns (job, created). The same key with another body is a 409; a caller with
    `max_active_jobs` queued or running jobs gets a 429. `suffix` and `metadata` are the
    fine-tuning API's labels, kept beside the spec.
    """
    labels = {"suffix": suffix, "metadata": metadata} if suffix or metadata else {}
    digest = request_hash(spec, **labels)
    if idempotency_key:
        idempotency_key = scoped_key(idempotency_key, caller)
        if existing := _by_key(session, idempotency_key):
            return _replayed(existing, digest), False
    _check_sources(spec)
    _check_memory(spec)
    _check_uploads(session, spec, caller)
    _check_job_model(session, spec, caller)
    _check_active_jobs(session, caller)
    job = Job(
        id=uuid.uuid4().hex,
        owner_id=caller.key_id,
        status="queued",
        spec=spec.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        request_hash=digest,
        suffix=suffix,
        user_metadata=metadata,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:  # a concurrent request with the same key won the race
        return _replayed(_by_key(session, idempotency_key), digest), False
    return job, True


def _by_key(session: Session, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.idempotency_key == key))


def scoped_key(idempotency_key: str, caller: Caller) -> str:
    """Idempotency keys are per API key: two callers may pick the same one."""
    return hashlib.sha256(f"{caller.key_id}\0{idempotency_key}".encode()).hexdigest()


def _replayed(job: Job | None, digest: str) -> Job:
    if job is None or job.request_hash != digest:
        raise conflict(
            "idempotency_conflict", "this Idempotency-Key was used with a different request body"
        )
    return job


def _check_active_jobs(session: Session, caller: Caller) -> None:
    if caller.key_id is None or caller.max_active_jobs is None:
        return
    query = select(func.count()).where(Job.owner_id == caller.key_id, Job.status.in_(ACTIVE))
    active = session.scalar(query)
    if active >= caller.max_active_jobs:
        raise too_many(
            "too_many_active_jobs",
            f"this key has {active} queued or running jobs (its limit is "
            f"{caller.max_active_jobs}); submit again when one has finished",
            60,
        )


def _check_sources(spec: JobSpec) -> None:
    if problems := source_problems(spec, settings.data_roots):
        raise invalid(problems)


def _check_memory(spec: JobSpec) -> None:
    """Refuse a job its workers cannot hold (`WARP_GPU_MEMORY_GIB`): a GPU count no worker
    class has, or a plan (`warp_core.plan`, from the model's config alone) whose peak per
    process exceeds its class's GPUs, naming the options that would make it fit.

    The config is read only where that needs no network: a local path (already checked to
    lie under `WARP_DATA_ROOTS`) or a Hub id in this host's cache. Otherwise (or with a
    config this transformers cannot build) the job goes through: the worker's preflight
    decides.
    """
    classes = settings.gpu_memory_gib
    if not classes:
        return
    gpus = spec.resources.gpus
    if gpus not in classes:
        counts = ", ".join(str(n) for n in sorted(classes))
        reason = f"no workers for {gpus} GPUs here; the worker classes have {counts} GPUs"
        raise invalid([{"field": "resources.gpus", "reason": reason}])
    from warp_core import plan  # torch loads only where memory is checked

    try:
        shape = plan.read_shape(spec.base_model, spec.hyperparameters.target_modules, True)
    except Exception:  # any reason it cannot be read here is the worker's to report
        return
    predicted = plan.plan(spec, shape)
    if predicted.peak > plan.usable_bytes(classes[gpus]):
        raise _does_not_fit(spec, shape, predicted, classes)


def _does_not_fit(
    spec: JobSpec, shape: ModelShape, predicted: Plan, classes: dict[int, float]
) -> ApiError:
    """The 422 of a job predicted not to fit its GPUs: the figure against the GPUs' size and
    the options that would make it fit (on this class, or on another one: `resources.gpus`),
    in the message and, for programs, in `error.memory`."""
    from warp_core.plan import GIB, lowest, usable_bytes, ways_to_fit

    def capacity(n: int) -> int | None:
        return usable_bytes(classes[n]) if n in classes else None

    gpus = spec.resources.gpus
    found = ways_to_fit(spec, shape, capacity, sorted(classes))
    changes = found[0] if found else []
    moves = any("resources.gpus" in change.fields for change in changes)
    reason = (
        f"predicted {predicted.peak / GIB:.1f} GiB per process ({predicted.largest.name}) "
        f"against GPUs of {classes[gpus]:g} GiB for {gpus}-GPU jobs "
        f"({capacity(gpus) / GIB:.1f} GiB usable); "
    )
    if found:
        labels = ", ".join(change.label for change in changes)
        reason += f"it would fit with {labels} ({found[1].peak / GIB:.1f} GiB)"
    else:
        best = lowest(spec, shape, sorted(classes)).peak / GIB
        reason += f"no option makes it fit the configured GPUs (at best {best:.1f} GiB)"
    field = {"field": "resources.gpus" if moves else "hyperparameters", "reason": reason}
    memory = {
        "predicted_bytes": predicted.peak,
        "phase": predicted.largest.name,
        "gpu_gib": classes[gpus],
        "usable_bytes": capacity(gpus),
        "options": [{"label": c.label, "fields": c.fields} for c in changes],
    }
    message = f"{field['field']}: {reason}"
    return ApiError(422, "invalid_request", message, fields=[field], memory=memory)


def _check_job_model(session: Session, spec: JobSpec, caller: Caller) -> None:
    """A `job:<id>/<dir>` base model is a model that job exported: the caller's job, which
    has succeeded (artifacts are stored when a job succeeds), with a config.json there."""
    if (named := job_model(spec.base_model)) is None:
        return
    source = session.get(Job, named["job_id"])
    if source is None or not caller.owns(source.owner_id):
        reason = f"no job {named['job_id']}"
    elif source.status != "succeeded":
        reason = f"job {source.id} is {source.status}: its models are stored once it succeeds"
    elif session.get(Artifact, (source.id, f"{named['dir']}/config.json")) is None:
        reason = f"job {source.id} has no model in {named['dir']}"
    else:
        return
    raise invalid([{"field": "base_model", "reason": reason}])


def _check_uploads(session: Session, spec: JobSpec, caller: Caller) -> None:
    for where, ref in spec.dataset_refs():
        if ref.source.startswith(UPLOAD_PREFIX):
            file_id = ref.source.removeprefix(UPLOAD_PREFIX)
            upload = session.get(UploadedFile, file_id)
            if upload is None or not caller.owns(upload.owner_id):
                reason = f"no uploaded file {file_id}"
                raise invalid([{"field": f"{where}.source", "reason": reason}])


def get_job(session: Session, job_id: str, caller: Caller, lock: bool = False) -> Job:
    """The job, if the caller may see it; another key's job is a 404 like a missing one."""
    job = session.get(Job, job_id, with_for_update=lock)
    if job is None or not caller.owns(job.owner_id):
        raise not_found("job", job_id)
    return job


JOB_OUT_COLUMNS = (
    Job.id,
    Job.owner_id,
    Job.status,
    Job.phase,
    Job.progress_fraction,
    Job.progress_step,
    Job.progress_total_steps,
    Job.spec,
    Job.metrics,
    Job.error_code,
    Job.error_message,
    Job.attempt,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
)
"""What `JobOut.of` reads of a job: a row of these has the attributes it needs."""


READ_JOB = select(*JOB_OUT_COLUMNS).where(Job.id == bindparam("job_id"))
"""Built once: executing the same statement object skips adapting the cached compiled
form's result columns to a new one, which was most of the query's CPU."""


async def read_job(connection: AsyncConnection, job_id: str, caller: Caller) -> Row:
    """`get_job` for the status poll: the columns a `JobOut` shows, in one Core query on
    the async read engine (an ORM load cost the poll a fifth of its CPU)."""
    row = (await connection.execute(READ_JOB, {"job_id": job_id})).first()
    if row is None or not caller.owns(row.owner_id):
        raise not_found("job", job_id)
    return row


def list_jobs(
    session: Session,
    status: str | None,
    limit: int,
    after: str | None,
    caller: Caller,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page. `metadata`:
    only jobs labelled with every one of these pairs."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if not caller.admin:
        query = query.where(Job.owner_id == caller.key_id)
    if status:
        query = query.where(Job.status == status)
    for key, value in (metadata or {}).items():
        query = query.where(Job.user_metadata[key].as_string() == value)
    if after:
        cursor = session.get(Job, after)
        if cursor is None or not caller.owns(cursor.owner_id):
            raise invalid([{"field": "after", "reason": f"no job {after}"}])
        query = query.where(tuple_(Job.created_at, Job.id) < (cursor.created_at, cursor.id))
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _finished(job: Job) -> ApiError:
    return conflict("job_finished", f"job {job.id} already {job.status}")


def _cancelling(job: Job) -> ApiError:
    return conflict("job_cancelling", f"job {job.id} is being cancelled")


def cancel_job(session: Session, client: redis.Redis, job_id: str, caller: Caller) -> Job:
    """Cooperative for a running or pausing job (a flag checked every step); immediate for a
    queued or paused one.

    A paused job's checkpoint is on its worker's work volume, which only a worker can
    reach: the job is sent once more, and the worker that takes it finds the cancel flag,
    reports `cancelled` and removes the work directory. Idempotent: cancelling a cancelling
    or cancelled job returns it unchanged.
    """
    job = get_job(session, job_id, caller, lock=True)
    if job.status in ("cancelling", "cancelled"):
        return job
    if job.finished:
        raise _finished(job)
    client.set(job_key(job_id, "cancel"), "1", ex=CANCEL_FLAG_TTL_S)
    if job.status == "queued":
        revoke(job_id)
        job.status, job.finished_at = "cancelled", utcnow()
    elif job.status == "paused":
        send(job.id, job.spec)
        job.status, job.finished_at = "cancelled", utcnow()
    else:
        job.status = "cancelling"
    return job


def pause_job(session: Session, client: redis.Redis, job_id: str, caller: Caller) -> Job:
    """Stop a job at its next step and keep its checkpoint: a running job is `pausing` until
    its worker has stopped it, a queued one `paused` at once.

    The flag stays while the job is paused: a delivery of it already on the queue finds it
    and leaves the job alone (the message is not revoked, since `resume` sends the job again
    under the same task id, which a revocation would drop too). Idempotent.
    """
    job = get_job(session, job_id, caller, lock=True)
    if job.status in ("pausing", "paused"):
        return job
    if job.finished:
        raise _finished(job)
    if job.status == "cancelling":
        raise _cancelling(job)
    client.set(job_key(job_id, "pause"), "1", ex=CANCEL_FLAG_TTL_S)
    job.status = "paused" if job.status == "queued" else "pausing"
    return job


def resume_job(
    session: Session, client: redis.Redis, job_id: str, caller: Caller
) -> tuple[Job, bool]:
    """Queue a paused job again (the outbox sends it); its next worker resumes from the
    checkpoint. Returns (job, resumed): a queued or running job is returned unchanged.

    The attempts before the resume no longer count against `max_attempts`. A job still
    pausing is a 409 worth retrying (it is paused within a step); the job counts against
    the key's active jobs again (429).
    """
    job = get_job(session, job_id, caller, lock=True)
    if job.status in ("queued", "running"):
        return job, False
    if job.status == "pausing":
        raise conflict(
            "job_pausing", f"job {job_id} is still pausing; resume it once paused", False
        )
    if job.finished:
        raise _finished(job)
    if job.status == "cancelling":
        raise _cancelling(job)
    _check_active_jobs(session, caller)
    started = client.get(job_key(job_id, "attempt")) or 0
    with client.pipeline() as pipe:
        pipe.set(job_key(job_id, "resumed_at"), started).delete(job_key(job_id, "pause"))
        pipe.execute()
    job.status, job.dispatched_at = "queued", None
    return job, True


def list_events(
    session: Session, job_id: str, after: int, limit: int, caller: Caller
) -> tuple[list[JobEvent], bool]:
    get_job(session, job_id, caller)
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit + 1)
    )
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def list_artifacts(session: Session, job_id: str, caller: Caller) -> list[Artifact]:
    get_job(session, job_id, caller)
    query = select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
    return list(session.scalars(query))


def get_artifact(session: Session, job_id: str, name: str, caller: Caller) -> Artifact:
    get_job(session, job_id, caller)
    artifact = session.get(Artifact, (job_id, name))
    if artifact is None:
        raise not_found("artifact", f"{job_id}/{name}")
    return artifact
