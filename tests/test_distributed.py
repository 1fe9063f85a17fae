"""A job in two processes (torchrun, gloo on the CPU, the model sharded by FSDP2) learns what
one process learns, keeps the exact frozen-coefficient invariant, and resumes from its sharded
checkpoint with the same or another number of processes.

Each phase is compared with one process where it is deterministic: Phase 1's moments (through
`U diag(lambda) U^T`; the bases themselves may turn within near-equal eigenvalues), and, from
the same bases, Phase 2's masks and Phase 3's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_spec
from warp_core.pipeline import Cancelled, Pipeline

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def spec(model_dir):
    return make_spec(model_dir, max_steps=STEPS, checkpoint_every=2)


@pytest.fixture(scope="module")
def alone(spec, tmp_path_factory) -> Path:
    """The job run by one process."""
    out = tmp_path_factory.mktemp("alone")
    Pipeline(spec, out).run()
    return out


def launch(spec, out: Path, processes: int = 2, stop_at_step: int | None = None) -> int:
    """`warp run` in `processes` processes; SIGTERM once rank 0 reports `stop_at_step`."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{out.name}-spec.json"
    spec_path.write_text(spec.model_dump_json())
    events = out.parent / f"{out.name}-events.jsonl"
    command = [sys.executable, "-m", "warp_core", "run", str(spec_path), "--out", str(out)]
    command += ["--nproc-per-node", str(processes), "--events", str(events)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while stop_at_step is not None and job.poll() is None:
        if finetune_steps(events) and max(finetune_steps(events)) >= stop_at_step:
            job.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, stderr = job.communicate(timeout=600)
    if stop_at_step is None:
        assert job.returncode == 0, stderr.decode()[-3000:]
    return job.returncode


def finetune_steps(events: Path) -> list[int]:
    if not events.exists():
        return []
    records = [json.loads(line) for line in events.read_text().splitlines()]
    return [
        r["data"]["step"] for r in records if r["kind"] == "progress" and r["phase"] == "finetune"
    ]


def with_bases_of(source: Path, out: Path) -> Path:
    """An output directory whose Phase 1 is `source`'s: the following phases then start from
    the very same bases."""
    (out / "warp").mkdir(parents=True)
    for name in ("basis.safetensors", "eigenvalues.safetensors", "basis_of.json", "spectrum.json"):
        shutil.copy(source / "warp" / name, out / "warp" / name)
    shutil.copy(source / "spec.json", out / "spec.json")
    state = {"completed": ["basis"], "timings": {"basis": 0.0}, "memory": {"basis": None}}
    (out / "state.json").write_text(json.dumps(state))
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def base_weights(out: Path) -> dict[str, torch.Tensor]:
    base_model = Path(json.loads((out / "spec.json").read_text())["base_model"])
    return load_file(base_model / "model.safetensors")


def assert_same_training(actual: Path, expected: Path) -> None:
    """Same masks; weights equal up to what float rounding makes of a few Adam steps (far
    less than what training moved them)."""
    masks, expected_masks = (
        load_file(o / "warp" / "masks.safetensors") for o in (actual, expected)
    )
    for name, mask in expected_masks.items():
        assert torch.equal(masks[name], mask), name
    base = load_file(
        Path(json.loads((expected / "spec.json").read_text())["base_model"]) / "model.safetensors"
    )
    got, want = weights(actual), weights(expected)
    for name, value in want.items():
        moved = (value - base[name]).abs().max()
        assert (got[name] - value).abs().max() <= 1e-2 * moved + 1e-7, name


def assert_frozen_coefficients_unmoved(out: Path) -> None:
    base = load_file(
        Path(json.loads((out / "spec.json").read_text())["base_model"]) / "model.safetensors"
    )
    final, bases = weights(out), load_file(out / "warp" / "basis.safetensors")
    masks = load_file(out / "warp" / "masks.safetensors")
    for name, entry in json.loads((out / "warp" / "targets.json").read_text()).items():
        change = (final[name].double() - base[name].double()) @ bases[entry["basis"]].double()
        assert change[masks[name]].abs().max() <= 1e-6 * change.abs().max(), name


def test_two_processes_reduce_the_moments_and_keep_the_invariant(spec, alone, tmp_path):
    out = tmp_path / "two"
    launch(spec, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert all(metrics["memory"][phase] > 0 for phase in ("basis", "importance", "finetune"))
    for which in (alone, out):
        assert json.loads((which / "training.json").read_text())["steps"] == STEPS
    ours, theirs = (load_file(o / "warp" / "basis.safetensors") for o in (out, alone))
    values = [load_file(o / "warp" / "eigenvalues.safetensors") for o in (out, alone)]
    for key, basis in theirs.items():
        moment = basis @ torch.diag(values[1][key]) @ basis.T
        ours_moment = ours[key] @ torch.diag(values[0][key]) @ ours[key].T
        assert (ours_moment - moment).abs().max() <= 1e-5 * moment.abs().max(), key
    assert_frozen_coefficients_unmoved(out)


def test_from_the_same_bases_two_processes_train_as_one(spec, alone, tmp_path):
    out = with_bases_of(alone, tmp_path / "two")
    launch(spec, out)
    assert_same_training(out, alone)
    assert_frozen_coefficients_unmoved(out)


def test_a_two_process_job_resumes_on_one_process(spec, alone, tmp_path):
    out = with_bases_of(alone, tmp_path / "two-then-one")
    assert launch(spec, out, stop_at_step=3) == 130
    assert (out / "checkpoints" / "finetune" / "latest.json").exists()
    assert not (out / "model").exists()
    Pipeline(spec, out).run()
    assert_same_training(out, alone)


def test_a_one_process_job_resumes_on_two_processes(spec, alone, tmp_path):
    out = with_bases_of(alone, tmp_path / "one-then-two")
    events = []

    def stop() -> bool:
        return any(e.phase == "finetune" and e.data.get("step", 0) >= 3 for e in events)

    with pytest.raises(Cancelled):
        Pipeline(spec, out, on_event=events.append, should_stop=stop).run()
    launch(spec, out)
    assert_same_training(out, alone)


def test_resuming_on_as_many_processes_gives_the_weights_bit_for_bit(model_dir, tmp_path):
    """Stopped in Phase 3 (exit 130), the job resumes there and evaluates: the first forward
    after the restart is the training loss's, not the model's own."""
    small_eval = {"limit": 4, "max_new_tokens": 4, "utility_max_new_tokens": 4}
    spec = make_spec(model_dir, max_steps=STEPS, checkpoint_every=2, eval=small_eval)
    whole = tmp_path / "whole"
    launch(spec, whole)
    resumed = tmp_path / "resumed"
    assert launch(spec, resumed, stop_at_step=3) == 130
    launch(spec, resumed)
    for name, value in weights(whole).items():
        assert torch.equal(weights(resumed)[name], value), name
    after = [
        json.loads((o / "eval" / "after.json").read_text())["metrics"] for o in (whole, resumed)
    ]
    assert after[0] == after[1]


def test_a_sharded_head_computes_its_loss_a_chunk_at_a_time(tmp_path):
    """FSDP2 gathers the head once per chunk and the chunks' gradients add up to the whole's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "tests.fsdp_loss_check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["chunked"] == pytest.approx(result["whole"], rel=1e-6)
    assert result["gradient_difference"] < 1e-5
