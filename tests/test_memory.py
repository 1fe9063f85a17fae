"""The peak-memory figure of a phase, on the CPU: the rise of the peak resident memory over
the resident memory when the phase began."""

from __future__ import annotations

import pytest
import torch

from warp_core.memory import PeakMemory, resident_bytes

pytestmark = pytest.mark.skipif(resident_bytes() is None, reason="needs Linux /proc")
MIB = 2**20


def test_a_phase_that_touches_memory_reports_at_least_that_much():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * MIB // 4, dtype=torch.float32)  # 64 MiB, written
        del block
    assert peak.bytes is not None and peak.bytes >= 60 * MIB


def test_each_phase_has_its_own_peak():
    with PeakMemory(torch.device("cpu")) as first:
        block = torch.ones(96 * MIB // 4, dtype=torch.float32)
        del block
    with PeakMemory(torch.device("cpu")) as second:
        small = torch.ones(MIB // 4, dtype=torch.float32)
        del small
    assert first.bytes >= 90 * MIB
    assert second.bytes < 48 * MIB, "the first phase's peak is not carried over"
