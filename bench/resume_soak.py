"""Kill-and-resume soak: is a job SIGKILLed at a random moment of Phase 3, then run again on
the same directory, still bit for bit the uninterrupted job?

A small WaRP job (the tiny example model, `--quick` slices, 256 utility rows, 3 epochs (48 steps),
a checkpoint every 2 steps, evaluation off) runs once without interruption for the
reference `model.safetensors` sha256. Then each cycle starts the same job in a fresh
directory (`python -m warp_core run`, a process of its own), waits for its first training
checkpoint, SIGKILLs it after a random delay, runs it again to the end and compares the sha.

Run from the repository root: `.venv/bin/python bench/resume_soak.py --cycles 100`;
`--nproc-per-node 2` runs every job in two processes (torchrun, gloo): the kill then hits
the launcher, and its ranks die with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from warp_core.testing import build_tiny_model

RUN = [sys.executable, "-m", "warp_core", "run"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job(spec_path: Path) -> Path:
    """The soak's job: the quick example job made longer, evaluation off."""
    spec = json.loads(spec_path.read_text())
    spec["utility_data"]["limit"] = 256
    spec["hyperparameters"] |= {"epochs": 3, "checkpoint_every": 2}
    spec["eval"] = {"enabled": False}
    path = spec_path.with_name("soak.json")
    path.write_text(json.dumps(spec))
    return path


def command(spec: Path, out: Path, processes: int) -> list[str]:
    return [*RUN, str(spec), "--out", str(out), "--nproc-per-node", str(processes)]


def run_to_end(spec: Path, out: Path, processes: int) -> str:
    subprocess.run(command(spec, out, processes), check=True, capture_output=True)
    return sha256(out / "model" / "model.safetensors")


def killed_then_resumed(spec: Path, out: Path, delay_s: float, processes: int) -> tuple[str, int]:
    """The sha after a kill `delay_s` after the first checkpoint, and the step it resumed at."""
    process = subprocess.Popen(
        command(spec, out, processes), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = out / "checkpoints" / "finetune" / "latest.json"
    while not latest.exists() and process.poll() is None:
        time.sleep(0.02)
    time.sleep(delay_s)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads((out / "state.json").read_text())
    finished = "finetune" in state["completed"]
    step = -1 if finished else json.loads(latest.read_text())["step"]
    return run_to_end(spec, out, processes), step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--max-delay", type=float, default=3.0, help="seconds after the checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    ns = parser.parse_args()
    rng = random.Random(ns.seed)
    with tempfile.TemporaryDirectory(prefix="warp-resume-soak-") as scratch:
        root = Path(scratch)
        _, spec_path = build_tiny_model(root / "tiny", quick=True)
        spec = job(spec_path)
        started = time.monotonic()
        reference = run_to_end(spec, root / "reference", ns.nproc_per_node)
        print(f"reference {reference[:16]} in {time.monotonic() - started:.1f} s", flush=True)
        mismatches = []
        started = time.monotonic()
        for cycle in range(ns.cycles):
            delay = rng.uniform(0, ns.max_delay)
            out = root / f"cycle-{cycle}"
            sha, step = killed_then_resumed(spec, out, delay, ns.nproc_per_node)
            if sha != reference:
                mismatches.append((cycle, delay, step))
                print(f"cycle {cycle}: MISMATCH (delay {delay:.3f} s, step {step})", flush=True)
            else:
                print(f"cycle {cycle}: same (delay {delay:.3f} s, resumed at {step})", flush=True)
        seconds = time.monotonic() - started
    print(f"{ns.cycles} kill-and-resume cycles, {len(mismatches)} mismatches, {seconds:.0f} s")


if __name__ == "__main__":
    main()
