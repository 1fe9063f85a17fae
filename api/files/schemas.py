"""What the files endpoints answer."""

from __future__ import annotations

from pydantic import BaseModel, Field

from api.models import UploadedFile
from service.protocol import UPLOAD_PREFIX


class FileOut(BaseModel):
    id: str
    source: str = Field(description="What a dataset reference's `source` names it by")
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
            source=f"{UPLOAD_PREFIX}{row.id}",
            filename=row.filename,
            format=row.format,
            size=row.size,
            sha256=row.sha256,
            rows=row.rows,
            columns=row.columns,
        )
