"""OpenAI's fine-tuning API over this service's jobs: a request becomes a `JobSpec` (and the
native job service stores and runs it), a job reads back as a `fine_tuning.job`, its events as
`fine_tuning.job.event`s and its exported models as `fine_tuning.job.checkpoint`s.

How OpenAI's terms map (README, "The OpenAI-compatible API", says the same for users):

- `method.type`: `supervised` is our `method: full`, `warp` is WaRP.
- `n_epochs` is `epochs`; `"auto"` keeps the spec's default (3) or our `max_steps`.
- `batch_size` counts examples per optimizer step, ours per micro-batch: B examples run as
  micro-batches of the largest divisor of B up to 8 (or B / `grad_accum_steps` if that is
  given) times as many accumulation steps; `"auto"` is the spec's 8 x 2 = 16.
- `learning_rate_multiplier` scales `learning_rate` (given, or the spec's 5e-5); a job reports
  its multiplier as its learning rate over 5e-5. `"auto"` is 1.
- Files: a training file of chat `messages` rows is read with the `chat` preset; one with
  `prompt` and `completion` (or `response`) columns by those columns.
- Before/after evaluation runs when a job has both a validation file and a safety file: the
  refusal rate on held-out rows of the safety file (its last fifth, at most `eval.limit`
  rows, which Phases 1-2 then do not read), over-refusal and utility loss on the validation
  file. Without them the job is evaluated by its training and validation loss only.

Services flush but never commit: the request boundary does.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import Caller
from api.db import utcnow
from api.errors import field_errors, invalid
from api.fine_tuning.schemas import (
    CheckpointMetrics,
    FineTuneHyperparameters,
    FineTuningCheckpointOut,
    FineTuningError,
    FineTuningEventOut,
    FineTuningJobCreate,
    FineTuningJobOut,
    FineTuningStatus,
    MethodOut,
    MethodSettingsOut,
    OpenAIHyperparametersOut,
    unix,
)
from api.jobs.schemas import ArtifactOut, Progress
from api.jobs.service import get_job
from api.models import Artifact, Job, JobEvent, UploadedFile
from service.protocol import JOB_MODEL_PREFIX, UPLOAD_PREFIX
from warp_core.spec import EvalSpec, Hyperparameters, JobSpec

OPENAI_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")
REFERENCE_LEARNING_RATE = Hyperparameters.model_fields["learning_rate"].default
"""The learning rate a multiplier of 1 stands for (the spec's default, 5e-5)."""
MAX_MICRO_BATCH = 8
"""The largest micro-batch OpenAI's `batch_size` is split into."""
HELD_OUT_SHARE = 5
"""A fifth of the safety file (at most `eval.limit` rows) is held out for the refusal rate."""


STATUS: dict[str, FineTuningStatus] = {
    "queued": "queued",
    "running": "running",
    "pausing": "running",
    "paused": "paused",
    "cancelling": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}
"""Our status -> OpenAI's. A job pausing or being cancelled still runs until its worker stops
it at the next step, so it is `running` (the native `service_status` tells them apart)."""

EVENT_ID = re.compile(r"(?:ftevent-[0-9a-f]{32}-)?(\d{1,10})")
CHECKPOINT_ID = re.compile(r"(?:ftckpt-[0-9a-f]{32}-)?(\d{1,10})")
HIDDEN_KINDS = ("progress", "artifact")
"""Native events the OpenAI event list leaves out: progress ticks and stored files."""


# -- a request -> a spec ----------------------------------------------------------------------


def create_spec(session: Session, request: FineTuningJobCreate, caller: Caller) -> JobSpec:
    """The `JobSpec` a fine-tuning request stands for; a 422 naming the request's field when
    something in it cannot be run."""
    method = request.method.type if request.method else "supervised"
    settings = request.method.settings if request.method else None
    where = f"method.{method}"
    hp_given = settings is not None and settings.hyperparameters.model_fields_set
    if hp_given and request.hyperparameters is not None:
        reason = f"give hyperparameters in {where}.hyperparameters only"
        raise invalid([{"field": "hyperparameters", "reason": reason}])
    if hp_given or request.hyperparameters is None:
        hp_where = f"{where}.hyperparameters"
        hp = settings.hyperparameters if settings else FineTuneHyperparameters()
    else:
        hp_where, hp = "hyperparameters", request.hyperparameters

    training = _upload(session, request.training_file, "training_file", caller)
    validation = (
        _upload(session, request.validation_file, "validation_file", caller)
        if request.validation_file
        else None
    )
    safety = (
        _upload(session, settings.safety_file, f"{where}.safety_file", caller)
        if settings is not None and settings.safety_file
        else None
    )
    hyperparameters = spec_hyperparameters(hp, hp_where)
    if request.seed is not None:
        hyperparameters["seed"] = request.seed
    eval_given = settings.eval.model_dump(exclude_unset=True) if settings else {}
    body: dict[str, Any] = {
        "base_model": request.model,
        "method": "warp" if method == "warp" else "full",
        "utility_data": _ref(training, "training_file"),
        "hyperparameters": hyperparameters,
        "integrations": [i.model_dump() for i in request.integrations or []],
    }
    if validation is not None:
        body["validation_data"] = _ref(validation, "validation_file")
    safety_ref = _ref(safety, f"{where}.safety_file") if safety else body["utility_data"]
    body["safety_data"] = safety_ref
    body["eval"] = {**eval_given, "enabled": False}
    if safety is not None and validation is not None and eval_given.get("enabled", True):
        limit = eval_given.get("limit") or EvalSpec.model_fields["limit"].default
        held = min(limit, (safety.rows or 0) // HELD_OUT_SHARE)
        if held >= 1:
            kept = (safety.rows or 0) - held
            body["safety_data"] = {**safety_ref, "limit": kept}
            body["eval"] = {
                **eval_given,
                "enabled": True,
                "harmful": {**safety_ref, "offset": kept, "limit": held},
                "benign": {**body["validation_data"], "limit": limit},
                "utility": {**body["validation_data"], "limit": limit},
            }
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        raise invalid(_request_fields(field_errors(list(exc.errors())), where, hp_where)) from exc


def _request_fields(fields: list[dict[str, str]], where: str, hp_where: str) -> list[dict]:
    """A spec's field errors under the request's names."""
    names = {
        "base_model": "model",
        "utility_data": "training_file",
        "validation_data": "validation_file",
        "safety_data": f"{where}.safety_file",
        "hyperparameters": hp_where,
        "eval": f"{where}.eval",
    }
    renamed = []
    for field in fields:
        head, dot, rest = field["field"].partition(".")
        renamed.append({**field, "field": names.get(head, head) + dot + rest})
    return renamed


def spec_hyperparameters(hp: BaseModel, where: str) -> dict[str, Any]:
    """OpenAI's names and ours -> `JobSpec.hyperparameters` (module docstring: the mapping)."""
    ours = hp.model_dump(include=hp.model_fields_set - set(OPENAI_NAMES))
    epochs = getattr(hp, "n_epochs", "auto")
    if epochs != "auto":
        if "epochs" in ours:
            reason = "give n_epochs or epochs, not both"
            raise invalid([{"field": f"{where}.n_epochs", "reason": reason}])
        ours["epochs"] = epochs
    batch = getattr(hp, "batch_size", "auto")
    if batch != "auto":
        accum = ours.get("grad_accum_steps")
        if accum is None:
            micro = max(d for d in range(1, min(batch, MAX_MICRO_BATCH) + 1) if batch % d == 0)
            accum = batch // micro
        elif batch % accum:
            reason = f"{batch} examples per step do not split into {accum} accumulation steps"
            raise invalid([{"field": f"{where}.batch_size", "reason": reason}])
        ours["batch_size"], ours["grad_accum_steps"] = batch // accum, accum
    multiplier = getattr(hp, "learning_rate_multiplier", "auto")
    if multiplier != "auto":
        ours["learning_rate"] = ours.get("learning_rate", REFERENCE_LEARNING_RATE) * multiplier
    return ours


def _upload(session: Session, file_id: str, field: str, caller: Caller) -> UploadedFile:
    row = session.get(UploadedFile, file_id)
    if row is None or not caller.owns(row.owner_id):
        raise invalid([{"field": field, "reason": f"no file {file_id}"}])
    if row.purpose != "fine-tune":
        reason = f"file {file_id} is a {row.purpose} file, not a fine-tune upload"
        raise invalid([{"field": field, "reason": reason}])
    return row


def _ref(row: UploadedFile, field: str) -> dict[str, Any]:
    """How the job reads an upload: chat `messages` rows, or prompt and completion columns."""
    source = f"{UPLOAD_PREFIX}{row.id}"
    columns = set(row.columns or ())
    if "messages" in columns:
        return {"source": source, "preset": "chat"}
    for response in ("completion", "response"):
        if {"prompt", response} <= columns:
            return {"source": source, "prompt_field": "prompt", "response_field": response}
    reason = (
        f"file {row.id} is neither chat data (a messages column) nor prompt and completion "
        f"columns (it has {sorted(columns)})"
    )
    raise invalid([{"field": field, "reason": reason}])


# -- a job -> a fine_tuning.job ---------------------------------------------------------------


def fine_tuned_model(job_id: str, directory: str = "model") -> str:
    """The name of a model a job exported, usable as another job's `model`."""
    return f"{JOB_MODEL_PREFIX}{job_id}/{directory}"


def _file_id(source: str) -> str:
    """An upload's file id, or a dataset's own source for a job submitted natively."""
    return source.removeprefix(UPLOAD_PREFIX)


def job_out(session: Session, job: Job) -> FineTuningJobOut:
    spec = JobSpec.model_validate(job.spec)
    hp = spec.hyperparameters
    method = "warp" if spec.method == "warp" else "supervised"
    openai_hp = OpenAIHyperparametersOut(
        n_epochs=hp.epochs,
        batch_size=hp.batch_size * hp.grad_accum_steps,
        learning_rate_multiplier=hp.learning_rate / REFERENCE_LEARNING_RATE,
    )
    settings = MethodSettingsOut(
        hyperparameters={**openai_hp.model_dump(), **hp.model_dump(mode="json")},
        safety_file=_file_id(spec.safety_data.source) if method == "warp" else None,
    )
    succeeded = job.status == "succeeded"
    artifacts = (
        list(session.scalars(select(Artifact).where(Artifact.job_id == job.id)))
        if succeeded
        else []
    )
    results = session.scalars(
        select(UploadedFile.id).where(UploadedFile.job_id == job.id).order_by(UploadedFile.id)
    )
    training = (job.metrics or {}).get("training") or {}
    return FineTuningJobOut(
        id=job.id,
        created_at=unix(job.created_at),
        finished_at=unix(job.finished_at),
        status=STATUS[job.status],
        service_status=job.status,
        model=spec.base_model,
        fine_tuned_model=fine_tuned_model(job.id) if succeeded else None,
        organization_id=job.owner_id or "admin",
        training_file=_file_id(spec.utility_data.source),
        validation_file=_file_id(spec.validation_data.source) if spec.validation_data else None,
        result_files=list(results),
        hyperparameters=openai_hp,
        method=MethodOut(type=method, **{method: settings}),
        seed=hp.seed,
        suffix=job.suffix,
        metadata=job.user_metadata,
        integrations=[i.model_dump(exclude_none=True) for i in spec.integrations],
        trained_tokens=training.get("trained_tokens") if succeeded else None,
        estimated_finish=estimated_finish(job),
        error=FineTuningError(code=job.error_code, message=job.error_message or "")
        if job.error_code
        else None,
        metrics=job.metrics,
        attempt=job.attempt,
        phase=job.phase,
        progress=Progress.of(job),
        artifacts=[ArtifactOut.of(a) for a in sorted(artifacts, key=lambda a: a.name)],
    )


def estimated_finish(job: Job) -> int | None:
    """A running job's finish at its pace so far (its progress fraction over the time since
    it started); None before it has progressed or once it stopped running."""
    if job.status != "running" or job.started_at is None or job.progress_fraction <= 0:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    remaining = elapsed * (1 - job.progress_fraction) / job.progress_fraction
    return unix(utcnow() + timedelta(seconds=math.ceil(remaining)))


# -- events and checkpoints -------------------------------------------------------------------


def _cursor(value: str | None, pattern: re.Pattern[str], what: str) -> int | None:
    if value is None:
        return None
    match = pattern.fullmatch(value)
    if match is None:
        raise invalid([{"field": "after", "reason": f"not a {what} id: {value}"}])
    return int(match[1])


def list_events(
    session: Session, job_id: str, after: str | None, limit: int, caller: Caller
) -> tuple[list[FineTuningEventOut], bool]:
    """Newest first, as OpenAI lists them; `after` is the id of the last event seen, and the
    page holds the events before it."""
    get_job(session, job_id, caller)
    before = _cursor(after, EVENT_ID, "fine_tuning.job.event")
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind.not_in(HIDDEN_KINDS))
    if before is not None:
        query = query.where(JobEvent.seq < before)
    rows = list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
    return [event_out(row) for row in rows[:limit]], len(rows) > limit


def event_out(event: JobEvent) -> FineTuningEventOut:
    data = dict(event.data or {})
    level, message = _describe(event.kind, event.phase, data)
    return FineTuningEventOut(
        id=f"ftevent-{event.job_id}-{event.seq}",
        created_at=unix(event.created_at),
        level=level,
        message=message,
        type="metrics" if event.kind == "metrics" else "message",
        data={"kind": event.kind, "phase": event.phase, **data},
    )


def _loss(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _describe(kind: str, phase: str | None, data: dict[str, Any]) -> tuple[str, str]:
    """An event's level and one line for people."""
    if kind == "metrics":
        line = f"step {data.get('step')}: train loss {_loss(data.get('train_loss'))}"
        if data.get("valid_loss") is not None:
            line += f", valid loss {_loss(data['valid_loss'])}"
        return "info", line
    if kind == "started":
        return "info", f"attempt {data.get('attempt')} started on {data.get('worker')}"
    if kind in ("phase_started", "phase_finished"):
        stage = f"{phase} ({data['stage']})" if "stage" in data else str(phase)
        return "info", f"{stage} {kind.removeprefix('phase_')}"
    if kind == "checkpoint":
        return "info", f"checkpoint at step {data.get('step')}: {data.get('path')}"
    if kind == "paused":
        return "info", "the job is paused" + (f": {data['reason']}" if "reason" in data else "")
    if kind == "requeued":
        return "warn", f"the job was sent again: {data.get('reason', 'its worker was lost')}"
    if kind == "finished":
        status = data.get("status")
        if error := data.get("error"):
            return "error", f"the job {status}: {error.get('message')}"
        return "info", f"the job {status}"
    return "info", str(data.get("message", kind))


def list_checkpoints(
    session: Session, job_id: str, after: str | None, limit: int, caller: Caller
) -> tuple[list[FineTuningCheckpointOut], bool]:
    """The models the job exported (its `checkpoint` events; one per step, the last export
    of a step counting, as a resumed job exports again what it had not kept), newest
    first; `after` is the id of the last checkpoint seen."""
    get_job(session, job_id, caller)
    before = _cursor(after, CHECKPOINT_ID, "fine_tuning.job.checkpoint")
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "checkpoint")
        .order_by(JobEvent.seq)
    )
    by_step = {int(e.data["step"]): e for e in session.scalars(query)}
    steps = sorted((s for s in by_step if before is None or s < before), reverse=True)
    page = [checkpoint_out(by_step[step]) for step in steps[:limit]]
    return page, len(steps) > limit


def checkpoint_out(event: JobEvent) -> FineTuningCheckpointOut:
    data = event.data
    return FineTuningCheckpointOut(
        id=f"ftckpt-{event.job_id}-{int(data['step'])}",
        created_at=unix(event.created_at),
        fine_tuning_job_id=event.job_id,
        step_number=int(data["step"]),
        metrics=CheckpointMetrics.model_validate(
            {"step": data["step"], **(data.get("metrics") or {})}
        ),
        fine_tuned_model_checkpoint=fine_tuned_model(event.job_id, data["path"]),
        path=data["path"],
    )
