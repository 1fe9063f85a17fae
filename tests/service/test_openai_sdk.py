"""The OpenAI-compatible API driven by the official `openai` SDK only, against the live stack
(uvicorn, a Celery worker, PostgreSQL, Redis): files, a warp and a supervised job to
`succeeded` with their metrics events, checkpoints and result file, paging, cancel, and a job
paused mid-training and resumed that ends with the weights of an uninterrupted one.

Every job is the tiny model on chat files made from the shipped slices: seconds each."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import openai
import pytest

from warp_core.testing import SAFETY_SLICE, UTILITY_SLICE

DONE = {"succeeded", "failed", "cancelled"}
TINY = {"max_length": 192, "checkpoint_every": 2, "basis_batch_size": 4, "warmup_ratio": 0.0}
"""Our hyperparameters beside OpenAI's, for a job of seconds."""


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=service.key, timeout=30)


def chat_rows(prompts_answers: list[tuple[str, str]]) -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in prompts_answers
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict[str, Path]:
    """Chat JSONL files from the shipped slices: refusals, a task and its validation rows."""
    out = tmp_path_factory.mktemp("chat")
    with SAFETY_SLICE.open(newline="") as handle:
        refusals = [(r["question"], r["llama2-7b-chat_response"]) for r in csv.DictReader(handle)]
    with UTILITY_SLICE.open() as handle:
        task = [(r["question"], r["answer"]) for r in map(json.loads, handle)]
    files = {
        "safety.jsonl": refusals[:40],
        "train.jsonl": task[:64],
        "valid.jsonl": task[64:72],
        "long.jsonl": task[:128],
    }
    for name, rows in files.items():
        (out / name).write_bytes(chat_rows(rows))
    return {name.removesuffix(".jsonl"): out / name for name in files}


@pytest.fixture(scope="module")
def uploads(client, chat_files) -> dict[str, str]:
    """Each chat file uploaded once: name -> file id."""
    ids = {}
    for name, path in chat_files.items():
        with path.open("rb") as handle:
            ids[name] = client.files.create(file=handle, purpose="fine-tune").id
    return ids


def wait_status(client, job_id: str, statuses: set[str], timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job.status} after {timeout_s} s")


def model_sha256(job) -> str:
    """Ours beside OpenAI's fields: the job's artifacts with their sha256."""
    artifacts = job.model_extra["artifacts"]
    return next(a["sha256"] for a in artifacts if a["name"] == "model/model.safetensors")


def test_files_upload_list_page_read_and_delete(client, chat_files, uploads):
    train = client.files.retrieve(uploads["train"])
    assert (train.object, train.purpose, train.status) == ("file", "fine-tune", "processed")
    assert train.bytes == chat_files["train"].stat().st_size
    assert train.filename == "train.jsonl" and train.created_at > 0
    assert client.files.content(train.id).read() == chat_files["train"].read_bytes()

    first = client.files.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    everything = [f.id for f in client.files.list(limit=1)]  # the SDK pages by `after`
    assert set(uploads.values()) <= set(everything) and len(everything) == len(set(everything))

    with chat_files["valid"].open("rb") as handle:
        spare = client.files.create(file=handle, purpose="fine-tune")
    deleted = client.files.delete(spare.id)
    assert deleted.deleted and deleted.id == spare.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(spare.id)


def test_a_chat_file_that_is_not_valid_chat_data_is_refused_with_the_line(client, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    wrong = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(wrong) + "\n")
    with pytest.raises(openai.UnprocessableEntityError) as refused, bad.open("rb") as handle:
        client.files.create(file=handle, purpose="fine-tune")
    error = refused.value.body
    assert error["param"] == "file" and error["type"] == "invalid_request_error"
    assert "line 2: messages[1].role must be one of" in error["message"], error


def test_a_job_naming_an_unknown_file_is_refused_naming_the_field(client, tiny_job):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.fine_tuning.jobs.create(model=tiny_job["base_model"], training_file="nope")
    assert refused.value.body["param"] == "training_file"


def create(client, tiny_job, uploads, method: str, **hyperparameters):
    settings = {"hyperparameters": {"n_epochs": 1, "batch_size": 16, **TINY, **hyperparameters}}
    if method == "warp":
        settings["safety_file"] = uploads["safety"]
    return client.fine_tuning.jobs.create(
        model=tiny_job["base_model"],
        training_file=uploads["train"],
        validation_file=uploads["valid"],
        method={"type": method, method: settings},
        suffix="sdk-test",
        metadata={"test": method},
    )


@pytest.fixture(scope="module")
def finished_jobs(client, tiny_job, uploads) -> dict:
    """A warp and a supervised job on the same files, run to their end."""
    extra = {"n_checkpoints": 2, "eval_every": 2, "learning_rate_multiplier": 20}
    jobs = {m: create(client, tiny_job, uploads, m, **extra) for m in ("warp", "supervised")}
    return {m: wait_status(client, job.id, DONE) for m, job in jobs.items()}


@pytest.mark.parametrize("method", ["warp", "supervised"])
def test_a_job_runs_to_succeeded_as_the_sdk_reads_it(client, finished_jobs, uploads, method):
    job = finished_jobs[method]
    assert job.status == "succeeded", job.error
    assert job.object == "fine_tuning.job" and job.method.type == method
    assert (job.training_file, job.validation_file) == (uploads["train"], uploads["valid"])
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 16
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(20)
    assert job.suffix == "sdk-test" and job.metadata == {"test": method}
    assert job.fine_tuned_model == f"job:{job.id}/model"
    assert job.finished_at >= job.created_at and job.trained_tokens
    assert job.model_extra["metrics"]["method"] == ("warp" if method == "warp" else "full")
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.status == "succeeded" and again.id == job.id


@pytest.mark.parametrize("method", ["warp", "supervised"])
def test_metrics_events_carry_train_and_validation_loss(client, finished_jobs, method):
    job = finished_jobs[method]
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))  # paged by `after`
    assert len({e.id for e in events}) == len(events)
    assert all(e.object == "fine_tuning.job.event" for e in events)
    assert events[0].message == "the job succeeded", "newest first"
    metrics = [e for e in events if e.type == "metrics"]
    steps = [e.data["step"] for e in reversed(metrics)]
    assert steps and steps == sorted(set(steps)), "one metrics event per optimizer step"
    assert all(e.data["train_loss"] is not None for e in metrics)
    assert any(e.data.get("valid_loss") is not None for e in metrics)


@pytest.mark.parametrize("method", ["warp", "supervised"])
def test_checkpoints_and_the_result_file(client, finished_jobs, method):
    job = finished_jobs[method]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) == 3, "two intermediate models (n_checkpoints) and the final one"
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model, "newest first"
    assert [c.step_number for c in checkpoints] == sorted(
        (c.step_number for c in checkpoints), reverse=True
    )
    for checkpoint in checkpoints:
        assert checkpoint.object == "fine_tuning.job.checkpoint"
        assert checkpoint.fine_tuning_job_id == job.id
        assert checkpoint.metrics.step == checkpoint.step_number
        assert checkpoint.metrics.train_loss is not None
    for checkpoint in checkpoints[1:]:
        assert checkpoint.fine_tuned_model_checkpoint.startswith(f"job:{job.id}/models/step-")
    paged = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1, after=checkpoints[0].id)
    assert [c.id for c in paged.data] == [checkpoints[1].id]

    (result,) = job.result_files
    assert client.files.retrieve(result).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(client.files.content(result).text)))
    assert rows and {"step", "train_loss", "valid_loss"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))


def test_a_checkpoint_is_the_model_of_a_new_job(client, finished_jobs, uploads, tiny_job):
    checkpoint = client.fine_tuning.jobs.checkpoints.list(finished_jobs["warp"].id).data[-1]
    job = client.fine_tuning.jobs.create(
        model=checkpoint.fine_tuned_model_checkpoint,
        training_file=uploads["valid"],
        hyperparameters={"n_epochs": 1, "batch_size": 8},
    )
    job = wait_status(client, job.id, DONE)
    assert job.status == "succeeded", job.error
    assert job.model == checkpoint.fine_tuned_model_checkpoint


def test_jobs_page_by_after(client, finished_jobs):
    first = client.fine_tuning.jobs.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    second = client.fine_tuning.jobs.list(limit=1, after=first.data[0].id)
    assert second.data[0].id != first.data[0].id
    listed = {job.id for job in client.fine_tuning.jobs.list(limit=2)}
    assert {job.id for job in finished_jobs.values()} <= listed
    (warp,) = client.fine_tuning.jobs.list(metadata={"test": "warp"}).data
    assert warp.id == finished_jobs["warp"].id


def test_cancel_a_job_and_a_finished_one_is_a_conflict_not_retried(
    client, finished_jobs, tiny_job, uploads
):
    job = create(client, tiny_job, uploads, "supervised")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("cancelled", "running")
    assert wait_status(client, job.id, DONE).status == "cancelled"
    with pytest.raises(openai.ConflictError) as refused:
        client.fine_tuning.jobs.cancel(finished_jobs["supervised"].id)
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert refused.value.body["code"] == "job_finished"


def test_a_paused_job_resumes_to_the_weights_of_an_uninterrupted_one(client, tiny_job, uploads):
    """32 optimizer steps: paused once training is under way, resumed from its checkpoint."""

    def long_job():
        return client.fine_tuning.jobs.create(
            model=tiny_job["base_model"],
            training_file=uploads["long"],
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8, **TINY}},
            },
        )

    reference = wait_status(client, long_job().id, DONE)
    assert reference.status == "succeeded", reference.error

    job = long_job()
    deadline = time.monotonic() + 300
    while client.fine_tuning.jobs.retrieve(job.id).model_extra["progress"]["step"] < 4:
        assert time.monotonic() < deadline, "training never got under way"
        time.sleep(0.2)
    pausing = client.fine_tuning.jobs.pause(job.id)
    assert pausing.status in ("running", "paused")
    paused = wait_status(client, job.id, {"paused", *DONE})
    assert paused.status == "paused" and paused.model_extra["service_status"] == "paused"
    step = paused.model_extra["progress"]["step"]
    assert step < paused.model_extra["progress"]["total_steps"], "paused before the end"
    time.sleep(1.0)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused", "stays paused"

    assert client.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    resumed = wait_status(client, job.id, DONE)
    assert resumed.status == "succeeded", resumed.error
    assert resumed.model_extra["attempt"] >= 2
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("the job is paused") for m in messages)
    assert model_sha256(resumed) == model_sha256(reference)


def test_a_failed_job_keeps_its_labels_and_says_why(client, uploads, tmp_path):
    """A model that is not there: the worker's preflight fails the job before it loads
    anything (no tracker is started), and the job and its events say why."""
    job = client.fine_tuning.jobs.create(
        model=str(tmp_path / "no-model"),
        training_file=uploads["train"],
        seed=7,
        suffix="labels",
        metadata={"k": "v"},
        integrations=[{"type": "wandb", "wandb": {"project": "p", "tags": ["t"]}}],
    )
    assert (job.seed, job.suffix, job.metadata) == (7, "labels", {"k": "v"})
    assert job.integrations[0].type == "wandb" and job.integrations[0].wandb.project == "p"
    failed = wait_status(client, job.id, DONE)
    assert failed.status == "failed" and failed.error.code == "invalid_job"
    assert "no-model" in failed.error.message and failed.fine_tuned_model is None
    (last,) = client.fine_tuning.jobs.list_events(job.id, limit=1).data
    assert last.level == "error" and last.message.startswith("the job failed")
