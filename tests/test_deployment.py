"""The container deployment (Dockerfile, docker-compose.yml) agrees with the code it runs.

No Docker engine is needed: the compose file is read with PyYAML, entry points are imported
in a subprocess, and `docker-compose config -q` (installed in CI by .ci/compose-check) runs
when the binary is on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic.config import Config as AlembicConfig

from api.migrate import ALEMBIC_INI
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# Variants `.ci/compose-check` validates: the default (GPU worker), the `cpu` and the `8gpu`
# profiles.
VARIANTS = {"gpu": [], "cpu": ["--profile", "cpu"], "8gpu": ["--profile", "8gpu"]}
WORKERS = ("worker", "worker-cpu", "worker-8gpu")
WORKER_ENV = {"WARP_REDIS_URL", "WARP_ARTIFACT_URL", "WARP_WORK_DIR", "WARP_WORKER_GPUS"}
REQUIRED_ENV = {
    "api": {"WARP_DATABASE_URL", "WARP_REDIS_URL", "WARP_ARTIFACT_URL"},
    **dict.fromkeys(WORKERS, WORKER_ENV),
    "migrate": {"WARP_DATABASE_URL"},
}
DEFAULT_RE = re.compile(r"^\$\{(?P<name>\w+):?-(?P<default>[^}]*)\}$")


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's two spellings, as a dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def option(cmd: list[str], *names: str) -> str:
    """The value of a CLI option (`-A x`, `--app x` or `--app=x`) in a command."""
    for index, part in enumerate(cmd):
        if part in names:
            return cmd[index + 1]
        for name in names:
            if name.startswith("--") and part.startswith(name + "="):
                return part.split("=", 1)[1]
    raise AssertionError(f"none of {names} in {cmd}")


def default_of(value: str) -> str:
    """`${VAR:-default}` -> default; a plain value is its own default."""
    match = DEFAULT_RE.match(value)
    return match["default"] if match else value


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short syntax: started, not necessarily ready
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [
        device
        for device in reservations.get("devices") or []
        if "gpu" in (device.get("capabilities") or [])
    ]


def volume_mounts(service: dict[str, Any], read_only: bool = False) -> dict[str, str]:
    """Container path -> volume name or host path (short syntax `source:/path[:mode]`; the
    source may be `${VAR:-default}`)."""
    mounts = {}
    for volume in service.get("volumes") or []:
        spec, mode = str(volume), "rw"
        if spec.endswith((":ro", ":rw")):
            spec, mode = spec[:-3], spec[-2:]
        source, target = spec.rsplit(":", 1)
        if mode == "ro" or not read_only:
            mounts[target] = source
    return mounts


def is_bind_mount(source: str) -> bool:
    return source.startswith(("${", ".", "/"))


def uvicorn_target(cmd: list[str]) -> str:
    assert "uvicorn" in cmd, cmd
    args = cmd[cmd.index("uvicorn") + 1 :]
    positional = [arg for arg in args if ":" in arg and not arg.startswith("-")]
    assert positional, f"no app target in {cmd}"
    return positional[0]


def run_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env={**clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def clean_env() -> dict[str, str]:
    """The current environment without WARP_*/TORCH_* that would change interpolation."""
    return {
        key: value for key, value in os.environ.items() if not key.startswith(("WARP_", "TORCH_"))
    }


# ------------------------------------------------------------------------ environment


def test_every_warp_variable_is_a_setting(services):
    fields = set(Settings.model_fields)
    prefix = Settings.model_config["env_prefix"]
    assert prefix == "WARP_"
    unknown = {
        f"{name}: {key}"
        for name, service in services.items()
        for key in environment(service)
        if key.startswith(prefix) and key[len(prefix) :].lower() not in fields
    }
    assert not unknown, f"WARP_* variables that service.config.Settings ignores: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(REQUIRED_ENV))
def test_required_variables_are_set(services, name):
    missing = REQUIRED_ENV[name] - set(environment(services[name]))
    assert not missing, f"{name} lacks {sorted(missing)}"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_get_no_database_credentials(services, name):
    env = environment(services[name])
    assert "WARP_DATABASE_URL" not in env
    assert not any("postgres" in value for value in env.values()), env
    assert "postgres" not in depends_on(services[name])


def test_api_and_workers_share_broker_store_and_queue(services):
    shared = ("WARP_REDIS_URL", "WARP_ARTIFACT_URL", "WARP_QUEUE")
    api = environment(services["api"])
    for name in WORKERS:
        worker = environment(services[name])
        for key in shared:
            assert api.get(key) == worker.get(key), f"{key}: api {api.get(key)} vs {name}"


def test_database_url_is_postgres_for_api_and_migrate(services):
    urls = {environment(services[name])["WARP_DATABASE_URL"] for name in ("api", "migrate")}
    assert urls == {"postgresql+psycopg://warp:warp@postgres:5432/warp"}
    postgres = environment(services["postgres"])
    assert postgres == {"POSTGRES_USER": "warp", "POSTGRES_PASSWORD": "warp", "POSTGRES_DB": "warp"}


def test_file_urls_and_work_dir_are_on_volumes(compose, services):
    declared = set(compose["volumes"])
    assert declared >= {"pgdata", "redisdata", "artifacts", "work", "hf-cache"}
    for name in ("api", *WORKERS):
        service = services[name]
        mounts = volume_mounts(service)
        assert {s for s in mounts.values() if not is_bind_mount(s)} <= declared
        env = environment(service)
        artifact_url = env["WARP_ARTIFACT_URL"]
        assert artifact_url.startswith("file://")
        assert mounts.get(artifact_url.removeprefix("file://")) == "artifacts", name
        if "WARP_WORK_DIR" in env:
            assert mounts.get(env["WARP_WORK_DIR"]) == "work", name


def test_jobs_read_local_files_only_from_a_read_only_mount(services):
    for name in ("api", *WORKERS):
        service = services[name]
        roots = json.loads(environment(service)["WARP_DATA_ROOTS"])
        assert roots, f"{name}: jobs may read any path"
        read_only = volume_mounts(service, read_only=True)
        assert all(root in read_only for root in roots), name


# ------------------------------------------------------------------------ entry points


def test_commands_resolve_to_importable_apps(services, tmp_path):
    api_target = uvicorn_target(command(services["api"]))
    celery_targets = {option(command(services[name]), "-A", "--app") for name in WORKERS}
    assert api_target == "api.main:app"
    assert celery_targets == {"worker.tasks:app"}

    # A fresh interpreter with a controlled environment: embedded SQLite under a tmp home, a
    # Redis URL that is never contacted (importing connects to nothing).
    probe = """
import importlib, json, sys

def resolve(target):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in (attr or "app").split("."):
        obj = getattr(obj, part)
    return obj

api, celery = resolve(sys.argv[1]), resolve(sys.argv[2])

from fastapi.testclient import TestClient

# Outside a `with` block the client skips the lifespan (no ingester, no dispatcher).
healthz = TestClient(api).get("/healthz")
print(json.dumps({
    "api": type(api).__name__,
    "healthz": healthz.status_code,
    "celery": type(celery).__name__,
}))
"""
    env = {
        **clean_env(),
        "WARP_HOME": str(tmp_path / "home"),
        "WARP_REDIS_URL": "redis://127.0.0.1:6379/15",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", probe, api_target, celery_targets.pop()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["api"] == "FastAPI"
    assert found["celery"] == "Celery"
    assert found["healthz"] == 200  # what the api healthcheck probes


@pytest.mark.parametrize("name", WORKERS)
def test_a_worker_consumes_the_queue_the_api_sends_its_gpu_count_to(services, name, tmp_path):
    cmd = command(services[name])
    assert cmd[0] == "celery"
    assert "worker" in cmd
    assert option(cmd, "--concurrency", "-c") == "1"
    # No -Q: the queue follows from WARP_QUEUE and WARP_WORKER_GPUS, in the code.
    assert not {"-Q", "--queues"} & set(cmd) and not any(p.startswith("--queues=") for p in cmd)
    worker, api = environment(services[name]), environment(services["api"])
    assert worker["WARP_QUEUE"] == api["WARP_QUEUE"]
    assert default_of(worker["WARP_QUEUE"]) == Settings.model_fields["queue"].default
    gpus = int(worker["WARP_WORKER_GPUS"])
    assert gpus == max(1, sum(device["count"] for device in gpu_devices(services[name])))

    # What the worker's Celery app consumes and where the API sends a job for that many GPUs,
    # each computed by the code from the service's own environment.
    probe = """
import json, sys
if sys.argv[1] == "worker":
    from service.celery_app import app
    print(app.conf.task_default_queue)
else:
    from api.dispatch import queue_of
    print(queue_of({"resources": {"gpus": int(sys.argv[2])}}))
"""
    queues = set()
    for role, env in (("worker", worker), ("api", api)):
        # Importing connects to nothing: no Redis, no database is needed.
        resolved = {key: default_of(value) for key, value in env.items()}
        result = subprocess.run(
            [sys.executable, "-c", probe, role, str(gpus)],
            cwd=ROOT,
            env={**clean_env(), **resolved, "WARP_HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        queues.add(result.stdout.strip())
    assert len(queues) == 1, f"{name} consumes one queue, the API sends to another: {queues}"


def test_migrate_runs_the_packaged_alembic_config(services, dockerfile):
    assert command(services["migrate"]) == ["warp", "admin", "migrate"]
    assert services["migrate"].get("restart") == "no"
    # The configuration ships inside the package: it names its own directory.
    ini = ROOT / "api" / "migrations" / "alembic.ini"
    assert ini.resolve() == ALEMBIC_INI
    script_location = AlembicConfig(str(ini)).get_main_option("script_location")
    assert Path(script_location).resolve() == ini.parent.resolve()
    assert (ini.parent / "env.py").is_file()
    assert list((ini.parent / "versions").glob("*.py"))


# --------------------------------------------------------------------- startup order


def test_api_waits_for_migration_and_healthy_backends(services):
    assert depends_on(services["api"]) == {
        "migrate": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    assert depends_on(services["migrate"]) == {"postgres": "service_healthy"}
    for name in WORKERS:
        assert depends_on(services[name]).get("redis") == "service_healthy"


def test_backends_have_healthchecks(services):
    postgres = " ".join(map(str, services["postgres"]["healthcheck"]["test"]))
    redis = " ".join(map(str, services["redis"]["healthcheck"]["test"]))
    assert "pg_isready" in postgres
    assert "redis-cli" in redis
    assert "ping" in redis
    assert "/healthz" in " ".join(map(str, services["api"]["healthcheck"]["test"]))


def test_redis_persists_with_append_only_file(services):
    redis = services["redis"]
    assert option(command(redis), "--appendonly") == "yes"
    assert volume_mounts(redis).get("/data") == "redisdata"
    assert volume_mounts(services["postgres"]).get("/var/lib/postgresql/data") == "pgdata"


def test_api_is_published_on_8000(services):
    ports = [str(port) for port in services["api"]["ports"]]
    assert any(default_of(port.rsplit(":", 1)[0]) == "8000" for port in ports), ports
    assert any(port.endswith(":8000") for port in ports), ports


def test_gpu_worker_reserves_a_gpu_and_cpu_worker_does_not(services):
    devices = gpu_devices(services["worker"])
    assert devices
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == 1
    assert "profiles" not in services["worker"]  # the default `up` runs the GPU worker

    cpu = services["worker-cpu"]
    assert not gpu_devices(cpu)
    assert cpu["profiles"] == ["cpu"]
    assert command(cpu) == command(services["worker"])
    assert environment(cpu) == environment(services["worker"])


def test_the_8_gpu_worker_reserves_8_gpus_and_runs_jobs_for_8(services):
    worker, eight = services["worker"], services["worker-8gpu"]
    (devices,) = gpu_devices(eight)
    assert devices["driver"] == "nvidia" and devices["count"] == 8
    assert eight["profiles"] == ["8gpu"]  # started by name, never by the default `up`
    assert command(eight) == command(worker)
    assert environment(eight) == {**environment(worker), "WARP_WORKER_GPUS": "8"}
    # NCCL between the ranks needs more shared memory than Docker's default 64 MB.
    assert eight["shm_size"] == "16gb"


def test_hf_cache_volume_is_hf_home(services, dockerfile):
    match = re.search(r"HF_HOME=(\S+)", dockerfile)
    assert match
    assert match[1] == "/data/hf-cache"
    for name in WORKERS:
        assert volume_mounts(services[name]).get(match[1]) == "hf-cache"


# -------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_torch_from_build_arg(dockerfile):
    default = re.search(r"^ARG TORCH_SPEC=(\S+)", dockerfile, re.M)
    assert default
    assert default[1] == "torch==2.13.0"
    assert re.search(r"^ARG TORCH_INDEX_URL", dockerfile, re.M)
    torch_install = re.search(r"pip install \"?\$\{?TORCH_SPEC\}?\"?", dockerfile)
    project_install = re.search(r"pip install \.", dockerfile)
    assert torch_install
    assert project_install
    assert torch_install.start() < project_install.start(), "torch must go in before the project"
    # The Makefile, the Dockerfile and the compose build arg pin the same torch.
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^TORCH \?= {re.escape(default[1])}$", makefile, re.M)


def test_compose_builds_the_image_with_the_same_torch(services, dockerfile):
    for name in ("migrate", "api", *WORKERS):
        build = services[name]["build"]
        assert build["context"] == "."
        assert default_of(build["args"]["TORCH_SPEC"]) == "torch==2.13.0"
        assert services[name]["image"] == services["api"]["image"]


def test_dockerfile_installs_every_package_and_runs_unprivileged(dockerfile):
    for package in ("warp_core", "service", "api", "worker", "client"):
        assert re.search(rf"^COPY\s+(--\S+\s+)*{package}/?\s", dockerfile, re.M), package
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users
    assert users[-1] not in {"root", "0", "0:0"}
    assert re.search(
        r"^FROM python:3\.11-slim|^ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile, re.M
    )
    cmd = re.search(r"^CMD\s+(\[.*\])", dockerfile, re.M)
    assert cmd
    assert uvicorn_target(json.loads(cmd[1])) == "api.main:app"


def test_dockerignore_keeps_local_state_out():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "runs", ".warp", "examples/tiny-model"} <= ignored
    for kept in ("pyproject.toml", "README.md", "warp_core", "service", "api", "worker", "client"):
        assert kept not in ignored


# ------------------------------------------------------------------------ docker-compose


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (CI installs it with .ci/compose-check)",
)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_docker_compose_config_validates(variant):
    args = VARIANTS[variant]
    checked = run_compose(*args, "config", "-q")
    assert checked.returncode == 0, checked.stderr

    # What compose itself makes of the file, with a non-default queue: the workers name
    # the queues the API dispatches to, and no worker sees the database.
    rendered = run_compose(*args, "config", env={"WARP_QUEUE": "a100"})
    assert rendered.returncode == 0, rendered.stderr
    resolved = yaml.safe_load(rendered.stdout)["services"]
    # docker-compose 1.29 renders every service; Compose v2 only the enabled profiles.
    workers = [name for name in WORKERS if name in resolved]
    assert "worker" in workers
    if variant != "gpu":
        assert f"worker-{variant}" in workers
    assert environment(resolved["api"])["WARP_QUEUE"] == "a100"
    for name in workers:
        assert environment(resolved[name])["WARP_QUEUE"] == "a100"
        assert "WARP_DATABASE_URL" not in environment(resolved[name])
    assert bool(gpu_devices(resolved["worker"]))
    if "worker-cpu" in resolved:
        assert not gpu_devices(resolved["worker-cpu"])
    if "worker-8gpu" in resolved:
        assert environment(resolved["worker-8gpu"])["WARP_WORKER_GPUS"] == "8"
        assert gpu_devices(resolved["worker-8gpu"])[0]["count"] == 8
