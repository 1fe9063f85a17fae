"""One attempt of a job as operating-system processes: `warp run` in a process group of its
own, watched from the Celery child that runs the task.

Every job, on one GPU or eight, runs as `python -m warp_core run SPEC --out OUT --events
EVENTS --nproc-per-node N`, which replaces itself with torchrun when N > 1 (warp_core.launch
states the contract). A Celery child is a daemon process and may not fork multiprocessing
children, and a job on several GPUs is several processes; one code path serves both. The
task process keeps hold of it from outside:

- The child dies with the task process (PR_SET_PDEATHSIG, set between fork and exec and kept
  across torchrun's exec) and every rank dies with torchrun (warp_core.launch), so a killed
  or timed-out worker child leaves no rank running beside the job's next attempt.
- The child leads a process group of its own (a new session), signalled as one: SIGTERM asks
  every rank to stop at its next step (torchrun passes it on), SIGKILL ends the launcher
  and, through their death signal, the ranks.
- Its events are JSON lines appended to a file, read here as they come; what it prints
  (stdout and stderr) goes to a log file beside them, kept with the work directory until
  the job finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from warp_core.events import Event
from warp_core.launch import die_with
from warp_core.spec import JobSpec

LOG_NAME = "warp-run.log"
"""The child's stdout and stderr, in its attempt's directory."""


@dataclass(frozen=True)
class Ending:
    """How an attempt's processes ended.

    `killed`: a rank left no exit record (SIGKILL, the OOM killer) or the launcher died by a
    signal, so the attempt was cut short and its last checkpoint is where the job resumes.
    `cancelled`: ranks stopped at a step on SIGTERM or SIGINT, keeping the checkpoint (the
    runner's stop, or a signal from elsewhere). `message` says why for all but `succeeded`.
    """

    status: Literal["succeeded", "failed", "cancelled", "killed"]
    message: str | None = None


def judge(returncode: int, exits: dict[int, dict[str, Any]], world_size: int) -> Ending:
    """The ending of an attempt from the launcher's exit code and the ranks' exit records.

    A missing record outweighs everything else: when one rank is killed torchrun stops the
    others, which then report `cancelled` or a failed collective, and neither is the cause.
    """
    if missing := [rank for rank in range(world_size) if rank not in exits]:
        ranks = ", ".join(map(str, missing))
        return Ending("killed", f"no exit record from rank {ranks}: it was killed")
    if returncode < 0:
        return Ending("killed", f"the launcher was killed by signal {-returncode}")
    failed = [exits[rank] for rank in sorted(exits) if exits[rank]["status"] == "failed"]
    if failed:
        return Ending("failed", failed[0]["message"])
    if any(record["status"] == "cancelled" for record in exits.values()):
        return Ending("cancelled", "the job's processes were stopped by a signal")
    return Ending("succeeded")


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ("" if there is none), for an error message."""
    try:
        with path.open(errors="replace") as log:
            return "".join(deque(log, maxlen=lines)).strip()
    except FileNotFoundError:
        return ""


class JobProcess:
    """`warp run` for one attempt of a job: the spec, event file and log live in `attempt_dir`,
    the outputs (and the checkpoints every attempt resumes from) in `out`. `run_id` (the job's
    id) names the run in its model cards and trackers.

    Use it as a context manager: leaving the block kills whatever of the group still runs.
    Start it from the thread that lives as long as the job: Linux sends the death signal when
    the thread that forked the child ends, not the process.
    """

    def __init__(self, spec: JobSpec, out: Path, attempt_dir: Path, run_id: str) -> None:
        self.world_size = spec.resources.gpus
        self.out = out
        self.run_id = run_id
        self.spec_path = attempt_dir / "spec.json"
        self.events_path = attempt_dir / "events.jsonl"
        self.log_path = attempt_dir / LOG_NAME
        self.exits: dict[int, dict[str, Any]] = {}
        self._partial = b""
        self._kill_at: float | None = None
        attempt_dir.mkdir(parents=True, exist_ok=True)
        self.spec_path.write_text(spec.model_dump_json(indent=2))
        self.events_path.write_bytes(b"")

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "warp_core",
            "run",
            str(self.spec_path),
            "--out",
            str(self.out),
            "--events",
            str(self.events_path),
            "--nproc-per-node",
            str(self.world_size),
            "--run-id",
            self.run_id,
        ]

    def __enter__(self) -> JobProcess:
        parent = os.getpid()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: die_with(parent),
            )
        self._events = self.events_path.open("rb")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()
        self._events.close()

    def events(self) -> list[Event]:
        """The pipeline events appended since the last call; exit records go to `exits`."""
        *lines, self._partial = (self._partial + self._events.read()).split(b"\n")
        found = []
        for line in lines:
            record = json.loads(line)
            if record["kind"] == "exit":
                self.exits[record["rank"]] = record
            else:
                found.append(Event(record["kind"], record["phase"], record["data"]))
        return found

    def poll(self) -> int | None:
        """The launcher's exit code once it has ended; kills a stop that outlived its grace."""
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._signal(signal.SIGKILL)
        return self.process.poll()

    def stop(self, grace_s: float) -> None:
        """Ask every rank to stop at its next step; `poll` kills them after `grace_s`."""
        if self._kill_at is None:
            self._signal(signal.SIGTERM)
            self._kill_at = time.monotonic() + grace_s

    def kill(self) -> None:
        """End every process of the attempt still running, now, and wait for the launcher."""
        self._signal(signal.SIGKILL)
        self.process.wait()

    def ending(self) -> Ending:
        """How the attempt ended (call once `poll` says so and `events` has read the file)."""
        ending = judge(self.process.returncode, self.exits, self.world_size)
        if ending.status == "failed" and not ending.message:
            return Ending("failed", tail(self.log_path) or "the job failed without a message")
        return ending

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)
