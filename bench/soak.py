"""Soak: minutes of concurrent submissions, polls and cancels while workers are killed.

Starts a fresh migrated PostgreSQL database, Redis db 13, the API and `--workers` Celery
workers (the same processes as production), with a short lease so lost workers are noticed
in seconds. Then, for `--seconds`:

- submitters send small real jobs (a tiny Llama, a few optimizer steps) with an
  `Idempotency-Key`, retrying the same key after a timeout or a 5xx, as a careful client does;
- pollers read random known jobs back to back (`GET /v1/jobs/{id}`);
- a canceller cancels a random unfinished job now and then;
- chaos kills a random worker every `--kill-every` seconds, alternating between killing the
  process running the job (an OOM kill: Celery requeues it) and killing the worker with its
  child (a lost host: the API's reaper requeues it), and starts a replacement.

Then it stops the load, keeps the workers running until every job has finished (or
`--drain` seconds pass) and reports: jobs submitted, finished by status, lost (accepted with
a `201` but unknown to the server afterwards), unfinished (still queued or running when the
drain ended: on a slow machine, a longer `--drain` tells a backlog from a stuck job),
duplicated (one Idempotency-Key that made two jobs, or a job with two `finished` events),
jobs whose event sequence has a gap, attempts, and the latency percentiles and errors per
request kind. Run from the repository root:

    .venv/bin/python bench/soak.py --seconds 180 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
from load import REPO, Stack, sigterm_as_interrupt

from client.embedded import worker_command

TERMINAL = {"succeeded", "failed", "cancelled"}
ACTIVE = {"queued", "running", "cancelling"}


class Soak:
    def __init__(self, stack: Stack, url: str, spec: dict[str, Any], ns: argparse.Namespace):
        self.stack, self.url, self.spec, self.ns = stack, url, spec, ns
        self.ids_by_key: dict[str, set[str]] = defaultdict(set)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.kills: Counter[str] = Counter()
        self.stop = asyncio.Event()

    @property
    def job_ids(self) -> list[str]:
        return sorted({job_id for ids in self.ids_by_key.values() for job_id in ids})

    async def call(self, http: httpx.AsyncClient, kind: str, method: str, path: str, **kw):
        started = time.perf_counter()
        try:
            response = await http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.errors[f"{kind} {type(exc).__name__}"] += 1
            return None
        self.latency[kind].append(time.perf_counter() - started)
        if response.status_code >= 500:
            self.errors[f"{kind} {response.status_code}"] += 1
        return response

    async def submitter(self, http: httpx.AsyncClient, index: int) -> None:
        seed = index * 100_000
        while not self.stop.is_set():
            seed += 1
            key = uuid.uuid4().hex
            body = {**self.spec, "hyperparameters": {**self.spec["hyperparameters"], "seed": seed}}
            for _ in range(5):  # the same key until the server gives an answer
                response = await self.call(
                    http, "submit", "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}
                )
                if response is not None and response.status_code < 500:
                    if response.status_code in (200, 201):
                        self.ids_by_key[key].add(response.json()["id"])
                    break
                await asyncio.sleep(1)
            await asyncio.sleep(self.ns.submit_every)

    async def poller(self, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            if ids := self.job_ids:
                await self.call(http, "poll", "GET", f"/v1/jobs/{random.choice(ids)}")
            else:
                await asyncio.sleep(0.2)

    async def canceller(self, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.ns.cancel_every)
            if ids := self.job_ids:
                await self.call(http, "cancel", "POST", f"/v1/jobs/{random.choice(ids)}/cancel")

    async def chaos(self) -> None:
        round_ = 0
        while not self.stop.is_set():
            await asyncio.sleep(self.ns.kill_every)
            name = f"worker-{random.randrange(self.ns.workers)}"
            if round_ % 2 == 0:
                self.kills["job process"] += kill_children(self.stack.processes[name])
            else:
                self.kill_host(name)
                self.kills["worker host"] += 1
            round_ += 1

    def kill_host(self, name: str) -> None:
        process = self.stack.processes[name]
        kill_children(process)
        process.kill()
        process.wait()
        self.stack.start(name, worker_command())

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.ns.pollers + self.ns.submitters + 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=10, limits=limits) as http:
            tasks = [
                asyncio.create_task(self.submitter(http, i)) for i in range(self.ns.submitters)
            ]
            tasks += [asyncio.create_task(self.poller(http)) for _ in range(self.ns.pollers)]
            tasks += [asyncio.create_task(self.canceller(http)), asyncio.create_task(self.chaos())]
            await asyncio.sleep(self.ns.seconds)
            self.stop.set()
            await asyncio.gather(*tasks)


def kill_children(process: subprocess.Popen[bytes]) -> int:
    """SIGKILL a worker's pool children (the processes running jobs); how many there were."""
    path = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    children = [int(pid) for pid in path.read_text().split()] if path.exists() else []
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    return len(children)


def drain(http: httpx.Client, ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Every job's final record, waiting up to `timeout_s` for all to finish."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = {job_id: http.get(f"/v1/jobs/{job_id}").json() for job_id in ids}
        if not any(j.get("status") in ACTIVE for j in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            return jobs
        time.sleep(2)


def audit(http: httpx.Client, soak: Soak, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    statuses = Counter(job.get("status", "unknown") for job in jobs.values())
    gaps, twice_finished, attempts = 0, 0, Counter()
    for job_id, job in jobs.items():
        events = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        if [e["seq"] for e in events] != list(range(1, len(events) + 1)):
            gaps += 1
        twice_finished += sum(e["kind"] == "finished" for e in events) > 1
        attempts[job.get("attempt", 0)] += 1
    lost = sum(1 for job in jobs.values() if "status" not in job)
    unfinished = sum(1 for job in jobs.values() if job.get("status") in ACTIVE)
    duplicated = sum(len(ids) > 1 for ids in soak.ids_by_key.values()) + twice_finished
    return {
        "seconds": soak.ns.seconds,
        "workers": soak.ns.workers,
        "submitted": len(jobs),
        "statuses": dict(statuses),
        "lost": lost,
        "unfinished": unfinished,
        "duplicated": duplicated,
        "event_gaps": gaps,
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "kills": dict(soak.kills),
        "errors": dict(soak.errors),
        "latency_ms": {kind: percentiles(values) for kind, values in soak.latency.items()},
    }


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"n": len(ordered), "p50": at(0.5), "p95": at(0.95), "p99": at(0.99)}


def tiny_spec(stack: Stack, max_steps: int) -> dict[str, Any]:
    """A real job on a tiny random Llama: a few optimizer steps, checkpoints every step."""
    out = stack.home / "tiny-model"
    builder = [sys.executable, str(REPO / "examples" / "build_tiny_model.py"), "--quick"]
    subprocess.run([*builder, "--out", str(out)], check=True, capture_output=True, env=stack.env)
    spec = json.loads((out / "spec.json").read_text())
    spec["hyperparameters"].update({"checkpoint_every": 1, "max_steps": max_steps})
    return spec


def run(ns: argparse.Namespace) -> dict[str, Any]:
    with sigterm_as_interrupt(), Stack("soak", keep_logs=ns.keep_logs) as stack:
        stack.env.update({"WARP_LEASE_S": str(ns.lease), "WARP_MAX_ATTEMPTS": "10"})
        stack.create_database()
        spec = tiny_spec(stack, ns.max_steps)
        url = stack.start_uvicorn("api", "api.main:app")
        stack.wait_ready("api", f"{url}/readyz")
        for index in range(ns.workers):
            stack.start(f"worker-{index}", worker_command())
        soak = Soak(stack, url, spec, ns)
        asyncio.run(soak.run())
        with httpx.Client(base_url=url, timeout=30) as http:
            jobs = drain(http, soak.job_ids, ns.drain)
            return audit(http, soak, jobs)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180, help="How long the load runs.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--submitters", type=int, default=2)
    parser.add_argument("--submit-every", type=float, default=15.0, help="Per submitter, s.")
    parser.add_argument("--pollers", type=int, default=8)
    parser.add_argument("--cancel-every", type=float, default=10.0, help="Seconds.")
    parser.add_argument("--kill-every", type=float, default=20.0, help="Seconds.")
    parser.add_argument("--lease", type=float, default=3.0, help="WARP_LEASE_S, seconds.")
    parser.add_argument("--max-steps", type=int, default=4, help="Optimizer steps per job.")
    parser.add_argument("--drain", type=float, default=900, help="Seconds to let jobs finish.")
    parser.add_argument("--keep-logs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    report = run(parse(argv))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
