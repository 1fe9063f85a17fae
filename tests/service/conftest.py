"""The service under test: a fresh PostgreSQL database, a Redis database, the API (uvicorn)
and a Celery worker, each a real process. Set up once per test session."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from client.embedded import api_command, free_port, migrate_command, wait_ready, worker_command
from tests.helpers import REPO
from warp_core.testing import EXAMPLE_DATA

PG_SERVER = os.environ.get("WARP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("WARP_TEST_REDIS", "redis://127.0.0.1:6379/11")
DATABASE = f"warp_test_{uuid.uuid4().hex[:10]}"
HOME = Path(tempfile.mkdtemp(prefix="warp-service-test-"))
UPLOAD_LIMIT = 512 * 1024

# Before any `api` module is imported: the in-process helpers read the same settings.
os.environ.update(
    {
        "WARP_DATABASE_URL": f"{PG_SERVER}/{DATABASE}",
        "WARP_REDIS_URL": REDIS_URL,
        "WARP_HOME": str(HOME),
        "WARP_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "WARP_CANCEL_POLL_S": "0.2",
        "WARP_DATA_ROOTS": json.dumps([tempfile.gettempdir(), str(EXAMPLE_DATA)]),
    }
)


@dataclass
class Service:
    url: str
    env: dict[str, str]
    http: httpx.Client
    logs: Path
    key: str
    """An admin API key, made with `warp admin create-key` (no practical limits)."""


def _admin_engine():
    return create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")


def create_database(name: str, env: dict[str, str]) -> None:
    """A new database, migrated to head with Alembic as a deployment would."""
    admin = _admin_engine()
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    subprocess.run(
        migrate_command(),
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )


def drop_database(name: str) -> None:
    admin = _admin_engine()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def spawn(name: str, command: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    """A service process in its own session (so a test can kill it with its children)."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=(logs / f"{name}.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    """A new, migrated database for this session, dropped at the end."""
    create_database(DATABASE, dict(os.environ))
    yield os.environ["WARP_DATABASE_URL"]
    from api.db import engine

    engine.dispose()
    drop_database(DATABASE)


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    return client


@pytest.fixture(scope="session")
def service(database, redis_client) -> Iterator[Service]:
    port = free_port()
    env = dict(os.environ)
    logs = HOME / "logs"
    processes = [
        spawn("api", api_command(port), env, logs),
        spawn("worker", worker_command(), env, logs),
    ]
    url = f"http://127.0.0.1:{port}"
    unlimited = ("--rate-limit", "1000000", "--max-active-jobs", "1000")
    key = create_key(env, "tests", "--admin", *unlimited)
    http = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"})
    try:
        wait_ready(url, processes, logs, timeout_s=60)
        yield Service(url, env, http, logs, key)
    finally:
        http.close()
        stop(processes)


def create_key(env: dict[str, str], name: str, *options: str) -> str:
    """An API key from the admin command, as an operator would make one."""
    command = [sys.executable, "-m", "client.cli", "admin", "create-key", "--name", name, *options]
    made = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return made.stdout.strip()


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory) -> dict:
    """A built tiny model and a small, fast WaRP spec for it (as a JSON body)."""
    out = tmp_path_factory.mktemp("tiny-model")
    builder = [sys.executable, str(REPO / "examples" / "build_tiny_model.py"), "--quick"]
    subprocess.run(
        [*builder, "--out", str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads((out / "spec.json").read_text())


@pytest.fixture(scope="session")
def long_job(tiny_job) -> dict:
    """32 optimizer steps with a checkpoint every 2: long enough to be killed mid-training."""
    spec = copy.deepcopy(tiny_job)
    spec["utility_data"]["limit"] = 256
    spec["hyperparameters"]["epochs"] = 2
    return spec


def invalid_fields(response: httpx.Response) -> list[str]:
    """The fields a 422 names (the test fails if the response is not such a 422)."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request", error
    return [f["field"] for f in error["fields"]]


def wait_for(http: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = 180) -> dict:
    """Poll a job until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
