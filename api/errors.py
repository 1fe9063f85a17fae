"""Every error answers `{"error": {"code", "message", "type", "param", ...}}` with the right
status: one envelope for the whole API, which is also OpenAI's (`message`, `type`, `param`,
`code`), so the `openai` SDK reads our errors as it reads OpenAI's and the `warp` client reads
`code` and `message` as before.

Bad input is a 4xx naming the field (`param`, and every field in `fields` on a 422); a
missing dependency is a 503; nothing the client sends produces a 500. A 409 that the same
request would meet again says so with `x-should-retry: false`, which the SDK obeys instead of
retrying every 409.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.routing import Match


class ApiError(Exception):
    """An error with its HTTP status, raised by services and rendered by the handler."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, "not_found", f"no {what} with id {ident}", param=param)


def conflict(code: str, message: str, deterministic: bool = True) -> ApiError:
    """A 409. `deterministic`: the same request fails the same way until something else
    changes (a finished job, a reused idempotency key), so clients must not retry it; a
    passing state (a job still pausing) is worth a retry, the SDK's default for a 409."""
    headers = {"x-should-retry": "false"} if deterministic else None
    return ApiError(409, code, message, headers=headers)


ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
"""OpenAI's error `type` per status; other 4xx are `invalid_request_error`, 5xx
`server_error`."""


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return ERROR_TYPES.get(status, "invalid_request_error")


def error_body(status: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The envelope. `param` is the field at fault: given, or the first one a 422 names."""
    fields = extra.get("fields") or []
    param = extra.pop("param", None) or (fields[0]["field"] if fields else None)
    error = {"code": code, "message": message, "type": error_type(status), "param": param}
    return {"error": {**error, **extra}}


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the field, `body` for the body as a whole")
    reason: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Stable, machine-readable, e.g. `not_found`")
    message: str
    type: str = Field(
        description="OpenAI's error class: invalid_request_error, authentication_error, "
        "permission_error, rate_limit_error or server_error"
    )
    param: str | None = Field(description="The field at fault (dotted path), if one is")
    fields: list[FieldError] | None = Field(None, description="On a 422: what is wrong where")


class ErrorOut(BaseModel):
    """The body of every error, so that clients (and the schema) have one shape to read."""

    error: ErrorDetail


def error_response(description: str) -> dict[str, Any]:
    """An entry of a route's `responses`: the description and the error body's schema."""
    return {"description": description, "model": ErrorOut}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: error_response("No API key, or an unknown or revoked one"),
    404: error_response("Unknown id, or one that belongs to another API key"),
    422: error_response("Invalid request; `error.fields` names each field and the reason"),
    429: error_response("Past the key's request rate or active-job limit; see Retry-After"),
    503: error_response("A dependency (database, Redis) is unavailable"),
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


def invalid(fields: list[dict[str, str]]) -> ApiError:
    """A 422 naming each field that is wrong and why (the one shape of bad input)."""
    message = "; ".join(f"{f['field']}: {f['reason']}" for f in fields)
    return ApiError(422, "invalid_request", message, fields=fields)


def render(exc: ApiError) -> JSONResponse:
    extra = {key: value for key, value in exc.extra.items() if key != "headers"}
    body = error_body(exc.status, exc.code, exc.message, **extra)
    return JSONResponse(body, exc.status, headers=exc.extra.get("headers"))


def framework_error(request: Request, exc: HTTPException) -> JSONResponse:
    """An error raised by FastAPI or Starlette themselves, in the same envelope.

    Their 400 always means a body that does not parse (not UTF-8, broken multipart): it is
    a 422 naming the body, as a body that is not JSON already is, so bad input has one
    status. Others (an unknown path, a wrong method) keep their status and headers.
    """
    if exc.status_code == 400:
        return render(invalid([{"field": "body", "reason": str(exc.detail)}]))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    body = error_body(exc.status_code, status_code_name(exc.status_code), str(exc.detail))
    return JSONResponse(body, exc.status_code, headers=headers)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the first
    route's (`POST` for /v1/jobs, where GET is served too)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def status_code_name(status: int) -> str:
    """`method_not_allowed` for 405: the standard phrase as an error code."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "http_error"
    return phrase.lower().replace(" ", "_").replace("-", "_")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def unparsable(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return render(invalid(field_errors(list(exc.errors()))))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return framework_error(request, exc)

    @app.exception_handler(DataError)
    async def unstorable(_request: Request, exc: DataError) -> JSONResponse:
        """A value PostgreSQL refuses to store or compare (a NUL character, a number out of
        range): the client's input, not an outage, so a 422 rather than the 503 below."""
        reason = str(exc.orig).splitlines()[0] if exc.orig else "a value the database refuses"
        return render(invalid([{"field": "request", "reason": reason}]))

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def database_down(_request: Request, exc: Exception) -> JSONResponse:
        message = "the database is unavailable or saturated; retry later"
        headers = {"Retry-After": "5"}
        body = error_body(503, "database_unavailable", message)
        return JSONResponse(body, 503, headers=headers)

    @app.exception_handler(redis.RedisError)
    async def redis_down(_request: Request, exc: Exception) -> JSONResponse:
        message = "Redis is unavailable; retry later"
        return JSONResponse(error_body(503, "redis_unavailable", message), 503)
