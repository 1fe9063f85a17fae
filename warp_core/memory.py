"""Peak memory of one stretch of a job (a phase), the figure `metrics.json` reports.

On CUDA it is `torch.cuda.max_memory_allocated` over the stretch (the peak statistics are
reset when it begins). On the CPU it is the rise of the process's peak resident memory
(`VmHWM`, reset when the stretch begins through `/proc/self/clear_refs`) over its resident
memory (`VmRSS`) at that moment. Before that, free memory the C allocator still holds from
earlier stretches is given back (`malloc_trim`): handed out again, it would be resident
already and the stretch would look smaller than it is. Linux only on the CPU: elsewhere the
figure is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import TracebackType

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def resident_bytes() -> dict[str, int] | None:
    """This process's resident memory now (`rss`) and its peak since the last reset
    (`peak`), in bytes; None where /proc is not there."""
    try:
        status = STATUS.read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
    return {"rss": int(fields["VmRSS"]) * 1024, "peak": int(fields["VmHWM"]) * 1024}


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, looked up once (`find_library` runs `ldconfig`); None elsewhere."""
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_free_memory() -> None:
    """Give free heap memory back to the system (glibc's `malloc_trim`; a no-op elsewhere)."""
    gc.collect()
    if trim := _malloc_trim():
        trim(0)


def reset_peak() -> bool:
    """Reset this process's peak resident memory to its current one (Linux `clear_refs` 5)."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """`with PeakMemory(device) as peak: work()`; then `peak.bytes` (None if unmeasurable)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        release_free_memory()
        if reset_peak() and (now := resident_bytes()) is not None:
            self._start = now["rss"]
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._start is not None and (now := resident_bytes()) is not None:
            self.bytes = max(0, now["peak"] - self._start)
