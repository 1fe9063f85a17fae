"""The API's memory preflight (`WARP_GPU_MEMORY_GIB`): a job its workers' GPUs cannot hold,
as predicted from its model's config alone, is a 422 with the figure and the options that
would make it fit; a GPU count no worker class has is a 422 naming the classes.

An API process of its own with the setting, on the session's database and Redis."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client.embedded import api_command, free_port, wait_ready
from tests.service.conftest import invalid_fields, spawn, stop
from warp_core.testing import llama_2_7b_config

GPU_MEMORY_GIB = {"1": 48, "2": 80}
"""One-GPU workers with 48 GiB GPUs, two-GPU workers with 80 GiB GPUs."""


@pytest.fixture(scope="module")
def api(service) -> Iterator[httpx.Client]:
    port = free_port()
    env = {**service.env, "WARP_GPU_MEMORY_GIB": json.dumps(GPU_MEMORY_GIB)}
    process = spawn("api-gpu-memory", api_command(port), env, service.logs)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {service.key}"}
    try:
        wait_ready(url, [process], service.logs, timeout_s=60)
        with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
            yield http
    finally:
        stop([process])


@pytest.fixture(scope="module")
def large_job(tiny_job, tmp_path_factory) -> dict:
    """The tiny job on a directory holding only a Llama-2-7B-sized config.json: no weights."""
    model = tmp_path_factory.mktemp("llama-2-7b-config")
    llama_2_7b_config().save_pretrained(model)
    assert [p.name for p in Path(model).iterdir()] == ["config.json"]
    return {**copy.deepcopy(tiny_job), "base_model": str(model)}


def memory_refusal(response: httpx.Response) -> tuple[str, str, dict]:
    """(field, reason, error.memory) of a memory 422."""
    (field,) = invalid_fields(response)
    error = response.json()["error"]
    return field, error["fields"][0]["reason"], error["memory"]


def test_a_job_its_gpus_hold_is_accepted(api, tiny_job):
    response = api.post("/v1/jobs", json=tiny_job)
    assert response.status_code == 201, response.text
    api.post(f"/v1/jobs/{response.json()['id']}/cancel")  # accepted is all this test needs


def test_a_job_too_large_for_its_gpus_is_a_422_naming_more_gpus(api, large_job):
    field, reason, memory = memory_refusal(api.post("/v1/jobs", json=large_job))
    assert field == "resources.gpus"
    assert memory["gpu_gib"] == 48
    assert memory["predicted_bytes"] > memory["usable_bytes"]
    assert [option["label"] for option in memory["options"]] == ["2 processes"]
    assert f"predicted {memory['predicted_bytes'] / 2**30:.1f} GiB per process" in reason
    assert "it would fit with 2 processes" in reason


def test_settings_that_do_not_fit_are_a_422_naming_the_hyperparameters(api, large_job):
    spec = copy.deepcopy(large_job)
    spec["resources"] = {"gpus": 2}
    spec["hyperparameters"] |= {"gradient_checkpointing": False, "max_length": 1024}
    field, reason, memory = memory_refusal(api.post("/v1/jobs", json=spec))
    assert field == "hyperparameters"
    assert memory["gpu_gib"] == 80
    labels = [option["label"] for option in memory["options"]]
    assert labels == ["gradient_checkpointing true"]
    assert memory["options"][0]["fields"] == {"hyperparameters.gradient_checkpointing": True}
    assert "it would fit with gradient_checkpointing true" in reason


def test_a_gpu_count_no_worker_class_has_is_a_422_naming_the_classes(api, tiny_job):
    spec = {**copy.deepcopy(tiny_job), "resources": {"gpus": 4}}
    response = api.post("/v1/jobs", json=spec)
    assert invalid_fields(response) == ["resources.gpus"]
    assert "the worker classes have 1, 2 GPUs" in response.json()["error"]["message"]


def test_a_model_whose_config_cannot_be_read_here_is_left_to_the_worker(api, tiny_job):
    """A Hub id that is not in the API host's cache: no network is used to plan it."""
    spec = {**copy.deepcopy(tiny_job), "base_model": "nobody/no-such-model-in-any-cache"}
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    api.post(f"/v1/jobs/{response.json()['id']}/cancel")
