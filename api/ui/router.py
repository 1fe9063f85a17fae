"""Serves the dashboard: `/ui` is the page, `/ui/static/*` its script and style."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def dashboard() -> FileResponse:
    """The page; what it shows comes from the API, for the key signed in with."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def install_ui(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
