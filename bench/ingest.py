"""Event ingestion throughput (Redis Stream -> PostgreSQL) and dispatch latency of the service.

Part 1, ingestion (in-process, no server): a fresh migrated database `bench_ingest_<random>`
and Redis db 13 (flushed). `--jobs` jobs are inserted with SQLAlchemy (status `running`),
then `--events` progress events per job are appended with `service.protocol.EventPublisher`,
round-robin over the jobs as concurrent workers would, as fast as one client can. Then
`api.ingest.Ingester(...).step()` runs in a loop, exactly as the API's ingester thread does
(batches of up to 500 entries, one transaction per batch, acknowledged after the commit),
until every event is in `job_events`. Reported: publish rate, ingestion events/s and total
time, SQL statements per event and the share of the time spent in `apply_events`.

Part 2, dispatch latency: the API (`uvicorn api.main:app`) and one Celery worker
(`--concurrency 1`, on the one-GPU queue) on the same database and Redis db. One unmeasured
warm-up job, then `--dispatch-jobs` jobs one after another, each with `base_model`
"/nonexistent/model" so that it fails in preflight. For each, the client polls `GET
/v1/jobs/{id}` every `--poll-ms` and records when it first sees `running` and `failed`; the
breakdown comes from the job's timestamps (dispatched_at is set by the API,
started_at/finished_at are the worker's event times). The worker runs each job in a fresh
child process that imports the pipeline (transformers, torch) before it can fail: that
import dominates.

The database is dropped and Redis db 13 flushed at the end (also on Ctrl-C or SIGTERM).
Run from the repository root:

    .venv/bin/python bench/ingest.py --jobs 20 --events 500 --dispatch-jobs 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from load import REDIS_URL, Stack, sigterm_as_interrupt, spec_body
from sqlalchemy import event, func, select

PHASES = ("basis", "importance", "finetune")
INGEST_TIMEOUT_S = 600.0


def ingestion(stack: Stack, jobs: int, events: int) -> dict[str, Any]:
    """Publish jobs x events progress events, then ingest them all; returns the figures."""
    import api.ingest as ingest_module  # after the WARP_* variables are set
    from api.db import engine, session_scope, utcnow
    from api.models import Job, JobEvent
    from service.protocol import EventPublisher, redis_client

    client = redis_client(REDIS_URL)
    client.flushdb()
    ids = [uuid.uuid4().hex for _ in range(jobs)]
    with session_scope() as session:
        for job_id in ids:
            session.add(
                Job(
                    id=job_id,
                    status="running",
                    spec=spec_body(0),
                    created_at=utcnow(),
                    started_at=utcnow(),
                )
            )

    from service.config import settings

    publishers = [EventPublisher(client, settings.event_stream, job_id) for job_id in ids]
    started = time.perf_counter()
    for step in range(1, events + 1):
        phase = PHASES[min(len(PHASES) - 1, 3 * (step - 1) // events)]
        for publisher in publishers:
            publisher.publish(
                "progress", phase, step=step, total_steps=events, fraction=step / events
            )
    publish_s = time.perf_counter() - started
    total = jobs * events
    assert client.xlen(settings.event_stream) == total

    statements: Counter[str] = Counter()

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        words = statement.split()
        verb = words[0].upper() if words else "?"
        if verb == "SELECT" and "FOR UPDATE" in statement.upper():
            verb = "SELECT FOR UPDATE"
        statements[verb] += 1

    apply_s = 0.0
    original = ingest_module.apply_events

    def timed_apply(session: Any, messages: list[Any]) -> int:
        nonlocal apply_s
        t0 = time.perf_counter()
        try:
            return original(session, messages)
        finally:
            apply_s += time.perf_counter() - t0

    ingest_module.apply_events = timed_apply  # instrumentation only, in this process
    event.listen(engine, "before_cursor_execute", count)
    ingester = ingest_module.Ingester(client, consumer="bench-ingest")
    ingester.ensure_group()
    handled, rounds = 0, 0
    started = time.perf_counter()
    deadline = started + INGEST_TIMEOUT_S
    while handled < total and time.perf_counter() < deadline and rounds < total:
        handled += ingester.step(block_ms=200)
        rounds += 1
    ingest_s = time.perf_counter() - started
    event.remove(engine, "before_cursor_execute", count)
    ingest_module.apply_events = original

    with session_scope() as session:
        stored = session.scalar(select(func.count()).select_from(JobEvent))
        last = set(session.scalars(select(Job.last_seq).where(Job.id.in_(ids))))
        progress = set(session.scalars(select(Job.progress_step).where(Job.id.in_(ids))))
    engine.dispose()
    client.flushdb()
    return {
        "jobs": jobs,
        "events_per_job": events,
        "events": total,
        "publish_s": round(publish_s, 3),
        "publish_per_s": round(total / publish_s),
        "ingest_s": round(ingest_s, 3),
        "ingest_per_s": round(stored / ingest_s),
        "stored": stored,
        "batches": rounds,
        "statements_per_event": round(sum(statements.values()) / max(1, stored), 2),
        "statements": dict(statements),
        "apply_share": round(apply_s / ingest_s, 3),
        "jobs_last_seq": sorted(last),
        "jobs_progress_step": sorted(progress),
    }


def _ts(value: str | None) -> float | None:
    """An API timestamp (ISO 8601) as a Unix time."""
    return datetime.fromisoformat(value).timestamp() if value else None


def dispatch(
    stack: Stack, count: int, poll_s: float, gap_s: float, timeout_s: float
) -> list[dict[str, Any]]:
    """Submit failing jobs one by one; returns per-job latencies in seconds."""
    from api.db import engine, session_scope
    from api.models import Job
    from client.embedded import worker_command

    api_url = stack.start_uvicorn("api", "api.main:app")
    stack.start("worker", worker_command())
    stack.wait_ready("api", f"{api_url}/readyz")
    rows: list[dict[str, Any]] = []
    with httpx.Client(base_url=api_url, timeout=30) as http:
        for index in range(count + 1):  # index 0: warm-up (worker start), not reported
            body = spec_body(index) | {"base_model": "/nonexistent/model"}
            submitted_wall = time.time()
            t0 = time.perf_counter()
            job = http.post("/v1/jobs", json=body).raise_for_status().json()
            submit_ms = (time.perf_counter() - t0) * 1000
            seen_running = None
            deadline = t0 + timeout_s
            while time.perf_counter() < deadline:
                job = http.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
                now = time.perf_counter() - t0
                if job["status"] == "running" and seen_running is None:
                    seen_running = now
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(poll_s)
            else:
                raise TimeoutError(f"job {job['id']} still {job['status']}; see {stack.logs}")
            seen_final = time.perf_counter() - t0
            with session_scope() as session:
                dispatched = session.get(Job, job["id"]).dispatched_at
            started, finished = _ts(job["started_at"]), _ts(job["finished_at"])
            row = {
                "job": index,
                "status": job["status"],
                "error": (job["error"] or {}).get("code"),
                "message": (job["error"] or {}).get("message", "")[:120],
                "post_ms": round(submit_ms, 1),
                "seen_running_s": None if seen_running is None else round(seen_running, 3),
                "seen_final_s": round(seen_final, 3),
                "to_dispatched_s": round(dispatched.timestamp() - submitted_wall, 3),
                "to_started_s": round(started - submitted_wall, 3) if started else None,
                "started_to_finished_s": round(finished - started, 3) if started else None,
                "finished_to_seen_s": round(submitted_wall + seen_final - finished, 3),
            }
            print(json.dumps(row), flush=True)
            if index:
                rows.append(row)
            time.sleep(gap_s)  # let the pool replace the child that ran the job
    engine.dispose()
    return rows


def dispatch_table(rows: list[dict[str, Any]]) -> str:
    """Median / min / max of each latency column, as a Markdown table."""
    columns = {
        "POST /v1/jobs (ms)": "post_ms",
        "submit -> dispatched_at": "to_dispatched_s",
        "submit -> started (worker event time)": "to_started_s",
        "started -> finished (worker)": "started_to_finished_s",
        "finished -> seen by poll": "finished_to_seen_s",
        "submit -> seen running": "seen_running_s",
        "submit -> seen failed": "seen_final_s",
    }
    lines = [
        "| measure (s unless noted) | median | min | max | n |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key in columns.items():
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            lines.append(
                f"| {label} | {statistics.median(values):.3f} | {min(values):.3f} | "
                f"{max(values):.3f} | {len(values)} |"
            )
        else:
            lines.append(f"| {label} | - | - | - | 0 |")
    return "\n".join(lines)


def ingest_table(result: dict[str, Any]) -> str:
    """The ingestion figures as a Markdown table."""
    return "\n".join(
        [
            "| jobs x events | publish (events/s) | ingest time (s) | ingest (events/s) | "
            "batches | SQL statements/event | time in apply_events |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {result['jobs']} x {result['events_per_job']} = {result['events']} | "
            f"{result['publish_per_s']:,} | {result['ingest_s']:.2f} | "
            f"{result['ingest_per_s']:,} | {result['batches']} | "
            f"{result['statements_per_event']} | {result['apply_share']:.0%} |",
        ]
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (every loop below is bounded by these values)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs receiving events")
    parser.add_argument("--events", type=int, default=500, help="progress events per job")
    parser.add_argument("--dispatch-jobs", type=int, default=10, help="measured failing jobs")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="status poll interval")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between failing jobs")
    parser.add_argument("--job-timeout", type=float, default=180.0, help="per failing job")
    parser.add_argument("--skip-ingest", action="store_true", help="only the dispatch part")
    parser.add_argument("--skip-dispatch", action="store_true", help="only the ingestion part")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = parser.parse_args(argv)
    if not (1 <= ns.jobs <= 1000 and ns.events >= 1 and ns.jobs * ns.events <= 1_000_000):
        parser.error("--jobs in 1..1000, --events >= 1, at most 1e6 events in all")
    if not 0 <= ns.dispatch_jobs <= 100 or not 1 <= ns.poll_ms <= 1000:
        parser.error("--dispatch-jobs in 0..100, --poll-ms in 1..1000")
    return ns


def main(argv: list[str] | None = None) -> None:
    """Run both parts and print their tables."""
    ns = parse(argv)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    results: dict[str, Any] = {}
    try:
        with sigterm_as_interrupt(), Stack("ingest") as stack:
            print(f"database {stack.database}, logs {stack.logs}", flush=True)
            stack.create_database()
            os.environ.update({k: v for k, v in stack.env.items() if k.startswith("WARP_")})
            if not ns.skip_ingest:
                results["ingest"] = ingestion(stack, ns.jobs, ns.events)
                print(ingest_table(results["ingest"]), flush=True)
            if not ns.skip_dispatch and ns.dispatch_jobs:
                results["dispatch"] = dispatch(
                    stack, ns.dispatch_jobs, ns.poll_ms / 1000, ns.gap, ns.job_timeout
                )
    except KeyboardInterrupt:
        print("interrupted; processes stopped, database dropped", file=sys.stderr)
        raise SystemExit(130) from None
    print()
    if "ingest" in results:
        print(ingest_table(results["ingest"]))
        print(f"SQL statements by kind: {results['ingest']['statements']}")
        print(
            f"every job ends at last_seq {results['ingest']['jobs_last_seq']}, "
            f"progress step {results['ingest']['jobs_progress_step']}"
        )
        print()
    if "dispatch" in results:
        print(dispatch_table(results["dispatch"]))
        print(
            f"first error: {results['dispatch'][0]['error']}: {results['dispatch'][0]['message']}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
