"""Every error answers `{"error": {"code", "message", ...}}` with the right status.

Bad input is a 4xx naming the field; a missing dependency is a 503; nothing the client
sends produces a 500.
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout


class ApiError(Exception):
    """An error with its HTTP status, raised by services and rendered by the handler."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} with id {ident}")


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No API key, or an unknown or revoked one"},
    404: {"description": "Unknown id, or one that belongs to another API key"},
    422: {"description": "Invalid request; `error.fields` names each field and the reason"},
    429: {"description": "Past the key's request rate or active-job limit; see Retry-After"},
    503: {"description": "A dependency (database, Redis) is unavailable"},
}


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic errors as `{"field": "a.b", "reason": "..."}`, body prefix dropped."""
    fields = []
    for item in errors:
        loc = [str(part) for part in item["loc"]]
        if loc and loc[0] == "body":
            loc = loc[1:]
        reason = str(item["msg"]).removeprefix("Value error, ")
        fields.append({"field": ".".join(loc) or "body", "reason": reason})
    return fields


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = exc.extra.pop("headers", None)
        body = error_body(exc.code, exc.message, **exc.extra)
        return JSONResponse(body, exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = field_errors(list(exc.errors()))
        message = "; ".join(f"{f['field']}: {f['reason']}" for f in fields)
        return JSONResponse(error_body("invalid_request", message, fields=fields), 422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def database_down(_request: Request, exc: Exception) -> JSONResponse:
        message = "the database is unavailable or saturated; retry later"
        headers = {"Retry-After": "5"}
        return JSONResponse(error_body("database_unavailable", message), 503, headers=headers)

    @app.exception_handler(redis.RedisError)
    async def redis_down(_request: Request, exc: Exception) -> JSONResponse:
        message = "Redis is unavailable; retry later"
        return JSONResponse(error_body("redis_unavailable", message), 503)
