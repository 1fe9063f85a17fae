"""What the files endpoints answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.models import FilePurpose, UploadedFile
from service.protocol import UPLOAD_PREFIX


class FileOut(BaseModel):
    """One object for both clients: OpenAI's file object (`id`, `object`, `bytes`,
    `created_at`, `filename`, `purpose`, `status`), which the `openai` SDK reads, and this
    API's own record (`source`, `format`, `size`, `sha256`, `rows`, `columns`)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int = Field(description="Size in bytes (OpenAI's name for `size`)")
    created_at: int = Field(description="Unix time (seconds) of the upload")
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = Field(
        "processed", description="Always processed: a file is parsed before it is accepted"
    )
    source: str = Field(description="What a dataset reference's `source` names it by")
    format: str
    size: int
    sha256: str
    rows: int | None = Field(description="Rows parsed at upload (null for a results file)")
    columns: list[str] | None = Field(description="Its columns (null for a results file)")

    @classmethod
    def of(cls, row: UploadedFile) -> FileOut:
        return cls(
            id=row.id,
            bytes=row.size,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose=row.purpose,
            source=f"{UPLOAD_PREFIX}{row.id}",
            format=row.format,
            size=row.size,
            sha256=row.sha256,
            rows=row.rows,
            columns=row.columns,
        )


class FileDeleted(BaseModel):
    """OpenAI's answer to a delete."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool
