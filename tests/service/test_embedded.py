"""README's first command: the embedded service runs the demo comparison end to end over
HTTP, and the figures it prints show WaRP keeping the refusals plain fine-tuning erases."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from api.embedded import REPO


def test_warp_demo_compares_warp_and_plain_fine_tuning_through_the_service(tmp_path, toy_cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARP_")}
    env["WARP_TOY_CACHE"] = str(toy_cache)
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "demo", "--home", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "service up on" in result.stderr and "refusal rate" in result.stdout
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
