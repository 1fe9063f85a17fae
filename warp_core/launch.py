"""A job as operating-system processes: torchrun for several, the stop signal, the event log.

`warp run SPEC --out DIR --nproc-per-node N` runs `torchrun --standalone --nproc-per-node N
-m warp_core run ...` (torch's own launcher, never a home-made one) as its child; each of the
N processes then runs the pipeline as one rank of the job. Whoever starts a job as a process
(a person at a terminal, the service's worker) talks to it three ways:

- SIGTERM or SIGINT asks it to stop at its next step, keeping its last checkpoint (a second
  signal stops it at once). The launcher passes each one on to torchrun, which passes it on
  to every rank.
- `--events PATH` appends one JSON line per pipeline event (from rank 0) and one `exit`
  record per rank as it ends: `{"kind": "exit", "rank", "world_size", "status", "message"}`
  with status `succeeded`, `failed` or `cancelled`. A rank with no exit record was killed.
- The exit code: 0 done, 1 failed, 2 invalid spec, 130 stopped (run again to resume).

Every process dies with the one that started it (Linux `PR_SET_PDEATHSIG`): torchrun with
the launcher, each rank with torchrun (which starts ranks in sessions of their own), so a
killed launcher never leaves ranks running beside the job's next attempt.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from warp_core.events import Event

EXIT_STOPPED = 130
"""Exit code of a job stopped by a signal; its output directory resumes it."""


def under_torchrun() -> bool:
    """Whether this process is a rank that torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def rank() -> int:
    """This process's rank in the job (0 when it runs alone)."""
    return int(os.environ.get("RANK", "0"))


def run_torchrun(nproc_per_node: int, args: list[str]) -> int:
    """Run `python -m warp_core ARGS` in N processes under torchrun; return the exit code.

    `--standalone` rendezvous on a free local port, so jobs on one machine never collide.
    torchrun runs in a session of its own and gets each SIGTERM or SIGINT this process
    receives exactly once; a run stopped that way exits 130, as one process does (torchrun
    itself would say 1).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "warp_core",
        *args,
    ]
    stopped = threading.Event()
    parent = os.getpid()
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=lambda: die_with(parent))

    def forward(signum: int, _frame: Any) -> None:
        stopped.set()
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = child.wait()
    return EXIT_STOPPED if stopped.is_set() and code != 0 else code


_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_prctl = _find_prctl()
"""Looked up once, here: never between a fork and an exec, where loading could deadlock."""


def die_with(parent: int) -> None:
    """SIGKILL this process when its parent dies, or now if `parent` already has (Linux's
    `PR_SET_PDEATHSIG`; a no-op elsewhere). Safe between fork and exec (`preexec_fn`)."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def leave(code: int) -> NoReturn:
    """End this process with `code`, its exit record written. A rank skips the interpreter's
    teardown (`os._exit`): torch's C++ process-group objects sometimes abort there
    (`std::terminate`, about 1 run in 7 with gloo here) after the job has finished, which
    torchrun would take for a failed rank and answer by stopping the others mid-write."""
    if not under_torchrun():
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class StopSignal:
    """The first SIGTERM or SIGINT sets `requested`; the pipeline stops at its next check. A
    second one gets the signal's default action (SIGINT: KeyboardInterrupt)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self._event.is_set():
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, default)
            os.kill(os.getpid(), signum)
            return
        self._event.set()

    def requested(self) -> bool:
        return self._event.is_set()


class EventLog:
    """Appends JSON lines to a file: one `write` per line, so the lines of several ranks
    appending at once never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, "ts": time.time()}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def event(self, event: Event) -> None:
        self._append({"kind": event.kind, "phase": event.phase, "data": event.data})

    def exit(self, world_size: int, status: str, message: str | None = None) -> None:
        self._append(
            {
                "kind": "exit",
                "rank": rank(),
                "world_size": world_size,
                "status": status,
                "message": message,
            }
        )
