"""`/v1/jobs`: submit, read, list, cancel, pause, resume, events (paged and live), artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from sse_starlette.sse import EventSourceResponse

from api.auth import Caller, CallerDep
from api.db import read_engine, session_scope
from api.deps import RedisDep, StoreDep
from api.dispatch import dispatch_soon
from api.errors import ERROR_RESPONSES, ApiError, error_response
from api.jobs import service
from api.jobs.schemas import ArtifactOut, Comparison, EventOut, JobOut
from api.paging import Page
from service.status import JobStatus
from service.storage import CHUNK
from warp_core.comparison import comparison_markdown, labels
from warp_core.spec import JobSpec

MAX_SEQ = 2**31 - 1
"""Event sequence numbers are a 32-bit column: a larger `after` is refused up front."""
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)
compare_router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=JobOut)
def submit_job(
    spec: JobSpec,
    response: Response,
    background: BackgroundTasks,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    """Queue a job. The same Idempotency-Key and body return the same job; another body, 409."""
    with session_scope() as session:
        job, created = service.create_job(session, spec, idempotency_key, caller)
        out = JobOut.of(job)
    if created:
        background.add_task(dispatch_soon)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return out


@router.get("", response_model=Page[JobOut])
def list_jobs(
    caller: CallerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    after: Annotated[str | None, Query(description="Last job id of the previous page")] = None,
) -> Page[JobOut]:
    """Jobs, newest first, cursor-paginated."""
    with session_scope() as session:
        jobs, has_more = service.list_jobs(session, status, limit, after, caller)
        return Page[JobOut](data=[JobOut.of(job) for job in jobs], has_more=has_more)


@compare_router.get("/v1/compare", response_model=Comparison)
def compare_jobs(
    caller: CallerDep,
    ids: Annotated[list[str], Query(min_length=1, max_length=8, description="Job ids")],
) -> Comparison:
    """Jobs side by side (typically `warp` and `full` on one spec): before/after metrics,
    settings and the refusal rule, plus the same as a Markdown table."""
    with session_scope() as session:
        jobs = [JobOut.of(service.get_job(session, job_id, caller)) for job_id in ids]
    names = labels([(job.id, job.spec) for job in jobs])
    entries = [(name, job.metrics or {}) for name, job in zip(names, jobs, strict=True)]
    rules = {job.metrics["refusal_rule"] for job in jobs if job.metrics}
    return Comparison(
        jobs=jobs,
        labels=names,
        refusal_rule=rules.pop() if len(rules) == 1 else None,
        markdown=comparison_markdown(entries),
    )


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses={304: {"description": "Not modified: the job is as the `ETag` sent says"}},
)
async def get_job(
    job_id: str,
    caller: CallerDep,
    if_none_match: Annotated[str | None, Header(description="An `ETag` of this job")] = None,
) -> Response:
    """The job. Its `ETag` changes whenever anything in the answer does: send it back as
    `If-None-Match` and an unchanged job is a `304` with no body.

    The status poll every client repeats: async on the read engine (one database round
    trip, no thread-pool hop) and serialized once, by pydantic, without a second pass
    through FastAPI's response validation."""
    async with read_engine.connect() as connection:
        job = await service.read_job(connection, job_id, caller)
    body = JobOut.of(job).model_dump_json().encode()
    etag = f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'
    if if_none_match is not None and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={409: error_response("The job already succeeded or failed")},
)
def cancel_job(job_id: str, client: RedisDep, caller: CallerDep) -> JobOut:
    """Cancel: immediate for a queued or paused job, cooperative (next step) for a running
    one."""
    with session_scope() as session:
        return JobOut.of(service.cancel_job(session, client, job_id, caller))


@router.post(
    "/{job_id}/pause",
    response_model=JobOut,
    responses={409: error_response("The job has finished or is being cancelled")},
)
def pause_job(job_id: str, client: RedisDep, caller: CallerDep) -> JobOut:
    """Pause: a running job stops at its next step keeping its checkpoint (`pausing`, then
    `paused`); a queued one is paused at once."""
    with session_scope() as session:
        return JobOut.of(service.pause_job(session, client, job_id, caller))


@router.post(
    "/{job_id}/resume",
    response_model=JobOut,
    responses={
        409: error_response("The job has finished, is being cancelled, or is still pausing")
    },
)
def resume_job(
    job_id: str, client: RedisDep, background: BackgroundTasks, caller: CallerDep
) -> JobOut:
    """Resume a paused job: queued again, it continues from its checkpoint and ends with the
    weights an uninterrupted run would have."""
    with session_scope() as session:
        job, resumed = service.resume_job(session, client, job_id, caller)
        out = JobOut.of(job)
    if resumed:
        background.add_task(dispatch_soon)
    return out


@router.get("/{job_id}/events", response_model=Page[EventOut])
def list_events(
    job_id: str,
    caller: CallerDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ, description="Last seq already seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[EventOut]:
    """A job's events in `seq` order (1, 2, 3, ... without gaps)."""
    with session_scope() as session:
        events, has_more = service.list_events(session, job_id, after, limit, caller)
        return Page[EventOut](data=[EventOut.of(e) for e in events], has_more=has_more)


@router.get(
    "/{job_id}/events/stream",
    response_class=EventSourceResponse,
    responses={200: {"description": "Server-Sent Events", "content": {"text/event-stream": {}}}},
)
async def stream_events(
    job_id: str,
    request: Request,
    caller: CallerDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    # SkipJsonSchema: optional, but a header cannot be `null` as `int | None` would declare.
    last_event_id: Annotated[Seq | SkipJsonSchema[None], Header()] = None,
) -> EventSourceResponse:
    """The events as Server-Sent Events (`id` = seq), live until the job ends."""
    await run_in_threadpool(_events_page, job_id, 0, caller)  # 404 before the stream starts
    start = last_event_id if last_event_id is not None else after
    return EventSourceResponse(_event_stream(job_id, start, request, caller), ping=15)


def _events_page(job_id: str, after: int, caller: Caller) -> tuple[list[EventOut], bool]:
    with session_scope() as session:
        events, _ = service.list_events(session, job_id, after, 500, caller)
        finished = service.get_job(session, job_id, caller).finished
        return [EventOut.of(e) for e in events], finished


async def _event_stream(
    job_id: str, after: int, request: Request, caller: Caller
) -> AsyncIterator[dict]:
    while not await request.is_disconnected():
        events, finished = await run_in_threadpool(_events_page, job_id, after, caller)
        for event in events:
            after = event.seq
            yield {"id": str(event.seq), "event": event.kind, "data": event.model_dump_json()}
        if finished and not events:
            return
        if not events:
            await asyncio.sleep(0.5)


@router.get("/{job_id}/artifacts", response_model=Page[ArtifactOut])
def list_artifacts(job_id: str, caller: CallerDep) -> Page[ArtifactOut]:
    """Every file of the job's output directory, with its size and sha256."""
    with session_scope() as session:
        artifacts = service.list_artifacts(session, job_id, caller)
    return Page[ArtifactOut](data=[ArtifactOut.of(a) for a in artifacts], has_more=False)


RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range asked for, None for the whole file; 416 if unsatisfiable."""
    if header is None:
        return None
    match = RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        return None  # multi-range or malformed: a server may answer with the whole file
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"{header} is outside 0-{size - 1}",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The whole file", "content": {"application/octet-stream": {}}},
        206: {"description": "Partial content", "content": {"application/octet-stream": {}}},
        416: error_response("The range lies outside the file"),
    },
)
def download_artifact(
    job_id: str, name: str, store: StoreDep, request: Request, caller: CallerDep
) -> StreamingResponse:
    """The file, streamed; `Range: bytes=a-b` fetches part of it (resumable downloads)."""
    with session_scope() as session:
        artifact = service.get_artifact(session, job_id, name, caller)
    byte_range = parse_range(request.headers.get("range"), artifact.size)
    start, end = byte_range or (0, artifact.size - 1)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start + 1),
        "ETag": f'"{artifact.sha256}"',
        "Content-Disposition": f'attachment; filename="{name.rsplit("/", 1)[-1]}"',
    }
    if byte_range:
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.size}"
    body = _read(store, store.job_path(job_id, name), start, end - start + 1)
    return StreamingResponse(
        body, 206 if byte_range else 200, headers, media_type="application/octet-stream"
    )


def _read(store, path: str, start: int, length: int) -> Iterator[bytes]:
    with store.open(path) as source:
        source.seek(start)
        while length > 0 and (chunk := source.read(min(CHUNK, length))):
            length -= len(chunk)
            yield chunk
