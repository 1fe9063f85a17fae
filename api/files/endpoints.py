"""`/v1/files`: upload a dataset once, then use it in specs as `source: "file:<id>"`."""

from __future__ import annotations

from fastapi import APIRouter, Request, UploadFile

from api.auth import CallerDep
from api.db import session_scope
from api.deps import StoreDep
from api.errors import ERROR_RESPONSES, error_response
from api.files import service
from api.files.schemas import FileOut

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
def upload_file(file: UploadFile, store: StoreDep, caller: CallerDep, request: Request) -> FileOut:
    """A CSV, JSON, JSONL or Parquet dataset; checked by parsing it before it is accepted."""
    service.check_declared_size(_declared_size(request))
    with session_scope() as session:
        return FileOut.of(service.store_upload(session, store, file.file, file.filename, caller))


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: str, caller: CallerDep) -> FileOut:
    with session_scope() as session:
        return FileOut.of(service.get_file(session, file_id, caller))
