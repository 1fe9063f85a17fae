"""A service stack of its own for fault injection: a private Redis server and a TCP proxy in
front of PostgreSQL (both can be taken down and brought back), an API and workers that the
tests kill with SIGKILL, and a short lease so lost workers are noticed in seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import redis

from api.dispatch import message_job_id
from client.embedded import api_command, free_port, wait_ready, worker_command
from tests.service.conftest import PG_SERVER, spawn

QUEUE = "faults"
LEASE_S = 2
MAX_ATTEMPTS = 3
RECLAIM_S = 2
"""Events a killed API had read are taken over by the next one after this idle time."""


class TcpProxy:
    """Forwards a local port to a server; `down()` cuts every connection and refuses new
    ones (as a crashed or unreachable server would), `up()` forwards again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.alive = True
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if not self.alive:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def down(self) -> None:
        self.alive = False
        with self.lock:
            for end in self.open:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            self.open.clear()

    def up(self) -> None:
        self.alive = True


class FaultStack:
    def __init__(self, home: Path, database: str) -> None:
        self.home = home
        self.logs = home / "logs"
        self.redis_port = free_port()
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        host, port = PG_SERVER.rsplit("@", 1)[1].split(":")
        self.pg_proxy = TcpProxy((host, int(port)))
        pg = PG_SERVER.rsplit(":", 1)[0]
        self.env = {
            **os.environ,
            "WARP_DATABASE_URL": f"{pg}:{self.pg_proxy.port}/{database}",
            "WARP_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "WARP_HOME": str(home),
            "WARP_QUEUE": QUEUE,
            "WARP_LEASE_S": str(LEASE_S),
            "WARP_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "WARP_CANCEL_POLL_S": "0.2",
            "WARP_INGEST_RECLAIM_IDLE_MS": str(int(RECLAIM_S * 1000)),
            "WARP_AUTH_REQUIRED": "false",  # keys are tested elsewhere; faults here
        }
        self.redis: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.client = redis.Redis(port=self.redis_port)

    # -- Redis -----------------------------------------------------------------------------

    def start_redis(self) -> None:
        """redis-server with an append-only file, as docker-compose runs it."""
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "yes", "--dir", str(data)]
        self.redis = spawn("redis", command, self.env, self.logs)
        wait(lambda: self.client.ping(), "redis-server to answer")

    def stop_redis(self) -> None:
        self.redis.terminate()
        self.redis.wait(timeout=20)

    # -- API and workers -------------------------------------------------------------------

    def start_api(self) -> None:
        self.api = spawn("api", api_command(self.api_port), self.env, self.logs)
        wait_ready(self.url, [self.api], self.logs, timeout_s=60)

    def kill_api(self) -> None:
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait()

    def start_worker(self, gpus: int = 1) -> subprocess.Popen:
        """A worker for jobs on `gpus` GPUs (on this CPU-only machine, `gpus` gloo processes)."""
        env = {**self.env, "WARP_WORKER_GPUS": str(gpus)}
        worker = spawn(f"worker-{gpus}gpu", worker_command(), env, self.logs)
        self.workers.append(worker)
        return worker

    def kill_task_process(self, worker: subprocess.Popen) -> None:
        """SIGKILL the pool child running the job's task (an OOM kill), and so the job's
        processes (they die with it); the worker lives on."""
        (child,) = children(worker.pid)
        os.kill(child, signal.SIGKILL)

    def kill_worker_host(self, worker: subprocess.Popen) -> None:
        """SIGKILL the worker and its child at once: the host is gone."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        self.workers.remove(worker)

    def close(self) -> None:
        self.http.close()
        for process in [*self.workers, self.api, self.redis]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    # -- observations ----------------------------------------------------------------------

    def has_checkpoint(self, job_id: str) -> bool:
        return has_checkpoint(self.home / "work" / job_id / "output")

    def queued_message(self, job_id: str) -> bytes | None:
        """The job's message as it waits on the queue, if it does."""
        for raw in self.client.lrange(QUEUE, 0, -1):
            if message_job_id(raw) == job_id:
                return raw
        return None

    def events(self, job_id: str) -> list[dict]:
        return self.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def has_checkpoint(out: Path) -> bool:
    """Whether a job writing to `out` has saved a complete training checkpoint, from one
    process or sharded over several (`latest.json` names it once it is whole, see
    warp_core.checkpoint)."""
    return (out / "checkpoints" / "finetune" / "latest.json").exists()


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def job_processes(job_id: str) -> dict[int, int | None]:
    """The live processes running a job (`warp run`: its launcher and its ranks, whose command
    lines name the job's work directory), pid -> rank (None: the launcher). A copy that one
    of them forked and has not yet replaced by another program is left out."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()  # empty for a zombie: it is dead
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # not a process, or one that ended while we looked
        if b"warp_core" in cmdline and f"/{job_id}/".encode() in cmdline:
            ranks = [int(item[5:]) for item in environ if item.startswith(b"RANK=")]
            found[int(entry.name)] = (parent, ranks[0] if ranks else None)
    return {
        pid: rank
        for pid, (parent, rank) in found.items()
        if parent not in found or found[parent][1] != rank
    }


class RunsAtOnce:
    """Watches a job's processes in a thread, every 20 ms, while in its `with` block: the most
    launchers and the most ranks seen alive at the same time (two runs at once would show
    two launchers, or twice the ranks)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.launchers = self.ranks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            ranks = list(job_processes(self.job_id).values())
            self.launchers = max(self.launchers, ranks.count(None))
            self.ranks = max(self.ranks, len(ranks) - ranks.count(None))

    def __enter__(self) -> RunsAtOnce:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait(condition, what: str, timeout_s: float = 120, interval_s: float = 0.05):
    """Poll `condition` until it returns something true (exceptions count as false)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except Exception:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"waited {timeout_s} s for {what}")
