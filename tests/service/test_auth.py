"""API keys on the live service: hashed at rest, made and revoked by `warp admin`, each
key sees only its own jobs and files, and each is held to its request and job limits."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import httpx
import pytest
from sqlalchemy import select

from api.auth import announce_revocation
from api.db import session_scope, utcnow
from api.models import ApiKey
from tests.helpers import REPO
from tests.service.conftest import create_key, invalid_fields, wait_for
from tests.service.test_api import bad_model


def client(service, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=service.url, timeout=30, headers=headers)


@pytest.fixture(scope="module")
def alice(service):
    with client(service, create_key(service.env, "alice")) as http:
        yield http


@pytest.fixture(scope="module")
def bob(service):
    with client(service, create_key(service.env, "bob")) as http:
        yield http


def test_requests_without_a_valid_key_are_401(service):
    for key in (None, "warp_not-a-key"):
        with client(service, key) as http:
            response = http.get("/v1/jobs")
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "unauthorized"
    with client(service, None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200, "probes need no key"
        assert anonymous.get("/readyz").status_code == 200


def test_keys_are_stored_hashed(service):
    key = create_key(service.env, "hashed")
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.name == "hashed"))
        columns = [column.name for column in ApiKey.__table__.columns]
        stored = {column: str(getattr(row, column)) for column in columns}
    assert key.startswith("warp_") and len(key) > 40
    assert stored["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert not any(key in value for value in stored.values())


def test_a_key_sees_and_cancels_only_its_own_jobs(service, alice, bob, tiny_job):
    spec, same_key = bad_model(tiny_job, "-alice"), {"Idempotency-Key": "k-1"}
    job = alice.post("/v1/jobs", json=spec, headers=same_key).json()
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("GET", f"/v1/jobs/{job['id']}/events/stream"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts/report.md"),
        ("GET", f"/v1/compare?ids={job['id']}"),
    ):
        response = bob.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
    assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs").json()["data"]]
    assert bob.get("/v1/jobs", params={"after": job["id"]}).status_code == 422
    assert job["id"] in [j["id"] for j in alice.get("/v1/jobs").json()["data"]]
    assert service.http.get(f"/v1/jobs/{job['id']}").status_code == 200, "admin sees all"
    assert alice.post("/v1/jobs", json=spec, headers=same_key).json()["id"] == job["id"]
    other = bob.post("/v1/jobs", json=spec, headers=same_key)
    assert other.status_code == 201 and other.json()["id"] != job["id"], "keys are per caller"
    assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 409)


def test_a_key_sees_and_uses_only_its_own_files(alice, bob, tiny_job):
    upload = alice.post("/v1/files", files={"file": ("pairs.csv", b"q,a\nhi,hello\n")}).json()
    assert alice.get(f"/v1/files/{upload['id']}").status_code == 200
    assert bob.get(f"/v1/files/{upload['id']}").status_code == 404
    spec = bad_model(tiny_job, "-bob")
    spec["utility_data"] = {
        "source": upload["source"],
        "prompt_field": "q",
        "response_field": "a",
        "limit": 1,
    }
    assert invalid_fields(bob.post("/v1/jobs", json=spec)) == ["utility_data.source"]


def test_a_revoked_key_is_refused_at_its_next_request(service):
    key = create_key(service.env, "leaver")
    with client(service, key) as http:
        assert http.get("/v1/jobs").status_code == 200
        with session_scope() as session:
            key_id = session.scalar(select(ApiKey.id).where(ApiKey.name == "leaver"))
        command = [sys.executable, "-m", "client.cli", "admin", "revoke-key", key_id]
        subprocess.run(command, cwd=REPO, env=service.env, check=True, capture_output=True)
        assert http.get("/v1/jobs").status_code == 401


def test_a_lookup_is_reused_but_a_revocation_reaches_it_through_redis(service, redis_client):
    with client(service, create_key(service.env, "cached")) as http:
        assert http.get("/v1/jobs").status_code == 200
        with session_scope() as session:  # revoked behind the API's back: no marker in Redis
            row = session.scalar(select(ApiKey).where(ApiKey.name == "cached"))
            row.revoked_at, key_id = utcnow(), row.id
        assert http.get("/v1/jobs").status_code == 200, "the API reused its lookup"
        announce_revocation(redis_client, key_id)
        assert http.get("/v1/jobs").status_code == 401


def test_past_the_request_rate_a_key_gets_429_with_retry_after(service):
    with client(service, create_key(service.env, "chatty", "--rate-limit", "3")) as http:
        codes = [http.get("/v1/jobs").status_code for _ in range(4)]
        limited = http.get("/v1/jobs")
    assert codes[:3] == [200, 200, 200] and limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert limited.json()["error"]["code"] == "rate_limited"


def test_past_its_active_jobs_a_key_gets_429_until_one_finishes(service, tiny_job):
    with client(service, create_key(service.env, "busy", "--max-active-jobs", "1")) as http:
        first = http.post("/v1/jobs", json=bad_model(tiny_job, "-busy-1")).json()
        refused = http.post("/v1/jobs", json=bad_model(tiny_job, "-busy-2"))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_active_jobs"
        assert int(refused.headers["Retry-After"]) > 0
        wait_for(http, first["id"], {"failed", "cancelled", "succeeded"})
        assert http.post("/v1/jobs", json=bad_model(tiny_job, "-busy-3")).status_code == 201
