"""The FastAPI app (`api.main:app`). OpenAPI at /docs, /redoc and /openapi.json.

The process also runs the event ingester, the job dispatcher and the lost-worker reaper as
background threads, so one `uvicorn api.main:app` is the whole control plane; run several
for availability.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api.deps import get_redis
from api.dispatch import dispatch_forever
from api.errors import install_handlers
from api.files.endpoints import router as files_router
from api.fine_tuning.endpoints import router as fine_tuning_router
from api.health import install_metrics
from api.health import router as health_router
from api.ingest import Ingester
from api.jobs.endpoints import compare_router
from api.jobs.endpoints import router as jobs_router
from api.reaper import Reaper
from api.ui.router import install_ui


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    stop = threading.Event()
    loops = [
        threading.Thread(target=Ingester(get_redis()).run, args=(stop,), name="ingester"),
        threading.Thread(target=dispatch_forever, args=(stop,), name="dispatcher"),
        threading.Thread(target=Reaper(get_redis()).run, args=(stop,), name="reaper"),
    ]
    for loop in loops:
        loop.start()
    try:
        yield
    finally:
        stop.set()
        for loop in loops:
            loop.join(timeout=10)


def create_app() -> FastAPI:
    """The app; its /docs and /redoc pages load Swagger UI and ReDoc from the installed
    package (`fastapi-offline`), not from a CDN, so they work without internet."""
    app = FastAPIOffline(
        title="warp-service",
        version="0.1.0",
        summary="WaRP safety-preserving fine-tuning jobs over HTTP.",
        lifespan=lifespan,
    )
    install_handlers(app)
    install_metrics(app)
    app.include_router(jobs_router)
    app.include_router(compare_router)
    app.include_router(files_router)
    app.include_router(fine_tuning_router)
    app.include_router(health_router)
    install_ui(app)
    return app


app = create_app()
