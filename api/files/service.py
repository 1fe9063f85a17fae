"""Uploaded datasets: checked by parsing before they are kept, owned by the key that sent them.

Services flush but never commit: the request boundary does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Literal

import pandas as pd
import pyarrow.parquet as pq
from sqlalchemy import Text, cast, select, tuple_
from sqlalchemy.orm import Session

from api.auth import Caller
from api.db import utcnow
from api.errors import ApiError, conflict, invalid, not_found
from api.models import FilePurpose, Job, UploadedFile
from service.config import settings
from service.protocol import UPLOAD_PREFIX
from service.status import TERMINAL
from service.storage import ArtifactStore
from warp_core.chat import MESSAGES, chat_problems
from warp_core.spec import LOCAL_FORMATS

RESULTS_FILE = "results.csv"
"""The job artifact that is its `fine-tune-results` file: one row per optimizer step."""
RESULTS_NAMESPACE = uuid.UUID("5d1c1b7e-8f57-4a4b-9f0e-6b4f2d8f3a11")
MAX_FILENAME = 255
SLACK_BYTES = 64 * 1024
"""Multipart framing around the file: a Content-Length this far over the limit is refused
before the body is read."""


def too_large() -> ApiError:
    return ApiError(
        413, "file_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes"
    )


def check_declared_size(content_length: int) -> None:
    """Refuse a request whose declared body cannot hold an upload within the limit."""
    if content_length > settings.max_upload_bytes + SLACK_BYTES:
        raise too_large()


def checked_filename(filename: str | None) -> str:
    """The upload's base name, kept as given for the record; a 422 if it cannot be stored
    (longer than its column, or with control characters). It never names a local file."""
    name = Path(filename or "upload").name or "upload"
    if len(name) > MAX_FILENAME or not name.isprintable():
        raise ApiError(
            422,
            "invalid_file",
            f"the file name must be printable and at most {MAX_FILENAME} characters",
        )
    return name


def _read_table(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(path)
    if fmt == "parquet":
        return pq.read_table(path).to_pandas()
    return pd.read_json(path, lines=fmt == "jsonl")


def _parse(path: Path, fmt: str) -> tuple[int, list[str]]:
    """Rows and columns of an upload; a 422 if it does not parse as its format says."""
    try:
        frame = _read_table(path, fmt)
    except Exception as exc:  # every parser error means the same: not a valid file
        raise ApiError(422, "invalid_file", f"not a valid {fmt} file: {exc}") from exc
    if frame.empty or not len(frame.columns):
        raise ApiError(422, "invalid_file", "the file has no rows")
    return len(frame), [str(column) for column in frame.columns]


def _first_row_is_chat(path: Path) -> bool:
    """Whether a JSON Lines file's first row holds `messages`: then it is chat data, and every
    line must be a valid conversation."""
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False
                return isinstance(row, dict) and MESSAGES in row
    return False


def _check_chat(path: Path) -> None:
    """A 422 naming the first invalid lines of a chat file and why (warp_core.chat's rules,
    the ones a job applies when it reads the file)."""
    if problems := chat_problems(path, limit=5):
        message = "not valid chat data: " + "; ".join(problems)
        raise ApiError(422, "invalid_file", message, param="file")


def store_upload(
    session: Session,
    store: ArtifactStore,
    body: IO[bytes],
    filename: str | None,
    caller: Caller,
    purpose: FilePurpose = "fine-tune",
) -> UploadedFile:
    """Parse the upload in a scratch copy, then keep it in the store and record it."""
    name = checked_filename(filename)
    suffix = Path(name).suffix.lower()
    fmt = LOCAL_FORMATS.get(suffix)
    if fmt is None:
        raise ApiError(422, "invalid_file", f"{name}: expected one of {sorted(LOCAL_FORMATS)}")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / f"upload{suffix}"
        with local.open("wb") as target:
            shutil.copyfileobj(body, target, 1 << 20)
        if local.stat().st_size > settings.max_upload_bytes:
            raise too_large()
        chat = fmt == "jsonl" and _first_row_is_chat(local)
        if chat:
            _check_chat(local)
        rows, columns = _parse(local, fmt)
        if fmt == "jsonl" and not chat and MESSAGES in columns:
            _check_chat(local)
        file_id = uuid.uuid4().hex
        with local.open("rb") as source:
            stored = store.put(source, store.file_path(file_id, suffix[1:]))
    row = UploadedFile(
        id=file_id,
        owner_id=caller.key_id,
        purpose=purpose,
        filename=name,
        format=fmt,
        size=stored.size,
        sha256=stored.sha256,
        rows=rows,
        columns=columns,
        created_at=utcnow(),
    )
    session.add(row)
    return row


def get_file(
    session: Session, file_id: str, caller: Caller, param: str | None = None
) -> UploadedFile:
    """The file, if the caller may see it; another key's file is a 404 like a missing one.
    `param`: the request field that named it, for the error."""
    row = session.get(UploadedFile, file_id)
    if row is None or not caller.owns(row.owner_id):
        raise not_found("file", file_id, param)
    return row


def list_files(
    session: Session,
    caller: Caller,
    limit: int,
    after: str | None,
    order: Literal["asc", "desc"],
    purpose: str | None,
) -> tuple[list[UploadedFile], bool]:
    """The caller's files by creation time; `after` is the last id of the previous page."""
    key = tuple_(UploadedFile.created_at, UploadedFile.id)
    newest_first = order == "desc"
    query = select(UploadedFile).order_by(
        *(c.desc() if newest_first else c.asc() for c in (UploadedFile.created_at, UploadedFile.id))
    )
    if not caller.admin:
        query = query.where(UploadedFile.owner_id == caller.key_id)
    if purpose:
        query = query.where(UploadedFile.purpose == purpose)
    if after:
        cursor = session.get(UploadedFile, after)
        if cursor is None or not caller.owns(cursor.owner_id):
            raise invalid([{"field": "after", "reason": f"no file {after}"}])
        position = (cursor.created_at, cursor.id)
        query = query.where(key < position if newest_first else key > position)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def content_path(store: ArtifactStore, row: UploadedFile) -> str:
    """Where the file's bytes are: the upload itself, or the job artifact a results file is."""
    if row.job_id is not None:
        return store.job_path(row.job_id, row.filename)
    return store.file_path(row.id, row.format)


def delete_file(session: Session, store: ArtifactStore, file_id: str, caller: Caller) -> str | None:
    """Forget a file; returns the stored upload to remove once that is committed (None for
    a results file, whose bytes stay as its job's artifact). A file that an unfinished job
    reads (a paused one included) is kept: a 409."""
    row = get_file(session, file_id, caller)
    if row.job_id is None:
        reader = session.scalar(
            select(Job.id)
            .where(Job.status.not_in(TERMINAL))
            .where(cast(Job.spec, Text).contains(f'"{UPLOAD_PREFIX}{file_id}"'))
            .limit(1)
        )
        if reader is not None:
            raise conflict(
                "file_in_use",
                f"job {reader} reads file {file_id} and has not finished; "
                "delete it once the job has finished or is cancelled",
            )
    session.delete(row)
    return content_path(store, row) if row.job_id is None else None


def results_file(job: Job, size: int, sha256: str) -> UploadedFile:
    """The `fine-tune-results` file of a job whose step-metrics CSV was stored: its id is
    derived from the job's, so recording it twice (a replayed event) is one file."""
    return UploadedFile(
        id=uuid.uuid5(RESULTS_NAMESPACE, job.id).hex,
        owner_id=job.owner_id,
        purpose="fine-tune-results",
        job_id=job.id,
        filename=RESULTS_FILE,
        format="csv",
        size=size,
        sha256=sha256,
        rows=None,
        columns=None,
        created_at=utcnow(),
    )
