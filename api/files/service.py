"""Uploaded datasets: checked by parsing before they are kept, owned by the key that sent them.

Services flush but never commit: the request boundary does.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO

import pandas as pd
import pyarrow.parquet as pq
from sqlalchemy.orm import Session

from api.auth import Caller
from api.db import utcnow
from api.errors import ApiError, not_found
from api.models import UploadedFile
from service.config import settings
from service.storage import ArtifactStore
from warp_core.spec import LOCAL_FORMATS

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


def store_upload(
    session: Session, store: ArtifactStore, body: IO[bytes], filename: str | None, caller: Caller
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
        rows, columns = _parse(local, fmt)
        file_id = uuid.uuid4().hex
        with local.open("rb") as source:
            stored = store.put(source, store.file_path(file_id, suffix[1:]))
    row = UploadedFile(
        id=file_id,
        owner_id=caller.key_id,
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


def get_file(session: Session, file_id: str, caller: Caller) -> UploadedFile:
    """The upload, if the caller may see it; another key's file is a 404 like a missing one."""
    row = session.get(UploadedFile, file_id)
    if row is None or not caller.owns(row.owner_id):
        raise not_found("file", file_id)
    return row
