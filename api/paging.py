"""The one shape of every list the API answers: OpenAI's `{"object": "list", "data": [...],
"has_more": bool}`, cursor-paginated by `after` (the id of the last item of the previous
page), which the `openai` SDK pages through by itself."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
