"""`/v1/files`: upload a dataset once, then use it in specs as `source: "file:<id>"` or as a
fine-tuning job's `training_file`. OpenAI's files API: the `openai` SDK's `files.create`,
`list`, `retrieve`, `content` and `delete` work against it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from api.auth import CallerDep
from api.db import session_scope
from api.deps import StoreDep
from api.errors import ERROR_RESPONSES, error_response
from api.files import service
from api.files.schemas import FileDeleted, FileOut
from api.paging import Page
from service.storage import CHUNK, ArtifactStore

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)


def _declared_size(request: Request) -> int:
    """The request's Content-Length (0 if absent), to refuse a large upload before copying it.

    Read from the request, not declared as a parameter: it describes the body, a client
    does not choose it.
    """
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else 0


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    responses={413: error_response("Larger than the upload limit")},
)
def upload_file(
    file: UploadFile,
    store: StoreDep,
    caller: CallerDep,
    request: Request,
    purpose: Annotated[
        Literal["fine-tune"], Form(description="OpenAI's purpose; fine-tune is the one there is")
    ] = "fine-tune",
) -> FileOut:
    """A CSV, JSON, JSONL or Parquet dataset; checked by parsing it before it is accepted
    (chat `messages` rows line by line)."""
    service.check_declared_size(_declared_size(request))
    with session_scope() as session:
        row = service.store_upload(session, store, file.file, file.filename, caller, purpose)
        return FileOut.of(row)


@router.get("", response_model=Page[FileOut])
def list_files(
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    after: Annotated[str | None, Query(description="Last file id of the previous page")] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time")] = "desc",
    purpose: Annotated[Literal["fine-tune", "fine-tune-results"] | None, Query()] = None,
) -> Page[FileOut]:
    """The caller's files, newest first unless `order=asc`, cursor-paginated."""
    with session_scope() as session:
        rows, has_more = service.list_files(session, caller, limit, after, order, purpose)
        return Page[FileOut](data=[FileOut.of(row) for row in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: str, caller: CallerDep) -> FileOut:
    with session_scope() as session:
        return FileOut.of(service.get_file(session, file_id, caller))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"description": "The file", "content": {"application/octet-stream": {}}}},
)
def file_content(file_id: str, store: StoreDep, caller: CallerDep) -> StreamingResponse:
    """The file's bytes as uploaded (a results file: the job's step-metrics CSV)."""
    with session_scope() as session:
        row = service.get_file(session, file_id, caller)
        path, size = service.content_path(store, row), row.size
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{file_id}.{row.format}"',
    }
    media = "application/octet-stream"
    return StreamingResponse(_read(store, path), headers=headers, media_type=media)


def _read(store: ArtifactStore, path: str) -> Iterator[bytes]:
    with store.open(path) as source:
        while chunk := source.read(CHUNK):
            yield chunk


@router.delete(
    "/{file_id}",
    response_model=FileDeleted,
    responses={409: error_response("An unfinished job reads the file")},
)
def delete_file(file_id: str, store: StoreDep, caller: CallerDep) -> FileDeleted:
    """Delete a file (OpenAI's delete). One that an unfinished job reads is kept (409)."""
    with session_scope() as session:
        stored = service.delete_file(session, store, file_id, caller)
    if stored is not None:
        store.delete(stored)
    return FileDeleted(id=file_id, deleted=True)
