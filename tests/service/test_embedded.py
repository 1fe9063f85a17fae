"""README's first command: the embedded service runs the demo comparison end to end over
HTTP, and the figures it prints show WaRP keeping the refusals plain fine-tuning erases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.embedded import free_port, wait_ready
from tests.helpers import REPO


def test_warp_demo_compares_warp_and_plain_fine_tuning_through_the_service(tmp_path, toy_cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARP_")}
    env["WARP_TOY_CACHE"] = str(toy_cache)
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "demo", "--home", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "service up on" in result.stderr and "refusal rate" in result.stdout
    assert "/ui" in result.stderr.split("service up on", 1)[1][:200]  # the dashboard's URL
    assert "of full's utility-loss drop" in result.stdout
    assert (tmp_path / "demo" / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    runs = {}
    for job in (tmp_path / "artifacts" / "jobs").iterdir():
        spec = json.loads((job / "spec.json").read_text())
        runs[spec["method"]] = json.loads((job / "metrics.json").read_text())
        assert (job / "model" / "model.safetensors").exists()
    assert sorted(runs) == ["full", "warp"]
    assert runs["warp"]["before"]["refusal_rate"] >= 0.9
    assert runs["full"]["after"]["refusal_rate"] <= 0.3
    assert runs["warp"]["after"]["refusal_rate"] >= 0.8
    assert (tmp_path / "warp.db").exists()


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [d for child in map(int, children) for d in (child, *descendants(child))]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("when", ["starting", "ready"])
def test_warp_serve_stops_every_process_it_started_on_sigterm(tmp_path, when):
    """Whether the signal comes while the service is still starting or once it is up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARP_")}
    port = free_port()
    command = [sys.executable, "-m", "client.cli", "serve", "--home", str(tmp_path)]
    serve = subprocess.Popen(
        [*command, "--port", str(port)], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    try:
        if when == "ready":
            wait_ready(f"http://127.0.0.1:{port}", [serve], tmp_path / "logs", timeout_s=120)
        deadline = time.monotonic() + 120
        enough = 2 if when == "starting" else 3  # the API and the worker (and its child)
        while len(started := descendants(serve.pid)) < enough:
            assert time.monotonic() < deadline, started
            time.sleep(0.05)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 143  # 20 s grace, then SIGKILL; slow when busy
    finally:
        for pid in [serve.pid, *descendants(serve.pid)] if serve.poll() is None else []:
            os.kill(pid, signal.SIGKILL)  # a failed run leaves nothing behind either
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)]
