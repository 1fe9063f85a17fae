"""The `warp` client commands against the live service."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO
from tests.service.conftest import wait_for
from warp_core.attacks import ATTACKS


def warp(service, *args: str, url: str | None = None) -> subprocess.CompletedProcess:
    env = {**service.env, "WARP_API_URL": url or service.url, "WARP_API_KEY": service.key}
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def compared(service, tiny_job, tmp_path_factory):
    """`warp compare SPEC.json --ablations`: the spec run as warp, full and the two WaRP
    ablations, side by side; the spec asks its harmful set under every attack and poisons
    its utility data at ratio 0.1."""
    folder = tmp_path_factory.mktemp("cli")
    spec = copy.deepcopy(tiny_job)
    spec["hyperparameters"]["max_steps"] = 2
    spec["eval"]["attacks"] = ["all"]
    spec["utility_data"]["poison"] = {"ratio": 0.1}  # the shipped harmful answers
    (folder / "spec.json").write_text(json.dumps(spec))
    plot = str(folder / "plot.png")
    result = warp(
        service, "compare", str(folder / "spec.json"), "--ablations", "--plot", plot, "--json"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout), folder


def test_compare_runs_both_methods_and_the_ablations_side_by_side(compared):
    result, folder = compared
    assert [job["spec"]["method"] for job in result["jobs"]] == ["warp", "full", "warp", "warp"]
    assert [job["spec"]["hyperparameters"]["keep_ratio"] for job in result["jobs"]][2] == 0
    assert result["jobs"][3]["spec"]["hyperparameters"]["mask_strategy"] == "random"
    assert all(job["status"] == "succeeded" for job in result["jobs"])
    rows = [line.split(" | ")[0] for line in result["markdown"].splitlines()[2:6]]
    labels = ["warp", "full", "warp, no mask", "warp, random mask"]
    assert rows == [f"| {label}, poison 0.1" for label in labels]
    assert "of full's utility-loss drop" in result["markdown"] and result["refusal_rule"]
    assert (folder / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_the_compare_view_lists_the_xstest_and_attack_rates_of_every_job(compared):
    result, _ = compared
    header = result["markdown"].splitlines()[0]
    assert "over-refusal (benign; default XSTest safe)" in header
    assert "refusal (contrast; default XSTest unsafe)" in header
    attacks = ("worst attack", "prefix injection", "refusal suppression", "style injection")
    assert all(f"refusal (harmful, {name})" in header for name in attacks)
    for job in result["jobs"]:
        evals = job["spec"]["eval"]
        assert (evals["benign"]["preset"], evals["contrast"]["preset"]) == (
            "xstest-safe",
            "xstest-unsafe",
        )
        for when in ("before", "after"):
            rates = job["metrics"][when]
            assert {"over_refusal_rate", "contrast_refusal_rate"} <= set(rates)
            under = [rates[f"refusal_rate_under_{name}"] for name in ATTACKS]
            assert rates["worst_attack_refusal_rate"] == min(under)


def test_a_poisoned_job_says_how_much_of_its_data_was_poison(service, compared, tmp_path):
    job = compared[0]["jobs"][1]
    result = warp(service, "download", job["id"], str(tmp_path), "--only", "data.json")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "data.json").read_text())
    utility = job["spec"]["utility_data"]
    mixed = round(0.1 * utility["limit"])
    assert (data["utility_data"]["rows"], data["utility_data.poison"]["rows"]) == (
        utility["limit"] - mixed,
        mixed,
    )
    assert utility["poison"]["source"].endswith("do-not-answer-harmful.csv")


def test_status_list_and_events(service, compared):
    job_id = compared[0]["jobs"][0]["id"]
    status = json.loads(warp(service, "status", job_id, "--json").stdout)
    assert status["id"] == job_id and status["status"] == "succeeded"
    human = warp(service, "status", job_id)
    assert job_id in human.stdout and "succeeded" in human.stdout
    listed = json.loads(warp(service, "list", "--status", "succeeded", "--json").stdout)
    assert job_id in [job["id"] for job in listed["data"]]
    events = json.loads(warp(service, "events", job_id, "--json").stdout)["data"]
    assert events[0]["kind"] == "started" and events[-1]["kind"] == "finished"
    streamed = warp(service, "events", job_id, "--follow", "--json").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in streamed] == [e["seq"] for e in events]


def test_download_checks_every_file(service, compared, tmp_path):
    job_id = compared[0]["jobs"][0]["id"]
    result = warp(service, "download", job_id, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "report.md").exists() and (tmp_path / "metrics.json").exists()


def test_refusals_and_an_unreachable_server_are_clear_errors(service, compared):
    job_id = compared[0]["jobs"][0]["id"]
    refused = warp(service, "cancel", job_id)
    assert refused.returncode == 1 and "job_finished" in refused.stderr
    missing = warp(service, "status", "nope")
    assert missing.returncode == 1 and "not_found" in missing.stderr
    down = warp(service, "status", job_id, url="http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_pause_resume_and_cancel_a_running_job(service, tiny_job, tmp_path):
    spec = copy.deepcopy(tiny_job)
    spec["hyperparameters"]["max_steps"] = 5000
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    job_id = json.loads(warp(service, "submit", str(tmp_path / "spec.json"), "--json").stdout)["id"]
    deadline = time.monotonic() + 180
    while service.http.get(f"/v1/jobs/{job_id}").json()["phase"] != "finetune":
        assert time.monotonic() < deadline, "the job never reached fine-tuning"
        time.sleep(0.3)
    pausing = warp(service, "pause", job_id)
    assert pausing.returncode == 0 and job_id in pausing.stdout, pausing.stderr
    assert wait_for(service.http, job_id, {"paused", "failed"}, timeout_s=30)["status"] == "paused"
    assert "paused" in warp(service, "status", job_id).stdout
    resumed = json.loads(warp(service, "resume", job_id, "--json").stdout)
    assert resumed["status"] in ("queued", "running")
    assert wait_for(service.http, job_id, {"running", "failed"})["status"] == "running"
    assert warp(service, "cancel", job_id).returncode == 0
    assert wait_for(service.http, job_id, {"cancelled", "failed"})["status"] == "cancelled"
    refused = warp(service, "resume", job_id)
    assert refused.returncode == 1 and "job_finished" in refused.stderr
