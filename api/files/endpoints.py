"""`/v1/files`: upload a dataset once, then use it in specs as `source: "file:<id>"`."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from fastapi import APIRouter, Request, UploadFile
from pydantic import BaseModel

from api.auth import CallerDep
from api.config import settings
from api.db import session_scope, utcnow
from api.deps import StoreDep
from api.errors import ERROR_RESPONSES, ApiError, error_response, not_found
from api.models import UploadedFile

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)
MAX_FILENAME = 255
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


class FileOut(BaseModel):
    id: str
    source: str
    filename: str
    format: str
    size: int
    sha256: str
    rows: int
    columns: list[str]

    @classmethod
    def of(cls, row: UploadedFile) -> FileOut:
        return cls(
            id=row.id,
            source=f"file:{row.id}",
            filename=row.filename,
            format=row.format,
            size=row.size,
            sha256=row.sha256,
            rows=row.rows,
            columns=row.columns,
        )


def _too_large() -> ApiError:
    return ApiError(
        413, "file_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes"
    )


def _filename(file: UploadFile) -> str:
    """The upload's base name, kept as given for the record; a 422 if it cannot be stored
    (longer than its column, or with control characters). It never names a local file."""
    filename = Path(file.filename or "upload").name or "upload"
    if len(filename) > MAX_FILENAME or not filename.isprintable():
        raise ApiError(
            422,
            "invalid_file",
            f"the file name must be printable and at most {MAX_FILENAME} characters",
        )
    return filename


def _declared_size(request: Request) -> int:
    """The request's Content-Length (0 if absent), to refuse a large upload before copying it.

    Read from the request, not declared as a parameter: it describes the body, a client
    does not choose it.
    """
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else 0


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


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    responses={413: error_response("Larger than the upload limit")},
)
def upload_file(file: UploadFile, store: StoreDep, caller: CallerDep, request: Request) -> FileOut:
    """A CSV, JSON, JSONL or Parquet dataset; checked by parsing it before it is accepted."""
    if _declared_size(request) > settings.max_upload_bytes + 64 * 1024:
        raise _too_large()
    filename = _filename(file)
    fmt = FORMATS.get(Path(filename).suffix.lower())
    if fmt is None:
        raise ApiError(422, "invalid_file", f"{filename}: expected one of {sorted(FORMATS)}")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / f"upload{Path(filename).suffix.lower()}"
        with local.open("wb") as target:
            shutil.copyfileobj(file.file, target, 1 << 20)
        if local.stat().st_size > settings.max_upload_bytes:
            raise _too_large()
        rows, columns = _parse(local, fmt)
        file_id = uuid.uuid4().hex
        with local.open("rb") as source:
            stored = store.put(source, store.file_path(file_id, Path(filename).suffix[1:]))
    row = UploadedFile(
        id=file_id,
        owner_id=caller.key_id,
        filename=filename,
        format=fmt,
        size=stored.size,
        sha256=stored.sha256,
        rows=rows,
        columns=columns,
        created_at=utcnow(),
    )
    with session_scope() as session:
        session.add(row)
    return FileOut.of(row)


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: str, caller: CallerDep) -> FileOut:
    with session_scope() as session:
        row = session.get(UploadedFile, file_id)
    if row is None or not caller.owns(row.owner_id):
        raise not_found("file", file_id)
    return FileOut.of(row)
