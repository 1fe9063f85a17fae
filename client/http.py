"""A small HTTP client of the service, used by the `warp` CLI (and handy in notebooks)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ServiceError(RuntimeError):
    """The service refused a request (`status`, `code`) or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})" if status else message)
        self.status, self.code = status, code


class WarpClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceError(
                0, "unreachable", f"cannot reach {self.http.base_url}: {exc}"
            ) from exc
        if response.is_error:
            error = _error_of(response)
            raise ServiceError(response.status_code, error["code"], error["message"])
        return response.json()

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params = {"limit": limit, **({"status": status} if status else {})}
        return self._request("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def pause(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/pause")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/resume")

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        params = {"after": after, "limit": limit}
        return self._request("GET", f"/v1/jobs/{job_id}/events", params=params)

    def compare(self, job_ids: list[str]) -> dict[str, Any]:
        return self._request("GET", "/v1/compare", params={"ids": job_ids})

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts")["data"]

    def follow(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events from the SSE stream, live, until the job ends."""
        path = f"/v1/jobs/{job_id}/events/stream"
        with self.http.stream("GET", path, params={"after": after}, timeout=None) as response:
            if response.is_error:
                response.read()
                error = _error_of(response)
                raise ServiceError(response.status_code, error["code"], error["message"])
            for line in response.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line.removeprefix("data:").strip())

    def download(self, job_id: str, name: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.is_error:
                response.read()
                error = _error_of(response)
                raise ServiceError(response.status_code, error["code"], error["message"])
            with target.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return target


def _error_of(response: httpx.Response) -> dict[str, str]:
    try:
        return response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return {"code": "http_error", "message": response.text[:300] or response.reason_phrase}
