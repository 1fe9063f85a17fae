"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.db import SessionLocal, engine
from api.deps import get_redis
from api.dispatch import queue_of
from api.models import Job
from service.protocol import job_queue
from service.status import STATUSES

router = APIRouter(tags=["health"])
LATENCY = Histogram(
    "warp_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route", "status"],
)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is down"}})
def readyz() -> JSONResponse:
    """The database and Redis answer; the body says which one does not."""
    checks = {
        "database": _check(lambda: _ping_database()),
        "redis": _check(lambda: get_redis().ping()),
    }
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", **checks}, 200 if ready else 503
    )


def _ping_database() -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _check(probe) -> str:
    try:
        probe()
    except Exception as exc:  # any failure means "not ready"; the text says which
        return f"error: {type(exc).__name__}: {exc}"[:300]
    return "ok"


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
def metrics() -> Response:
    """Prometheus: jobs by status, queue depth, request latency, event ingestion lag."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class ServiceCollector(Collector):
    """Jobs by status and queue depth, read at scrape time from their sources of truth."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("warp_jobs", "Jobs by status", labels=["status"])
        queues = {job_queue(1)}
        try:
            with SessionLocal() as session:
                counts = dict(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
                queued = session.scalars(select(Job.spec).where(Job.status == "queued"))
                queues |= {queue_of(spec) for spec in queued}
            for status in STATUSES:
                jobs.add_metric([status], counts.get(status, 0))
        except Exception:  # a scrape must not fail because one source is down
            pass
        yield jobs
        depth = GaugeMetricFamily(
            "warp_queue_depth",
            "Jobs waiting in the broker queue of their GPU count (the one-GPU queue, and the "
            "queue of every queued job)",
            labels=["queue"],
        )
        with contextlib.suppress(Exception):  # as above
            for queue in sorted(queues):
                depth.add_metric([queue], get_redis().llen(queue))
        yield depth


def install_metrics(app: FastAPI) -> None:
    REGISTRY.register(ServiceCollector())
    app.add_middleware(RequestTimer)


class RequestTimer:
    """Observes every request's latency by method, route and status: a plain ASGI
    middleware (Starlette's `BaseHTTPMiddleware` cost a poll about a tenth of its CPU)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before it starts a response

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            LATENCY.labels(scope["method"], getattr(route, "path", "unmatched"), status).observe(
                time.perf_counter() - started
            )
