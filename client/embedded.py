"""Embedded mode: the whole service on one machine, with no server to install.

With no `WARP_DATABASE_URL` the API keeps its state in SQLite under `WARP_HOME`; with no
`WARP_REDIS_URL` this process hosts a Redis-protocol server in memory (fakeredis), which
carries the Celery queue, the event stream and the cancel flags exactly as Redis would. The
API (uvicorn) and one Celery worker run as child processes: from HTTP to warp_core the code
path is the production one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedService:
    """Start with `start()`, stop with `stop()` (or use it as a context manager)."""

    def __init__(self, home: Path, port: int, log_dir: Path | None = None) -> None:
        self.home = home.resolve()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir = log_dir or self.home / "logs"
        self.processes: list[subprocess.Popen] = []
        self._redis_server = None

    def environment(self) -> dict[str, str]:
        # One user on one machine: no API keys, and jobs may read any local path (the only
        # place these are relaxed for you).
        relaxed = {"WARP_AUTH_REQUIRED": "false", "WARP_DATA_ROOTS": '["/"]'}
        env = {**relaxed, **os.environ, "WARP_HOME": str(self.home)}
        if not env.get("WARP_REDIS_URL"):
            env["WARP_REDIS_URL"] = self._start_redis()
        return env

    def _start_redis(self) -> str:
        from fakeredis import TcpFakeServer

        port = free_port()
        self._redis_server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        # Connection threads must not keep this process alive once the service is stopped.
        self._redis_server.daemon_threads = True
        self._redis_server.block_on_close = False
        threading.Thread(target=self._redis_server.serve_forever, daemon=True).start()
        return f"redis://127.0.0.1:{port}/0"

    def start(self, timeout_s: float = 90.0) -> EmbeddedService:
        """Start everything; if anything fails or is interrupted (Ctrl-C, SIGTERM) on the way,
        stop what was started: `with` runs no `__exit__` when `__enter__` raises."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> EmbeddedService:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        subprocess.run(migrate_command(), cwd=self.home, env=env, check=True, capture_output=True)
        self._spawn("api", api_command(self.port), env)
        self._spawn("worker", worker_command(), env)
        wait_ready(self.url, self.processes, self.log_dir, timeout_s)
        return self

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.processes.append(
            subprocess.Popen(
                command,
                # Its own directory: uvicorn puts the cwd first on sys.path, and a user's
                # folder may hold a module named like ours.
                cwd=self.home,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )
        )

    def stop(self) -> None:
        """SIGTERM each child's process group (a worker's pool children with it), SIGKILL
        what is left after 20 s: nothing outlives the service."""
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        if self._redis_server is not None:
            self._redis_server.shutdown()
            self._redis_server.server_close()

    def __enter__(self) -> EmbeddedService:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def migrate_command() -> list[str]:
    """Bring the database to the newest schema (the packaged Alembic revisions)."""
    return [sys.executable, "-m", "api.migrate"]


def api_command(port: int) -> list[str]:
    """The API process: uvicorn on loopback (put a proxy in front to expose it)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def worker_command() -> list[str]:
    """One worker process running one job at a time: jobs for as many GPUs as its
    WARP_WORKER_GPUS (default 1), from their queue (no -Q: see service.celery_app)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.tasks:app",
        "worker",
        "--concurrency",
        "1",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def wait_ready(
    url: str, processes: list[subprocess.Popen], log_dir: Path, timeout_s: float
) -> None:
    """Wait until `url/readyz` answers 200; fail early if a process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"a service process exited; see the logs in {log_dir}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the API was not ready in {timeout_s:.0f} s; see {log_dir}")
