"""The HTTP API against real PostgreSQL, Redis, uvicorn and a Celery worker."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from tests.service.conftest import HOME, UPLOAD_LIMIT, invalid_fields, wait_for


@pytest.fixture(scope="module")
def http(service):
    return service.http


def bad_model(spec: dict, tag: str = "") -> dict:
    """A spec that validates but fails preflight fast: its model does not exist (in a
    directory jobs may read from)."""
    return {**copy.deepcopy(spec), "base_model": f"{HOME}/nonexistent/model{tag}"}


def test_health_readiness_metrics_and_docs(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {
        "status": "ready",
        "database": "ok",
        "redis": "ok",
    }
    metrics = http.get("/metrics").text
    for name in (
        "warp_jobs{",
        'warp_queue_depth{queue="gpu"}',
        "warp_http_request_duration_seconds",
        "warp_event_ingestion_lag_seconds",
    ):
        assert name in metrics
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/files"} <= set(paths)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_nothing_from_outside_the_server(http, page):
    """Swagger UI and ReDoc come from the installed package: a machine without internet
    still gets working docs (the CDN FastAPI uses by default would leave them blank)."""
    html = http.get(page)
    assert html.status_code == 200
    assets = re.findall(r"(?:src|href)=\"([^\"]+)\"|url: '([^']+)'", html.text)
    urls = [src or url for src, url in assets]
    assert any(url.endswith(".js") for url in urls) and "/openapi.json" in html.text
    for url in urls:
        assert url.startswith("/"), url  # same server, no CDN
        asset = http.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate"),
        ({"method": "lora"}, "method"),
        ({"safety_data": {"source": "data.txt"}}, "safety_data"),
        ({"base_model": ""}, "base_model"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_an_invalid_spec_is_a_422_naming_the_field(http, tiny_job, change, field):
    body = {**copy.deepcopy(tiny_job), **change}
    fields = invalid_fields(http.post("/v1/jobs", json=body))
    assert any(f.startswith(field) for f in fields), fields


def test_a_bad_attack_or_poison_ratio_is_a_422_naming_the_field(http, tiny_job):
    body = copy.deepcopy(tiny_job)
    body["eval"]["attacks"] = ["dan"]
    body["utility_data"]["poison"] = {"ratio": 2}
    response = http.post("/v1/jobs", json=body)
    assert sorted(invalid_fields(response)) == ["eval.attacks", "utility_data.poison.ratio"]
    assert "unknown attack 'dan'" in response.text


def test_a_body_that_is_not_json_is_a_422(http):
    response = http.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/nope",
        "/v1/jobs/nope/events",
        "/v1/jobs/nope/artifacts",
        "/v1/jobs/nope/artifacts/metrics.json",
        "/v1/files/nope",
        "/v1/jobs/nope/events/stream",
    ],
)
def test_unknown_ids_are_404(http, path):
    response = http.get(path)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_status_poll_with_the_jobs_etag_is_a_304_until_the_job_changes(http, tiny_job):
    job_id = http.post("/v1/jobs", json=tiny_job).json()["id"]
    first = http.get(f"/v1/jobs/{job_id}")
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    wait_for(http, job_id, {"cancelled"}, 60)
    final = http.get(f"/v1/jobs/{job_id}")
    etag = final.headers["etag"]
    assert first.headers["etag"] != etag and final.json()["status"] == "cancelled"
    stale = http.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": first.headers["etag"]})
    assert stale.status_code == 200 and stale.json() == final.json()
    for sent in (etag, f'"other", {etag}'):
        same = http.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": sent})
        assert same.status_code == 304 and same.content == b"" and same.headers["etag"] == etag


def test_cancelling_an_unknown_job_is_404(http):
    assert http.post("/v1/jobs/nope/cancel").status_code == 404


def test_uploads_are_checked_and_limited(http):
    ok = http.post("/v1/files", files={"file": ("pairs.csv", b"q,a\nhi,hello\n", "text/csv")})
    assert ok.status_code == 201, ok.text
    assert ok.json()["rows"] == 1 and ok.json()["columns"] == ["q", "a"]
    assert http.get(f"/v1/files/{ok.json()['id']}").json()["source"] == f"file:{ok.json()['id']}"
    big = b"q,a\n" + b"x,y\n" * (UPLOAD_LIMIT // 4 + 10)
    assert http.post("/v1/files", files={"file": ("big.csv", big)}).status_code == 413
    bad = http.post("/v1/files", files={"file": ("notes.txt", b"hello")})
    assert bad.status_code == 422
    broken = http.post("/v1/files", files={"file": ("rows.parquet", b"not parquet")})
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_file"
    empty = http.post("/v1/files", files={"file": ("empty.jsonl", b"")})
    assert empty.status_code == 422


def test_a_spec_naming_an_unknown_upload_is_a_422(http, tiny_job):
    body = copy.deepcopy(tiny_job)
    body["utility_data"] = {
        "source": "file:missing",
        "prompt_field": "q",
        "response_field": "a",
        "limit": 8,
    }
    assert invalid_fields(http.post("/v1/jobs", json=body)) == ["utility_data.source"]


def test_submission_is_idempotent(http, tiny_job):
    body = bad_model(tiny_job, "-idempotent")
    headers = {"Idempotency-Key": "key-1"}
    first = http.post("/v1/jobs", json=body, headers=headers)
    again = http.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = http.post("/v1/jobs", json=bad_model(tiny_job, "-other"), headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"


def test_timestamps_read_the_same_in_every_answer_with_their_zone(http, tiny_job):
    created = http.post("/v1/jobs", json=bad_model(tiny_job, "-timestamps")).json()
    read = http.get(f"/v1/jobs/{created['id']}").json()
    listed = http.get("/v1/jobs", params={"limit": 200}).json()["data"]
    (in_list,) = [job for job in listed if job["id"] == created["id"]]
    assert created["created_at"] == read["created_at"] == in_list["created_at"]
    assert created["created_at"].endswith("Z"), created["created_at"]


def test_a_job_that_fails_preflight_ends_failed_with_the_reason(http, tiny_job):
    job = http.post("/v1/jobs", json=bad_model(tiny_job, "-preflight")).json()
    failed = wait_for(http, job["id"], {"failed", "succeeded"})
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_job"
    assert "base_model" in failed["error"]["message"]
    assert failed["attempt"] == 1 and failed["finished_at"]


def test_listing_is_newest_first_and_paginated(http, tiny_job):
    ids = [
        http.post("/v1/jobs", json=bad_model(tiny_job, f"-page{i}")).json()["id"] for i in range(5)
    ]
    for job_id in ids:
        http.post(f"/v1/jobs/{job_id}/cancel")
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = http.get("/v1/jobs", params=params).json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert len(seen) == len(set(seen))
    assert seen[:5] == ids[::-1]
    everything = http.get("/v1/jobs", params={"limit": 200}).json()
    assert [job["id"] for job in everything["data"]] == seen
    created = [job["created_at"] for job in everything["data"]]
    assert created == sorted(created, reverse=True)
    failed = http.get("/v1/jobs", params={"status": "failed", "limit": 200}).json()["data"]
    assert all(job["status"] == "failed" for job in failed)
    assert http.get("/v1/jobs", params={"after": "nope"}).status_code == 422
    assert http.get("/v1/jobs", params={"limit": 0}).status_code == 422


@pytest.fixture(scope="module")
def finished_job(http, tiny_job):
    """A real WaRP job whose utility data was uploaded through the API."""
    lines = Path(tiny_job["utility_data"]["source"]).read_text().splitlines()[:80]
    rows = [json.loads(line) for line in lines]
    upload = http.post(
        "/v1/files",
        files={"file": ("gsm8k.jsonl", "\n".join(json.dumps(r) for r in rows).encode())},
    ).json()
    body = copy.deepcopy(tiny_job)
    body["utility_data"] = {
        "source": upload["source"],
        "prompt_field": "question",
        "response_field": "answer",
        "limit": 64,
    }
    body["eval"]["benign"] = tiny_job["eval"].get("benign") or {
        "source": tiny_job["utility_data"]["source"],
        "preset": "gsm8k",
        "offset": 300,
        "limit": 4,
    }
    submitted = http.post("/v1/jobs", json=body)
    assert submitted.status_code == 201, submitted.text
    return wait_for(http, submitted.json()["id"], {"succeeded", "failed", "cancelled"})


def test_a_job_runs_to_success(finished_job):
    job = finished_job
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1 and job["phase"] == "evaluate"
    assert job["progress"]["fraction"] == 1.0
    assert {"before", "after", "refusal_rule", "timings"} <= set(job["metrics"])
    assert job["started_at"] <= job["finished_at"]


def test_events_are_gap_free_and_ordered(http, finished_job):
    events, after = [], 0
    while True:
        page = http.get(
            f"/v1/jobs/{finished_job['id']}/events", params={"after": after, "limit": 7}
        ).json()
        events += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["seq"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["kind"] == "started" and events[0]["data"]["attempt"] == 1
    assert events[-1]["kind"] == "finished" and events[-1]["data"]["status"] == "succeeded"
    phases = [e["phase"] for e in events if e["kind"] == "phase_started"]
    assert phases == ["evaluate", "basis", "importance", "finetune", "evaluate"]
    progress = [e["data"] for e in events if e["kind"] == "progress" and e["phase"] == "finetune"]
    assert progress and {"loss", "learning_rate", "tokens_per_s", "eta_s"} <= set(progress[-1])


def test_sse_stream_replays_the_events_and_ends(service, finished_job):
    url = f"/v1/jobs/{finished_job['id']}/events/stream"
    seqs = []
    with service.http.stream("GET", url, params={"after": 3}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id:"):
                seqs.append(int(line.split(":", 1)[1]))
    total = service.http.get(
        f"/v1/jobs/{finished_job['id']}/events", params={"limit": 1000}
    ).json()["data"]
    assert seqs == list(range(4, len(total) + 1))


def test_artifacts_download_with_their_sha256(http, finished_job):
    artifacts = http.get(f"/v1/jobs/{finished_job['id']}/artifacts").json()
    assert artifacts["has_more"] is False
    names = {a["name"] for a in artifacts["data"]}
    assert {
        "metrics.json",
        "spec.json",
        "model/model.safetensors",
        "model/config.json",
        "warp/targets.json",
        "warp/basis.safetensors",
        "warp/masks.safetensors",
    } <= names
    assert not any(n.startswith("checkpoints/") or n == "state.json" for n in names)
    for artifact in artifacts["data"]:
        body = http.get(f"/v1/jobs/{finished_job['id']}/artifacts/{artifact['name']}")
        assert body.status_code == 200
        assert len(body.content) == artifact["size"]
        assert hashlib.sha256(body.content).hexdigest() == artifact["sha256"]
    metrics = http.get(f"/v1/jobs/{finished_job['id']}/artifacts/metrics.json").json()
    assert metrics["after"] == finished_job["metrics"]["after"]


def test_artifact_ranges(http, finished_job):
    url = f"/v1/jobs/{finished_job['id']}/artifacts/model/model.safetensors"
    whole = http.get(url).content
    part = http.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == whole[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{len(whole)}"
    tail = http.get(url, headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == whole[-16:]
    beyond = http.get(url, headers={"Range": f"bytes={len(whole)}-"})
    assert beyond.status_code == 416
    assert http.get(f"/v1/jobs/{finished_job['id']}/artifacts/../../etc/passwd").status_code == 404


def test_a_running_job_cancels_within_seconds_and_frees_the_worker(http, tiny_job):
    body = copy.deepcopy(tiny_job)
    body["hyperparameters"]["max_steps"] = 5000
    running = http.post("/v1/jobs", json=body).json()
    queued = http.post("/v1/jobs", json=bad_model(tiny_job, "-queued")).json()
    deadline = time.monotonic() + 180
    while http.get(f"/v1/jobs/{running['id']}").json()["phase"] != "finetune":
        assert time.monotonic() < deadline, "the long job never reached fine-tuning"
        time.sleep(0.3)

    assert http.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    cancelling = http.post(f"/v1/jobs/{running['id']}/cancel")
    assert cancelling.status_code == 200 and cancelling.json()["status"] in (
        "cancelling",
        "cancelled",
    )
    started = time.monotonic()
    cancelled = wait_for(http, running["id"], {"cancelled", "succeeded", "failed"}, timeout_s=30)
    assert cancelled["status"] == "cancelled"
    assert time.monotonic() - started < 15
    assert http.post(f"/v1/jobs/{running['id']}/cancel").json()["status"] == "cancelled"
    assert http.get(f"/v1/jobs/{running['id']}/artifacts").json()["data"] == []
    assert wait_for(http, queued["id"], {"cancelled"})["attempt"] == 0

    after = http.post("/v1/jobs", json=bad_model(tiny_job, "-after-cancel")).json()
    assert wait_for(http, after["id"], {"failed", "succeeded"}, timeout_s=60)["status"] == "failed"


def test_pause_and_resume_on_the_native_api(http, tiny_job):
    """A queued job is paused at once and a running one at its next step; a paused job frees
    its worker for the next one, is cancelled at once, and a resumed one runs again."""
    body = copy.deepcopy(tiny_job)
    body["hyperparameters"]["max_steps"] = 5000
    running = http.post("/v1/jobs", json=body).json()
    queued = http.post("/v1/jobs", json=bad_model(tiny_job, "-paused")).json()
    deadline = time.monotonic() + 180
    while http.get(f"/v1/jobs/{running['id']}").json()["phase"] != "finetune":
        assert time.monotonic() < deadline, "the long job never reached fine-tuning"
        time.sleep(0.3)

    assert http.post(f"/v1/jobs/{queued['id']}/pause").json()["status"] == "paused"
    assert http.post(f"/v1/jobs/{running['id']}/pause").json()["status"] in ("pausing", "paused")
    paused = wait_for(http, running["id"], {"paused", "succeeded", "failed"}, timeout_s=30)
    assert paused["status"] == "paused"
    assert http.post(f"/v1/jobs/{running['id']}/pause").json()["status"] == "paused", "idempotent"
    time.sleep(1.0)
    assert http.get(f"/v1/jobs/{queued['id']}").json()["status"] == "paused", "not run while paused"

    assert http.post(f"/v1/jobs/{queued['id']}/resume").json()["status"] == "queued"
    assert wait_for(http, queued["id"], {"failed", "succeeded"}, timeout_s=60)["status"] == "failed"
    cancelled = http.post(f"/v1/jobs/{running['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    refused = http.post(f"/v1/jobs/{running['id']}/resume")
    assert refused.status_code == 409 and refused.headers["x-should-retry"] == "false"
    assert refused.json()["error"]["code"] == "job_finished"
    assert http.get(f"/v1/jobs/{running['id']}/artifacts").json()["data"] == []


def test_a_finished_job_cannot_be_cancelled(http, finished_job):
    response = http.post(f"/v1/jobs/{finished_job['id']}/cancel")
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_finished"


def test_sources_outside_the_data_roots_are_a_422_naming_the_field(http, tiny_job):
    for field, change, reason in (
        ("base_model", {"base_model": "/etc"}, "outside the allowed roots"),
        ("base_model", {"base_model": "../model"}, "neither a Hub id"),
        ("base_model", {"base_model": "https://example.com/m"}, "URL"),
    ):
        response = http.post("/v1/jobs", json={**tiny_job, **change})
        assert response.status_code == 422, response.text
        (problem,) = response.json()["error"]["fields"]
        assert problem["field"] == field and reason in problem["reason"]


def test_a_body_that_does_not_parse_is_a_422_naming_the_body(http):
    """Found by the schema fuzz: FastAPI and Starlette answered these with an undeclared 400
    and a `{"detail": ...}` body."""
    not_utf8 = http.post(
        "/v1/jobs", content=b'{"base_model": "\xff"}', headers={"content-type": "application/json"}
    )
    broken = http.post(
        "/v1/files",
        content=b"--x\r\nNone--x--\r\n",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    for response in (not_utf8, broken):
        assert invalid_fields(response) == ["body"]


def test_unknown_paths_and_methods_answer_in_the_error_envelope(http):
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for method in ("DELETE", "OPTIONS"):
        wrong = http.request(method, "/v1/jobs")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert wrong.headers["Allow"] == "GET, POST", "both routes of /v1/jobs"


@pytest.mark.parametrize(
    ("path", "params", "headers"),
    [
        ("/v1/jobs/a%00b", {}, {}),
        ("/v1/files/a%00b", {}, {}),
        ("/v1/jobs", {"after": "a\x00b"}, {}),
        ("/v1/compare", {"ids": ["a\x00b"]}, {}),
        ("/v1/jobs/nope/events", {"after": 2**31}, {}),
        ("/v1/jobs/nope/events/stream", {}, {"Last-Event-ID": str(2**40)}),
    ],
)
def test_values_postgresql_cannot_hold_are_a_422_not_a_503(http, path, params, headers):
    """Found by the schema fuzz: a NUL character or a sequence number past 32 bits made
    PostgreSQL refuse the query, which was reported as `database_unavailable`."""
    response = http.get(path, params=params, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def multipart(filename: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    """A one-file form body written by hand: clients escape odd file names themselves."""
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename.encode()
        + b'"\r\nContent-Type: text/csv\r\n\r\n'
        + content
        + b"\r\n--x--\r\n"
    )
    return body, {"content-type": "multipart/form-data; boundary=x"}


@pytest.mark.parametrize("filename", ["a" * 300 + ".csv", "a\tb.csv"])
def test_an_upload_name_that_cannot_be_stored_is_a_422(http, filename):
    """A 300-character name was a 500 (it named the scratch file, too long for the file
    system) and would not have fit its column; control characters are refused too."""
    body, headers = multipart(filename, b"q,a\nhi,hello\n")
    response = http.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_file"


def test_the_schema_declares_errors_the_bearer_scheme_and_no_transport_headers(http):
    schema = http.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    error = {"$ref": "#/components/schemas/ErrorOut"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            names = {p["name"].lower() for p in operation.get("parameters", [])}
            assert not names & {"authorization", "content-length"}, (method, path)
            if not path.startswith("/v1/"):
                continue
            assert operation["security"] == [{"ApiKey": []}]
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == error
    stream = schema["paths"]["/v1/jobs/{job_id}/events/stream"]["get"]
    (last_event_id,) = [p for p in stream["parameters"] if p["name"] == "last-event-id"]
    assert last_event_id["schema"]["type"] == "integer", "a header is never null"
