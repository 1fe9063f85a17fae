"""A property-based fuzz of the live API from its own OpenAPI schema (schemathesis).

Every operation the service publishes is called with generated requests through the real
HTTP stack (uvicorn, PostgreSQL, Redis, the worker) with an admin key: valid ones, invalid
ones, and valid ones aimed at a real job, artifact and upload or carrying a valid job spec
(random ids only reach the 404 path, random specs the 422 one). No answer may be a 5xx or
accept invalid input, carry a status the schema does not declare, or have a content type,
headers or body other than the declared ones. A job that a generated request manages to
queue is cancelled at once, so the worker is not left training on it.

schemathesis' own pytest loader (`schemathesis.pytest.from_fixture`) does not run under
pytest 9.2 (it sets `Node._nodeid`, which pytest dropped), so each operation is driven
here with its public Hypothesis strategy (`APIOperation.as_strategy`) and the same checks.
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from api.db import session_scope
from api.deps import get_store
from api.models import Artifact
from tests.service.conftest import HOME, wait_for

MAX_EXAMPLES = 40
"""Per operation and pass: the whole file takes about a minute on two cores."""

CHECKS = [
    not_a_server_error,
    negative_data_rejection,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=True,
)
STATUSES: defaultdict[str, Counter[int]] = defaultdict(Counter)
"""Per operation and pass, how often each status was answered: the record of the run."""


@pytest.fixture(scope="module")
def api_schema(service):
    """The schema as the running service publishes it."""
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


SPEC = {
    "base_model": f"{HOME}/nonexistent/fuzz-model",
    "safety_data": {"source": "librai/do-not-answer", "limit": 8},
    "utility_data": {"source": "openai/gsm8k", "limit": 8},
}
"""Valid, and fails preflight at once (no such model): random specs are almost all 422."""


@pytest.fixture(scope="module")
def known(service) -> dict[str, str]:
    """What exists: a job that failed preflight (it has events) with one artifact, as a
    finished job's would be stored, and an uploaded file."""
    job = service.http.post("/v1/jobs", json=SPEC)
    assert job.status_code == 201, job.text
    upload = service.http.post("/v1/files", files={"file": ("pairs.csv", b"q,a\nhi,hello\n")})
    assert upload.status_code == 201, upload.text
    job_id = wait_for(service.http, job.json()["id"], {"failed"}, timeout_s=120)["id"]
    store = get_store()
    stored = store.put(io.BytesIO(b'{"fuzz": true}'), store.job_path(job_id, "metrics.json"))
    with session_scope() as session:
        session.add(
            Artifact(job_id=job_id, name="metrics.json", size=stored.size, sha256=stored.sha256)
        )
    return {"job_id": job_id, "file_id": upload.json()["id"], "name": "metrics.json"}


def aimed_at(operation, known: dict[str, str]) -> dict[str, Any] | None:
    """The strategy arguments that point an operation at what exists, if it takes any."""
    names = set(re.findall(r"{(\w+)", operation.path)) & known.keys()
    if names:
        return {"path_parameters": {name: known[name] for name in names}}
    if operation.label == "GET /v1/compare":
        return {"query": {"ids": [known["job_id"]]}}
    if operation.label == "POST /v1/jobs":
        return {"body": SPEC}  # the headers (Idempotency-Key) are still generated
    return None


def fuzz(operation, service, label: str, mode: GenerationMode, **fixed: Any) -> str | None:
    """Run one operation's cases; the failures found, as schemathesis words them, or None."""

    @SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    def run(case) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {service.key}"}
        # timeout: a stream of a running job lasts until the job ends (none runs here).
        response = case.call_and_validate(checks=CHECKS, timeout=30)
        STATUSES[f"{operation.label} ({label})"][response.status_code] += 1
        if operation.label == "POST /v1/jobs" and response.status_code == 201:
            service.http.post(f"/v1/jobs/{response.json()['id']}/cancel")

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid: no parameters, or only free strings
        return None
    except (FailureGroup, AssertionError) as exc:
        notes = "\n".join(getattr(exc, "__notes__", []))
        return f"{operation.label} ({label}): {exc}\n{notes}"
    return None


def operations(api_schema) -> list:
    found = [result.ok() for result in api_schema.get_all_operations()]
    assert len(found) >= 14, [op.label for op in found]
    return found


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_are_answered_as_the_schema_says(api_schema, service, mode):
    found = [fuzz(op, service, mode.value, mode) for op in operations(api_schema)]
    failures = [failure for failure in found if failure]
    assert not failures, "\n\n".join(failures)


def test_generated_requests_on_a_real_job_and_file_are_answered_as_the_schema_says(
    api_schema, service, known
):
    aimed = [(op, fixed) for op in operations(api_schema) if (fixed := aimed_at(op, known))]
    assert len(aimed) >= 9
    found = [fuzz(op, service, "known", GenerationMode.POSITIVE, **f) for op, f in aimed]
    failures = [failure for failure in found if failure]
    assert not failures, "\n\n".join(failures)


def test_the_fuzz_ran_cases():
    """The count, for the record (`pytest -s` shows it)."""
    total = sum(sum(counts.values()) for counts in STATUSES.values())
    print(f"\nschemathesis {schemathesis.SCHEMATHESIS_VERSION}: {total} cases")
    for label, counts in sorted(STATUSES.items()):
        answered = " ".join(f"{status}x{n}" for status, n in sorted(counts.items()))
        print(f"  {sum(counts.values()):4d}  {label}: {answered}")
    assert total > 0
