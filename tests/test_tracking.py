"""A job's integrations: MLflow against a real `mlflow server` this module starts (a free
local port, a temporary SQLite store), Weights & Biases in its offline mode (no network: the
run files it writes are read back). The job is stopped mid-training and resumed, and logs to
the same runs throughout; a tracker that cannot start costs a warning, not the job."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_spec, utility_ref
from warp_core.events import Cancelled
from warp_core.pipeline import Pipeline
from warp_core.testing import xstest_slices

pytestmark = pytest.mark.slow

STEPS = 4
SMALL_EVAL = {"limit": 4, "max_new_tokens": 4, "utility_max_new_tokens": 4, **xstest_slices(4)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on a free port with a temporary SQLite store and artifact root."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'store.db'}"]
    command += ["--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def tracked(mlflow_server, model_dir, tmp_path_factory):
    """A job logging to MLflow and to W&B (offline), stopped after step 2 and resumed."""
    wandb_dir = tmp_path_factory.mktemp("wandb")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(wandb_dir))
    patch.setenv("WANDB_SILENT", "true")
    spec = make_spec(model_dir, max_steps=STEPS, eval_every=2, eval=SMALL_EVAL)
    spec = spec.model_validate(
        {
            **spec.model_dump(mode="json"),
            "validation_data": utility_ref(limit=8, offset=100),
            "integrations": [
                {"type": "mlflow", "mlflow": {"tracking_uri": mlflow_server, "experiment": "t"}},
                {"type": "wandb", "wandb": {"project": "warp-test", "tags": ["ci"]}},
            ],
        }
    )
    out = tmp_path_factory.mktemp("job")
    events = []

    def stop() -> bool:
        return any(e.kind == "metrics" and e.data["step"] == 2 for e in events)

    try:
        with pytest.raises(Cancelled):
            Pipeline(spec, out, events.append, should_stop=stop).run()
        first_ids = json.loads((out / "tracking.json").read_text())
        Pipeline(spec, out, events.append).run()
    finally:
        patch.undo()
    warnings = [e.data["message"] for e in events if e.data.get("level") == "warning"]
    assert not warnings
    return out, first_ids, wandb_dir, mlflow_server


def test_a_resumed_job_logs_to_the_same_runs(tracked):
    out, first_ids, _, _ = tracked
    assert json.loads((out / "tracking.json").read_text()) == first_ids
    assert set(first_ids) == {"mlflow", "wandb"}


def test_mlflow_holds_the_params_step_metrics_evaluation_and_plot(tracked):
    from mlflow import MlflowClient

    out, ids, _, uri = tracked
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("t")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, resumed, not two
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    metrics = json.loads((out / "metrics.json").read_text())
    params = run.data.params
    assert params["method"] == "warp" and params["run_id"] == metrics["run_id"]
    assert float(params["hyperparameters.learning_rate"]) == 3e-3
    assert params["hyperparameters.max_steps"] == str(STEPS)
    rows = [line.split(",") for line in (out / "results.csv").read_text().splitlines()[1:]]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    by_step = {point.step: point.value for point in history}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert by_step == {int(row[0]): pytest.approx(float(row[1])) for row in rows}
    valid = {p.step: p.value for p in client.get_metric_history(run.info.run_id, "valid/loss")}
    assert valid == {int(row[0]): pytest.approx(float(row[2])) for row in rows if row[2]}
    assert sorted(valid) == [2, 4]
    for which in ("before", "after"):
        for name, value in metrics[which].items():
            assert run.data.metrics[f"{which}/{name}"] == pytest.approx(value), (which, name)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "report.png" in artifacts
    local = client.download_artifacts(run.info.run_id, "report.png", str(out / "downloaded"))
    assert Path(local).read_bytes() == (out / "report.png").read_bytes()


def wandb_records(path: Path) -> Iterator:
    """The records of a W&B run file (`run-ID.wandb`): LevelDB's log format (32 KiB blocks,
    each record a 7-byte header then a chunk) after W&B's own 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_item(item) -> tuple[str, object]:
    """A logged value by its name (`a/b/c` for a nested one: W&B splits media by field)."""
    return item.key or "/".join(item.nested_key), json.loads(item.value_json)


def test_wandb_offline_run_holds_the_step_metrics_and_evaluation(tracked):
    out, ids, wandb_dir, _ = tracked
    runs = sorted((wandb_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(runs) == 2, "the resumed job wrote to the same run id"
    history: dict[int, dict[str, float]] = {}
    summary: dict[str, float] = {}
    config: dict[str, str] = {}
    for run in runs:
        for record in wandb_records(run / f"run-{ids['wandb']}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = dict(map(wandb_item, record.history.item))
                history.setdefault(items["_step"], {}).update(items)
            elif kind == "summary":
                summary.update(map(wandb_item, record.summary.update))
            elif kind == "run":
                config.update(map(wandb_item, record.run.config.update))
    rows = [line.split(",") for line in (out / "results.csv").read_text().splitlines()[1:]]
    for row in rows:
        step = history[int(row[0])]
        assert step["train/loss"] == pytest.approx(float(row[1]))
        assert step["train/learning_rate"] == pytest.approx(float(row[3]))
        assert ("valid/loss" in step) == bool(row[2])
    metrics = json.loads((out / "metrics.json").read_text())
    for which in ("before", "after"):
        for name, value in metrics[which].items():
            assert summary[f"{which}/{name}"] == pytest.approx(value)
    assert config["run_id"] == metrics["run_id"] and config["method"] == "warp"
    assert config["hyperparameters"]["max_steps"] == STEPS
    (image,) = [v for values in history.values() for k, v in values.items() if k.endswith("/path")]
    assert (runs[-1] / "files" / image).read_bytes() == (out / "report.png").read_bytes()


def test_a_tracker_that_cannot_start_costs_a_warning_not_the_job(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    spec = make_spec(model_dir, method="full", max_steps=1)
    unreachable = f"http://127.0.0.1:{free_port()}"
    spec = spec.model_validate(
        {
            **spec.model_dump(mode="json"),
            "integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": unreachable}}],
        }
    )
    events = []
    Pipeline(spec, tmp_path, events.append).run()
    (warning,) = [e.data["message"] for e in events if e.data.get("level") == "warning"]
    assert warning.startswith("mlflow: not logging to it")
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 2
