"""HTTP load on the job API (PostgreSQL + Redis) against a bare FastAPI app as the ceiling.

Starts, as child processes, a fresh migrated PostgreSQL database `bench_<random>`, the API
(`uvicorn api.main:app`, one process, with its in-process ingester and dispatcher threads;
no Celery worker, so submitted jobs stay queued while the dispatcher publishes them to Redis
db 13) and `bench/bare_app.py` under the same uvicorn. Then, for every concurrency and every
target, N asyncio tasks share one `httpx.AsyncClient` (connection limits = N; or, with
`--clients per-task`, one single-connection client each) and each sends requests back to
back for `--seconds` (after `--warmup` seconds whose results are dropped). Every cell gets a
freshly started server process, so a server stalled by one cell cannot spoil the next:

- `poll`:    `GET /v1/jobs/{id}` of one existing job (a status poll);
- `submit`:  `POST /v1/jobs` with a small valid spec, a different `seed` each time;
- `bare-get`: `GET /ping` on the bare app; `bare-post`: `POST /echo` with the same bodies.

Per cell: successful requests per second, p50/p99 latency of the successful requests,
errors (non-2xx or exceptions, by kind; a request that hangs past `--timeout` counts once
as ReadTimeout), and CPU use over the window: the server process (also per request),
this client process, and the whole machine (from /proc/stat; the rest is PostgreSQL, Redis
and whatever else runs). The load generator is one Python process on the same 2 cores, so
at high rates it competes with the server; its CPU column says how much.

At the end the servers are stopped, the database dropped and Redis db 13 flushed (also on
Ctrl-C or SIGTERM). Run from the repository root:

    .venv/bin/python bench/load.py --concurrency 10,100,500 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from client.embedded import migrate_command
from warp_core.testing import EXAMPLE_DATA

REPO = Path(__file__).resolve().parents[1]
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379/13"
TARGETS = ("poll", "submit", "bare-get", "bare-post")
MAX_REQUESTS_PER_TASK = 1_000_000
"""A hard bound on every request loop, on top of the time bound."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def spec_body(seed: int) -> dict[str, Any]:
    """A small valid job spec, as in tests/service/conftest.py's `tiny_job`.

    `base_model` names an existing directory: the API validates specs but never loads models.
    """

    def ref(name: str, preset: str, limit: int) -> dict[str, Any]:
        return {"source": str(EXAMPLE_DATA / name), "preset": preset, "limit": limit}

    return {
        "base_model": str(REPO / "examples"),
        "method": "warp",
        "safety_data": ref("do-not-answer.csv", "do-not-answer", 32),
        "utility_data": ref("gsm8k.jsonl", "gsm8k", 64),
        "eval": {"limit": 4, "max_new_tokens": 8, "utility_max_new_tokens": 8},
        "hyperparameters": {
            "learning_rate": 1e-3,
            "epochs": 1,
            "max_length": 192,
            "checkpoint_every": 2,
            "seed": seed,
        },
    }


class Stack:
    """A fresh database, Redis db 13 and child processes; `close()` undoes all of it."""

    def __init__(self, prefix: str, keep_logs: bool = False) -> None:
        self.database = f"bench_{prefix}_{uuid.uuid4().hex[:8]}"
        self.home = Path(tempfile.mkdtemp(prefix=f"warp-bench-{prefix}-"))
        self.logs = self.home / "logs"
        self.logs.mkdir()
        self.database_url = f"{PG_SERVER}/{self.database}"
        self.env = {
            **os.environ,
            "WARP_DATABASE_URL": self.database_url,
            "WARP_AUTH_REQUIRED": "false",  # the framework's cost; --auth adds key lookups
            "WARP_DATA_ROOTS": json.dumps(["/"]),
            "WARP_REDIS_URL": REDIS_URL,
            "WARP_HOME": str(self.home),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.keep_logs = keep_logs
        self._created = False

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _admin(self) -> Engine:
        """An autocommit engine on the server's `test` database (CREATE/DROP DATABASE)."""
        return create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")

    def create_database(self) -> None:
        """Flush Redis db 13, create the database and migrate it with Alembic."""
        redis.Redis.from_url(REDIS_URL).flushdb()
        admin = self._admin()
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.database}"'))
        admin.dispose()
        self._created = True
        subprocess.run(
            migrate_command(),
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def create_key(self) -> str:
        """Require API keys from now on; an admin key without practical limits, made with
        the admin command as an operator would."""
        self.env["WARP_AUTH_REQUIRED"] = "true"
        command = [sys.executable, "-m", "client.cli", "admin", "create-key", "--name", "load"]
        limits = ["--admin", "--rate-limit", "100000000", "--max-active-jobs", "100000000"]
        made = subprocess.run(
            [*command, *limits], cwd=REPO, env=self.env, capture_output=True, text=True, check=True
        )
        return made.stdout.strip()

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start a child process in the repository, its output in `logs/NAME.log`."""
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env,
            stdout=(self.logs / f"{name}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def start_uvicorn(self, name: str, app: str, extra: list[str] | None = None) -> str:
        """Start `uvicorn APP` on a free port; returns its base URL."""
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        self.start(name, [*argv, "--log-level", "warning", *(extra or [])])
        return f"http://127.0.0.1:{port}"

    def wait_ready(self, name: str, url: str, timeout_s: float = 60.0) -> None:
        """Poll URL until it answers 200, failing early if the process dies."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < deadline:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.logs / name}.log")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(url).status_code == 200:
                        return
                time.sleep(0.2)
        raise TimeoutError(f"{name} not ready after {timeout_s} s; see {self.logs}")

    def stop(self, name: str) -> None:
        """Stop one child: SIGTERM to its pid, SIGKILL after 15 s."""
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def job_counts(self) -> dict[str, int]:
        """Jobs by status, read from the database."""
        engine = create_engine(self.database_url)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT status, count(*) FROM jobs GROUP BY status"))
            counts = {status: int(n) for status, n in rows}
        engine.dispose()
        return counts

    def stop_processes(self) -> None:
        """SIGTERM every child (by its own pid), then SIGKILL what is left after 20 s."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.processes.clear()

    def close(self) -> None:
        """Stop the children, drop the database, flush Redis db 13, remove the temp dir."""
        self.stop_processes()
        if self._created:
            admin = self._admin()
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
            admin.dispose()
            self._created = False
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(REDIS_URL).flushdb()
        if self.keep_logs:
            print(f"logs kept in {self.logs}", file=sys.stderr)
        else:
            shutil.rmtree(self.home, ignore_errors=True)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so cleanup runs for both."""

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


@dataclass
class Cell:
    """What one (target, concurrency) window measured."""

    target: str
    concurrency: int
    seconds: float = 0.0
    ok: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_busy: float = 0.0

    @property
    def rate(self) -> float:
        """Successful requests per second of the window."""
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def server_ms_per_request(self) -> float:
        """Server CPU milliseconds per request (ok or not): the cost independent of load."""
        done = self.ok + sum(self.errors.values())
        return self.server_cpu * self.seconds * 1000 / done if done else float("nan")

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies (ms)."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def as_dict(self) -> dict[str, Any]:
        """The cell as JSON-ready figures (for `--json`)."""
        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "rate": round(self.rate, 1),
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "errors": dict(self.errors),
            "server_cpu": round(self.server_cpu, 2),
            "server_ms_per_request": round(self.server_ms_per_request, 3),
            "client_cpu": round(self.client_cpu, 2),
            "machine_busy": round(self.machine_busy, 2),
        }


async def drive(
    clients: list[httpx.AsyncClient],
    request: Request,
    concurrency: int,
    seconds: float,
    cell: Cell,
    cutoff_s: float,
) -> None:
    """`concurrency` tasks send requests back to back until `seconds` have passed; requests
    still running `cutoff_s` after that are cancelled (and not counted)."""
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in range(MAX_REQUESTS_PER_TASK):
            if time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            try:
                response = await request(client)
            except httpx.HTTPError as exc:
                cell.errors[type(exc).__name__] += 1
                continue
            elapsed = (time.perf_counter() - started) * 1000
            if 200 <= response.status_code < 300:
                cell.ok += 1
                cell.latencies_ms.append(elapsed)
            else:
                cell.errors[f"HTTP {response.status_code}"] += 1

    tasks = [asyncio.create_task(worker(clients[i % len(clients)])) for i in range(concurrency)]
    try:
        await asyncio.wait(tasks, timeout=seconds + cutoff_s)
    finally:  # also on Ctrl-C: no task may outlive the clients
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(
    url: str,
    target: str,
    request: Request,
    concurrency: int,
    seconds: float,
    warmup: float,
    server_pid: int,
    timeout_s: float = 30.0,
    per_task: bool = False,
    headers: dict[str, str] | None = None,
) -> Cell:
    """One cell: warm the connections up, then measure a window of `seconds`.

    One `AsyncClient` whose pool holds `concurrency` connections, or with `per_task` one
    client of one connection per task (httpcore's pool costs CPU per request that grows
    with its size; this shows how much of the client's CPU that is).
    """
    timeout = httpx.Timeout(timeout_s, pool=timeout_s * 2)
    sizes = [1] * concurrency if per_task else [concurrency]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url,
                    headers=headers,
                    timeout=timeout,
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                )
            )
            for n in sizes
        ]
        if warmup > 0:  # requests still running a second after the warm-up are dropped
            await drive(clients, request, concurrency, warmup, Cell(target, concurrency), 1.0)
        cell = Cell(target, concurrency)
        server0, client0 = cpu_seconds(server_pid), time.process_time()
        busy0, total0 = machine_ticks()
        started = time.perf_counter()
        await drive(clients, request, concurrency, seconds, cell, timeout_s + 10.0)
        cell.seconds = time.perf_counter() - started
        busy1, total1 = machine_ticks()
        cell.server_cpu = (cpu_seconds(server_pid) - server0) / cell.seconds
        cell.client_cpu = (time.process_time() - client0) / cell.seconds
        cell.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
    return cell


def make_requests(job_id: str) -> dict[str, Request]:
    """The request of each target; submissions and echoes get a fresh seed every time."""
    seeds = itertools.count(1)

    async def poll(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get(f"/v1/jobs/{job_id}")

    async def submit(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/jobs", json=spec_body(next(seeds)))

    async def bare_get(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/ping")

    async def bare_post(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/echo", json=spec_body(next(seeds)))

    return {"poll": poll, "submit": submit, "bare-get": bare_get, "bare-post": bare_post}


def table(cells: list[Cell]) -> str:
    """A Markdown table of the cells."""
    lines = [
        "| target | clients | req/s | p50 ms | p99 ms | ok | errors | server CPU | "
        "server CPU ms/req | client CPU | machine busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(c.errors.items())) or "0"
        p50, p99 = (f"{c.percentile(q):.1f}" if c.ok else "-" for q in (0.5, 0.99))
        lines.append(
            f"| {c.target} | {c.concurrency} | {c.rate:,.0f} | {p50} | "
            f"{p99} | {c.ok} | {errors} | {c.server_cpu:.2f} | "
            f"{c.server_ms_per_request:.2f} | {c.client_cpu:.2f} | {c.machine_busy:.0%} |"
        )
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> list[Cell]:
    """Start the stack, measure every cell, print the table; always clean up.

    Every cell runs against a freshly started server process: a stalled API (see the README)
    keeps working off the previous cell's requests for minutes and would poison the next.
    """
    cells: list[Cell] = []
    apps: dict[str, tuple[str, str, list[str]]] = {
        "api": ("api.main:app", "/readyz", []),
        "bare": ("bare_app:app", "/ping", ["--app-dir", "bench"]),
    }

    def fresh(name: str) -> str:
        stack.stop(name)
        app, ready, extra = apps[name]
        url = stack.start_uvicorn(name, app, ["--timeout-graceful-shutdown", "3", *extra])
        stack.wait_ready(name, url + ready)
        return url

    with Stack("load", ns.keep_logs) as stack:
        print(f"database {stack.database}, logs {stack.logs}", flush=True)
        stack.create_database()
        headers = {"Authorization": f"Bearer {stack.create_key()}"} if ns.auth else {}
        with httpx.Client(base_url=fresh("api"), timeout=30, headers=headers) as http:
            created = http.post("/v1/jobs", json=spec_body(0))
            created.raise_for_status()
            job_id = created.json()["id"]
        requests = make_requests(job_id)
        for concurrency in ns.concurrency:
            for target in ns.targets:
                name = "bare" if target.startswith("bare") else "api"
                url = fresh(name)
                cell = asyncio.run(
                    measure(
                        url,
                        target,
                        requests[target],
                        concurrency,
                        ns.seconds,
                        ns.warmup,
                        stack.processes[name].pid,
                        ns.timeout,
                        ns.clients == "per-task",
                        headers,
                    )
                )
                cells.append(cell)
                print(table([cell]).splitlines()[-1], flush=True)
                if stack.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited during the run; see {stack.logs}")
        stack.stop_processes()
        print(f"jobs at the end: {stack.job_counts()}", flush=True)
    return cells


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (every loop is bounded by these values)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 100, 500],
        help="comma-separated client counts (default 10,100,500)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up per cell")
    parser.add_argument(
        "--targets",
        type=lambda s: s.split(","),
        default=list(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the cells here")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    parser.add_argument(
        "--clients",
        choices=("shared", "per-task"),
        default="shared",
        help="one AsyncClient for all tasks (default) or one single-connection client per task",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--auth", action="store_true", help="require API keys (a key lookup per request)"
    )
    ns = parser.parse_args(argv)
    if any(c <= 0 or c > 2000 for c in ns.concurrency):
        parser.error("--concurrency values must be in 1..2000")
    if not 0 < ns.seconds <= 600 or not 0 <= ns.warmup <= 60 or not 0 < ns.timeout <= 120:
        parser.error("--seconds must be in (0, 600], --warmup in [0, 60], --timeout in (0, 120]")
    if unknown := set(ns.targets) - set(TARGETS):
        parser.error(f"unknown targets {sorted(unknown)}")
    return ns


def main(argv: list[str] | None = None) -> None:
    """Run the cells and print the table."""
    ns = parse(argv)
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
        f"python {sys.version.split()[0]}, httpx {httpx.__version__}",
        flush=True,
    )
    try:
        with sigterm_as_interrupt():
            cells = run(ns)
    except KeyboardInterrupt:
        print("interrupted; servers stopped, database dropped", file=sys.stderr)
        raise SystemExit(130) from None
    print()
    print(table(cells))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if ns.json:
        ns.json.write_text(json.dumps([c.as_dict() for c in cells], indent=2) + "\n")


if __name__ == "__main__":
    main()
