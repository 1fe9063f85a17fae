"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API, which the `openai` SDK's
`client.fine_tuning.jobs` calls (create, list, retrieve, cancel, pause, resume, list_events,
checkpoints.list). The jobs are the same as `/v1/jobs`' : one stored job, two views."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request, Response

from api.auth import CallerDep
from api.db import session_scope
from api.deps import RedisDep
from api.dispatch import dispatch_soon
from api.errors import ERROR_RESPONSES, error_response
from api.fine_tuning import service
from api.fine_tuning.schemas import (
    FineTuningCheckpointOut,
    FineTuningEventOut,
    FineTuningJobCreate,
    FineTuningJobOut,
)
from api.jobs import service as jobs
from api.paging import Page

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post(
    "",
    response_model=FineTuningJobOut,
    responses={409: error_response("The Idempotency-Key was used with another request")},
)
def create_job(
    request: FineTuningJobCreate,
    response: Response,
    background: BackgroundTasks,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FineTuningJobOut:
    """Queue a fine-tuning job: `method.type` supervised (plain fine-tuning) or warp (WaRP,
    with `method.warp.safety_file`). Its files are the caller's uploads."""
    with session_scope() as session:
        spec = service.create_spec(session, request, caller)
        job, created = jobs.create_job(
            session, spec, idempotency_key, caller, request.suffix, request.metadata
        )
        session.flush()
        out = service.job_out(session, job)
    if created:
        background.add_task(dispatch_soon)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return out


METADATA_PARAM = re.compile(r"metadata\[(.{1,64})\]", re.DOTALL)
"""How the SDK sends `list(metadata={"key": "value"})`: `metadata[key]=value`."""


@router.get("", response_model=Page[FineTuningJobOut])
def list_jobs(
    request: Request,
    caller: CallerDep,
    limit: Limit = 20,
    after: Annotated[str | None, Query(description="Last job id of the previous page")] = None,
) -> Page[FineTuningJobOut]:
    """The caller's jobs (submitted here or on /v1/jobs), newest first; `metadata[key]=value`
    parameters keep the jobs labelled with each pair."""
    metadata = {
        match[1]: value
        for name, value in request.query_params.multi_items()
        if (match := METADATA_PARAM.fullmatch(name))
    }
    with session_scope() as session:
        rows, has_more = jobs.list_jobs(session, None, limit, after, caller, metadata)
        data = [service.job_out(session, job) for job in rows]
        return Page[FineTuningJobOut](data=data, has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJobOut)
def retrieve_job(job_id: str, caller: CallerDep) -> FineTuningJobOut:
    with session_scope() as session:
        return service.job_out(session, jobs.get_job(session, job_id, caller))


@router.post(
    "/{job_id}/cancel",
    response_model=FineTuningJobOut,
    responses={409: error_response("The job already succeeded or failed")},
)
def cancel_job(job_id: str, client: RedisDep, caller: CallerDep) -> FineTuningJobOut:
    """Immediate for a queued or paused job; a running one stops at its next step."""
    with session_scope() as session:
        job = jobs.cancel_job(session, client, job_id, caller)
        session.flush()
        return service.job_out(session, job)


@router.post(
    "/{job_id}/pause",
    response_model=FineTuningJobOut,
    responses={409: error_response("The job has finished or is being cancelled")},
)
def pause_job(job_id: str, client: RedisDep, caller: CallerDep) -> FineTuningJobOut:
    """A running job stops at its next step keeping its checkpoint (`service_status`
    pausing, then `paused`); a queued one is paused at once."""
    with session_scope() as session:
        job = jobs.pause_job(session, client, job_id, caller)
        session.flush()
        return service.job_out(session, job)


@router.post(
    "/{job_id}/resume",
    response_model=FineTuningJobOut,
    responses={409: error_response("The job has finished, is being cancelled or still pausing")},
)
def resume_job(
    job_id: str, client: RedisDep, background: BackgroundTasks, caller: CallerDep
) -> FineTuningJobOut:
    """Queued again, the job continues from its checkpoint and ends with the weights an
    uninterrupted run would have."""
    with session_scope() as session:
        job, resumed = jobs.resume_job(session, client, job_id, caller)
        session.flush()
        out = service.job_out(session, job)
    if resumed:
        background.add_task(dispatch_soon)
    return out


@router.get("/{job_id}/events", response_model=Page[FineTuningEventOut])
def list_events(
    job_id: str,
    caller: CallerDep,
    after: Annotated[str | None, Query(description="Last event id of the previous page")] = None,
    limit: Limit = 20,
) -> Page[FineTuningEventOut]:
    """The job's events, newest first: messages, and `metrics` (step, train_loss,
    valid_loss, learning_rate) after every optimizer step. Progress ticks and stored files
    are on /v1/jobs/{id}/events."""
    with session_scope() as session:
        events, has_more = service.list_events(session, job_id, after, limit, caller)
    return Page[FineTuningEventOut](data=events, has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=Page[FineTuningCheckpointOut])
def list_checkpoints(
    job_id: str,
    caller: CallerDep,
    after: Annotated[
        str | None, Query(description="Last checkpoint id of the previous page")
    ] = None,
    limit: Limit = 10,
) -> Page[FineTuningCheckpointOut]:
    """The intermediate models the job exported (`hyperparameters.n_checkpoints`), newest
    first; each `fine_tuned_model_checkpoint` is a `model` for a new job once this one has
    succeeded (its models are stored then)."""
    with session_scope() as session:
        checkpoints, has_more = service.list_checkpoints(session, job_id, after, limit, caller)
    return Page[FineTuningCheckpointOut](data=checkpoints, has_more=has_more)
