"""What a job leaves beside its final model: step metrics (`metrics` events, results.csv,
TensorBoard), validation losses, intermediate models (`models/step-N/`, checkpoints.json,
`checkpoint` events) and the model card in every exported model; and that a job stopped or
killed mid-training resumes to exactly the outputs of an uninterrupted one."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import encoded_batches, make_spec, utility_ref
from warp_core.card import DATA_ROLES, figure
from warp_core.comparison import METRICS
from warp_core.events import Cancelled
from warp_core.loss import mean_response_loss
from warp_core.pipeline import Pipeline, export_steps
from warp_core.testing import xstest_slices
from warp_core.tracking import RESULTS_COLUMNS

STEPS = 6
NO_EVAL = {"enabled": False}
SMALL_EVAL = {
    "limit": 4,
    "max_new_tokens": 4,
    "utility_max_new_tokens": 4,
    "attacks": ["prefix_injection", "evil_confidant"],
    **xstest_slices(4),
}
VALIDATION = utility_ref(limit=8, offset=100)


def outputs_spec(model_dir: Path):
    """Six steps, validation every 3, intermediate models after steps 2 and 4, training
    checkpoints only where models are exported (and at the end or a stop)."""
    spec = make_spec(
        model_dir,
        max_steps=STEPS,
        n_checkpoints=2,
        eval_every=3,
        checkpoint_every=50,
        eval=SMALL_EVAL,
    )
    return spec.model_validate({**spec.model_dump(mode="json"), "validation_data": VALIDATION})


@pytest.fixture(scope="module")
def job(model_dir, tmp_path_factory):
    """One uninterrupted job: its pipeline, events and output directory."""
    events = []
    pipeline = Pipeline(outputs_spec(model_dir), tmp_path_factory.mktemp("job"), events.append)
    pipeline.run()
    return pipeline, events, pipeline.out


def results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as file:
        return list(csv.DictReader(file))


def read(path: Path):
    return json.loads(path.read_text())


def test_intermediate_models_are_evenly_spaced():
    assert export_steps(6, 2) == [2, 4]
    assert export_steps(150, 3) == [37, 75, 112]
    assert export_steps(3, 5) == [1, 2]  # at most one per step, never the final one
    assert export_steps(10, 0) == []


def test_every_step_reports_its_metrics_and_validation_when_due(job):
    _, events, out = job
    metrics = [e for e in events if e.kind == "metrics"]
    assert [m.data["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m.phase == "finetune" and m.data["total_steps"] == STEPS for m in metrics)
    required = {"step", "total_steps", "train_loss", "learning_rate", "grad_norm", "tokens"}
    assert all(required <= set(m.data) for m in metrics)
    # every eval_every (3), at each exported model (2, 4) and at the last step (6)
    assert [m.data["step"] for m in metrics if "valid_loss" in m.data] == [2, 3, 4, 6]
    rows = results(out)
    assert list(rows[0]) == list(RESULTS_COLUMNS)
    for row, event in zip(rows, metrics, strict=True):
        assert int(row["step"]) == event.data["step"]
        for column in ("train_loss", "learning_rate", "grad_norm"):
            assert float(row[column]) == event.data[column]  # written exactly
        assert int(row["tokens"]) == event.data["tokens"]
        assert (float(row["valid_loss"]) if row["valid_loss"] else None) == event.data.get(
            "valid_loss"
        )
    training = read(out / "training.json")
    assert training == read(out / "metrics.json")["training"]
    assert training["steps"] == training["total_steps"] == STEPS
    assert training["trained_tokens"] == sum(int(row["tokens"]) for row in rows)
    assert training["train_loss"] == float(rows[-1]["train_loss"])
    assert training["valid_loss"] == float(rows[-1]["valid_loss"])


def test_the_validation_loss_is_that_of_the_model_exported_at_its_step(job, tokenizer):
    _, _, out = job
    batches = encoded_batches(tokenizer, VALIDATION, batch_size=4)
    for entry in read(out / "checkpoints.json"):
        model = AutoModelForCausalLM.from_pretrained(out / entry["path"])
        measured = mean_response_loss(model, batches)
        assert measured == pytest.approx(entry["metrics"]["valid_loss"], rel=1e-5), entry


def test_tensorboard_shows_the_same_figures(job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out = job
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    rows = results(out)
    for tag, column in (("train/loss", "train_loss"), ("train/grad_norm", "grad_norm")):
        points = board.Scalars(tag)
        assert [p.step for p in points] == list(range(1, STEPS + 1))
        assert [p.value for p in points] == pytest.approx([float(r[column]) for r in rows])
    valid = {p.step: p.value for p in board.Scalars("valid/loss")}
    assert valid == pytest.approx(
        {int(r["step"]): float(r["valid_loss"]) for r in rows if r["valid_loss"]}
    )
    after = read(out / "metrics.json")["after"]
    assert board.Scalars("after/utility_loss")[0].value == pytest.approx(after["utility_loss"])


def test_intermediate_models_are_listed_announced_and_keep_the_invariant(job, model_dir):
    _, events, out = job
    entries = read(out / "checkpoints.json")
    assert [(e["step"], e["path"]) for e in entries] == [
        (2, "models/step-00000002"),
        (4, "models/step-00000004"),
        (STEPS, "model"),
    ]
    announced = [e.data for e in events if e.kind == "checkpoint"]
    assert announced == entries
    rows = {int(r["step"]): r for r in results(out)}
    for entry in entries:
        assert entry["metrics"]["train_loss"] == float(rows[entry["step"]]["train_loss"])
    assert sorted(p.name for p in (out / "models").iterdir()) == ["step-00000002", "step-00000004"]
    # WaRP's invariant, numerically, for each model (WARP.md): (W - W0) U is zero where
    # frozen, and training moved the others.
    for entry in entries:
        assert_frozen_coefficients_unmoved(out, entry["path"], model_dir)
    targets = read(out / "warp" / "targets.json")
    first, second, final = [load_file(out / e["path"] / "model.safetensors") for e in entries]
    assert any(not torch.equal(first[n], second[n]) for n in targets)
    assert any(not torch.equal(second[n], final[n]) for n in targets)


def assert_frozen_coefficients_unmoved(out: Path, model: str, base_dir: Path) -> None:
    """|(W - W0) U| of an exported model is zero (to float rounding) on every target's frozen
    coefficients, and not on all of the others."""
    base = load_file(base_dir / "model.safetensors")
    weights = load_file(out / model / "model.safetensors")
    bases = load_file(out / "warp" / "basis.safetensors")
    masks = load_file(out / "warp" / "masks.safetensors")
    for name, entry in read(out / "warp" / "targets.json").items():
        change = (weights[name].double() - base[name].double()) @ bases[entry["basis"]].double()
        assert change[masks[name]].abs().max() <= 1e-6 * change.abs().max(), (model, name)
        assert change[~masks[name]].abs().max() > 0, (model, name)


# -- the model card --------------------------------------------------------------------------


def parse_card(text: str) -> tuple[dict, dict[str, list[list[str]]]]:
    """(YAML front matter, {section title: table rows as cells}) of a model card."""
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    tables: dict[str, list[list[str]]] = {}
    for section in re.split(r"^## ", body, flags=re.M)[1:]:
        title, _, rest = section.partition("\n")
        lines = [line for line in rest.splitlines() if line.startswith("| ")]
        tables[title] = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    return yaml.safe_load(front), tables


def cell_of(rows: list[list[str]], label: str) -> str:
    (value,) = [row[1] for row in rows if row[0] == label]
    return value


def same(cell: str, value: float | int) -> bool:
    """The card writes `figure(value)`, which reads back as the value to its 4 digits."""
    return cell == figure(value) and float(cell) == pytest.approx(value, rel=5e-4)


def test_the_final_model_card_states_what_ran_and_what_was_measured(job):
    pipeline, _, out = job
    metrics, spec = read(out / "metrics.json"), read(out / "spec.json")
    text = (out / "model" / "README.md").read_text()
    front, tables = parse_card(text)
    assert front["base_model"] == spec["base_model"]
    assert front["datasets"] == ["do-not-answer.csv", "gsm8k.jsonl"]
    assert {"warp", "safety"} <= set(front["tags"]) and front["library_name"] == "transformers"
    assert metrics["run_id"] == read(out / "state.json")["run_id"] == pipeline.run_id
    assert f"run `{metrics['run_id']}`" in text
    method = tables["Method"]
    training, hp = metrics["training"], spec["hyperparameters"]
    assert same(cell_of(method, "optimizer steps"), training["steps"])
    assert same(cell_of(method, "tokens trained"), training["trained_tokens"])
    assert same(cell_of(method, "training examples"), training["examples"])
    assert same(cell_of(method, "training loss, last step"), training["train_loss"])
    assert same(cell_of(method, "validation loss, last step"), training["valid_loss"])
    assert same(cell_of(method, "processes"), metrics["world_size"])
    keep = "keep ratio (share of each target's rotated coefficients frozen)"
    assert same(cell_of(method, keep), hp["keep_ratio"])
    assert cell_of(method, "mask") == "importance, module scope"
    assert cell_of(method, "learning rate").startswith(f"{figure(hp['learning_rate'])}, ")
    assert cell_of(method, "protected targets").count("`") == 2 * len(hp["target_modules"])
    evaluation = tables["Evaluation"]
    names = {f"{name} ({hint})": key for key, name, hint in METRICS}
    assert {names[row[0]] for row in evaluation} == set(metrics["after"])
    for label, before, after in evaluation:
        assert same(before, metrics["before"][names[label]]), label
        assert same(after, metrics["after"][names[label]]), label
    under_attack = {"refusal_rate_under_prefix_injection", "refusal_rate_under_evil_confidant"}
    assert under_attack | {"worst_attack_refusal_rate"} <= set(metrics["after"])
    judge = metrics["refusal_judge"]
    assert judge["name"] == "ngram" and judge["description"] == metrics["refusal_rule"]
    assert set(judge["rates"]) == set(metrics["after"]) - {"utility_loss", "gsm8k_accuracy"}
    assert f"judged (judge `ngram`):\n\n> {metrics['refusal_rule']}" in text
    data = tables["Data"]
    assert len(data) == len(metrics["data"]) == 7  # safety, utility, validation, 4 eval sets
    records = [metrics["data"][where] for where, _ in DATA_ROLES if where in metrics["data"]]
    for (_, source, offset, rows, digest), record in zip(data, records, strict=True):
        local = Path(record["source"])
        assert source == f"`{local.name}`" and same(offset, record["offset"])
        assert same(rows, record["rows"])
        assert digest == f"`{hashlib.sha256(local.read_bytes()).hexdigest()}`"


def test_the_report_shows_every_attack_with_its_source_and_the_worst_case(job):
    _, _, out = job
    metrics, report = read(out / "metrics.json"), (out / "report.md").read_text()
    header = report.splitlines()[2]
    for column in ("worst attack", "prefix injection", "evil confidant"):
        assert f"refusal (harmful, {column}) (higher keeps safety)" in header
    row = next(line for line in report.splitlines() if line.startswith("| warp |"))
    worst = [metrics[when]["worst_attack_refusal_rate"] for when in ("before", "after")]
    assert f"{worst[0]:.3f} -> {worst[1]:.3f}" in row
    assert "- `prefix_injection`: Wei et al. 2023, Jailbroken (arXiv:2307.02483)" in report
    assert "- `evil_confidant`: " in report
    samples = read(out / "eval" / "after.json")["samples"]
    assert len(samples["attack:evil_confidant"]) == len(samples["harmful"]) == 4


def test_an_intermediate_model_card_has_its_steps_figures(job):
    _, _, out = job
    rows = results(out)
    for entry in read(out / "checkpoints.json")[:-1]:
        text = (out / entry["path"] / "README.md").read_text()
        _, tables = parse_card(text)
        method = tables["Method"]
        step = entry["step"]
        assert f"state after {step} of {STEPS} optimizer steps" in text
        assert same(cell_of(method, "optimizer steps"), step)
        done = [r for r in rows if int(r["step"]) <= step]
        assert same(cell_of(method, "tokens trained"), sum(int(r["tokens"]) for r in done))
        assert same(cell_of(method, "training loss, last step"), entry["metrics"]["train_loss"])
        assert same(cell_of(method, "validation loss, last step"), entry["metrics"]["valid_loss"])
        assert "was not evaluated" in text and tables["Evaluation"] == []


# -- stopped and killed --------------------------------------------------------------------


def test_a_stopped_then_killed_job_resumes_to_the_outputs_of_an_uninterrupted_one(
    job, model_dir, tmp_path
):
    """A stop saves the last completed step (no step lost); a kill right after a model's
    export, before its training checkpoint, leaves the model to be exported again from the
    same state. Each model ends there once, bit for bit the uninterrupted job's."""
    spec = job[0].spec
    out = tmp_path / "interrupted"
    events = []

    def stop() -> bool:
        return any(e.kind == "metrics" and e.data["step"] == 3 for e in events)

    with pytest.raises(Cancelled):
        Pipeline(spec, out, events.append, should_stop=stop).run()
    latest = read(out / "checkpoints" / "finetune" / "latest.json")
    assert latest["step"] == 3, "saved at the stop, though no checkpoint was due at step 3"
    assert len(results(out)) == 3

    def killed(event) -> None:
        if event.kind == "checkpoint" and event.data["step"] == 4:
            raise RuntimeError("killed")  # after models/step-4 is written, before its checkpoint

    with pytest.raises(RuntimeError, match="killed"):
        Pipeline(spec, out, killed).run()
    assert read(out / "checkpoints" / "finetune" / "latest.json")["step"] == 3
    assert (out / "models" / "step-00000004").exists() and len(results(out)) == 4

    resumed = []
    Pipeline(spec, out, resumed.append).run()
    assert [e.data["step"] for e in resumed if e.kind == "metrics"] == [4, 5, 6]
    whole = job[2]
    assert (out / "results.csv").read_text() == (whole / "results.csv").read_text()
    assert read(out / "checkpoints.json") == read(whole / "checkpoints.json")
    for entry in read(whole / "checkpoints.json"):
        ours = load_file(out / entry["path"] / "model.safetensors")
        for name, value in load_file(whole / entry["path"] / "model.safetensors").items():
            assert torch.equal(ours[name], value), (entry["path"], name)
    assert read(out / "training.json") == read(whole / "training.json")
    assert read(out / "eval" / "after.json") == read(whole / "eval" / "after.json")


# -- two processes ---------------------------------------------------------------------------


def warp_run(spec, out: Path, *options: str, stop_at_step: int | None = None) -> int:
    """`warp run SPEC --out OUT --nproc-per-node 2 OPTIONS`; SIGTERM once rank 0 has reported
    the metrics of `stop_at_step`. Returns the exit code."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{out.name}-spec.json"
    spec_path.write_text(spec.model_dump_json())
    events = out.parent / f"{out.name}-events.jsonl"
    command = [sys.executable, "-m", "warp_core", "run", str(spec_path), "--out", str(out)]
    command += ["--nproc-per-node", "2", "--events", str(events), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while stop_at_step is not None and job.poll() is None:
        if any(step >= stop_at_step for step in metric_steps(events)):
            job.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode in (0, 130), stderr.decode()[-3000:]
    return job.returncode


def metric_steps(events: Path) -> list[int]:
    if not events.exists():
        return []
    records = [json.loads(line) for line in events.read_text().splitlines()]
    return [r["data"]["step"] for r in records if r.get("kind") == "metrics"]


@pytest.mark.slow
def test_two_processes_write_the_same_outputs_and_lose_no_step_when_stopped(
    job, model_dir, tmp_path
):
    """Validation and export gather across the ranks, rank 0 alone writes; a stop keeps
    every completed step; the outputs match one process's to float rounding."""
    spec = job[0].spec.model_copy(update={"eval": job[0].spec.eval.model_copy(update=NO_EVAL)})
    out = tmp_path / "two"
    assert warp_run(spec, out, "--run-id", "job-42", stop_at_step=3) == 130
    saved = read(out / "checkpoints" / "finetune" / "latest.json")["step"]
    assert saved >= 3 and [int(r["step"]) for r in results(out)] == list(range(1, saved + 1))
    assert warp_run(spec, out, "--run-id", "job-42") == 0
    assert read(out / "metrics.json")["run_id"] == "job-42"
    assert "run `job-42`" in (out / "models" / "step-00000002" / "README.md").read_text()
    ours, one = results(out), results(job[2])
    assert [r["step"] for r in ours] == [r["step"] for r in one]
    for mine, theirs in zip(ours, one, strict=True):
        assert mine["tokens"] == theirs["tokens"]
        for column in ("train_loss", "valid_loss"):
            if theirs[column]:
                assert float(mine[column]) == pytest.approx(float(theirs[column]), rel=1e-4)
            else:
                assert mine[column] == ""
    entries = read(out / "checkpoints.json")
    assert [e["path"] for e in entries] == [e["path"] for e in read(job[2] / "checkpoints.json")]
    for entry in entries:
        assert_frozen_coefficients_unmoved(out, entry["path"], model_dir)
