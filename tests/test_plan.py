"""The memory planner (`warp_core.plan`): it reads a config alone, groups targets as Phase 1
does, grows and shrinks with what it should, its options lower it, and it lands near what a
real job measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from typer.testing import CliRunner

from tests.helpers import REPO, encoded_batches, make_spec, safety_ref
from warp_core.basis import group_by_input
from warp_core.cli import app
from warp_core.memory import resident_bytes
from warp_core.model import find_targets, load_model
from warp_core.plan import (
    GPU_SIZES_GIB,
    Change,
    PhasePlan,
    apply,
    plan,
    read_shape,
    usable_bytes,
    ways_to_fit,
)
from warp_core.spec import JobSpec
from warp_core.testing import llama_2_7b_config, save_checkpoint, tiny_llama

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> Path:
    """A directory holding nothing but a Llama config.json (hidden 256, 4 layers)."""
    directory = tmp_path_factory.mktemp("config-only")
    LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ).save_pretrained(directory)
    assert [p.name for p in directory.iterdir()] == ["config.json"]
    return directory


def moment(phase: PhasePlan, name: str) -> int:
    """Bytes of the phase's moment `name`."""
    return next(m.bytes for m in phase.moments if m.name == name)


def finetune_added(spec: JobSpec, processes: int = 1, device: str = "cpu") -> int:
    shape = read_shape(spec.base_model, spec.hyperparameters.target_modules)
    return plan(spec, shape, processes, device).phases[-1].added


def test_a_directory_holding_only_a_config_is_planned(config_only):
    spec = make_spec(config_only)
    shape = read_shape(str(config_only), spec.hyperparameters.target_modules)
    assert len(shape.targets) == 4 * 7 + 1  # seven projections a layer, and lm_head
    assert sorted(shape.bases.values()) == sorted([256] * (3 * 4 + 1) + [704] * 4)
    assert shape.tied_head is not None
    predicted = plan(spec, shape, device="cuda")
    assert [phase.name for phase in predicted.phases] == ["basis", "importance", "finetune"]
    parameters = sum(w.numel for w in shape.weights)
    head = shape.tied_head.numel
    assert predicted.phases[0].resident == 2 * (parameters + head)  # bf16, lm_head untied
    full = plan(apply(spec, [Change("", {"method": "full"})]), shape, device="cuda")
    assert [phase.name for phase in full.phases] == ["finetune"]


def test_targets_share_bases_as_phase_1_groups_them(model_dir, tokenizer):
    spec = make_spec(model_dir)
    shape = read_shape(str(model_dir), spec.hyperparameters.target_modules)
    model = load_model(str(model_dir), torch.float32, torch.device("cpu"))[0]
    targets = find_targets(model, spec.hyperparameters.target_modules)
    batch = encoded_batches(tokenizer, safety_ref(limit=2), batch_size=2)[0]
    groups = group_by_input(model, targets, batch)
    assert shape.bases == {key: m[0].module.in_features for key, m in groups.items()}
    assert {t.name: t.basis for t in shape.targets} == {
        t.param_name: key for key, members in groups.items() for t in members
    }


@pytest.mark.parametrize("setting", [{"batch_size": 8}, {"max_length": 320}])
def test_phase_3_grows_with_the_tokens_of_a_micro_batch(config_only, setting):
    base = make_spec(config_only, batch_size=4, max_length=160)
    changed = apply(base, [Change("", {f"hyperparameters.{k}": v for k, v in setting.items()})])
    assert finetune_added(changed) > finetune_added(base)


def test_phases_1_and_2_grow_with_their_batches(config_only):
    shape = read_shape(str(config_only), make_spec(config_only).hyperparameters.target_modules)
    small = plan(make_spec(config_only, importance_batch_size=1, basis_batch_size=64), shape)
    large = plan(make_spec(config_only, importance_batch_size=8, basis_batch_size=256), shape)
    assert large.phases[1].added > small.phases[1].added
    assert moment(large.phases[0], "statistics") > moment(small.phases[0], "statistics")


def test_more_processes_hold_less_state_each(config_only):
    spec = make_spec(config_only, batch_size=8)
    shape = read_shape(str(config_only), spec.hyperparameters.target_modules)
    one, two = plan(spec, shape, 1, "cuda"), plan(spec, shape, 2, "cuda")
    assert two.phases[-1].resident == pytest.approx(one.phases[-1].resident / 2, rel=0.01)
    terms = [
        {t.name: t.bytes for m in p.phases[-1].moments if m.name == "backward" for t in m.terms}
        for p in (one, two)
    ]
    for name in ("trained state", "adam moments", "base weights", "weight gradients"):
        assert terms[1][name] == pytest.approx(terms[0][name] / 2, rel=0.01)
    assert terms[1]["basis rows"] < terms[0]["bases"]
    assert two.phases[-1].peak < one.phases[-1].peak
    # Phases 1 and 2 hold whole moments, bases and scores on every process.
    assert two.phases[1].added >= one.phases[1].added


@pytest.mark.parametrize(
    "option, lowered",
    [
        ({"gradient_checkpointing": True}, "backward"),
        ({"keep_rotated_gradients": False}, "optimizer step"),
        ({"optimizer_state_dtype": "bfloat16"}, "backward"),
        ({"offload": ["base_weights"]}, "backward"),
        ({"offload": ["optimizer_state"]}, "backward"),
        ({"batch_size": 2, "grad_accum_steps": 4}, "backward"),
    ],
)
def test_each_option_lowers_what_it_acts_on_and_never_raises_the_peak(config_only, option, lowered):
    spec = make_spec(config_only, gradient_checkpointing=False, keep_rotated_gradients=True)
    shape = read_shape(str(config_only), spec.hyperparameters.target_modules)
    before = plan(spec, shape, device="cuda")
    change = Change("", {f"hyperparameters.{key}": value for key, value in option.items()})
    after = plan(apply(spec, [change]), shape, device="cuda")
    assert moment(after.phases[-1], lowered) < moment(before.phases[-1], lowered)
    assert after.peak <= before.peak


def test_ways_to_fit_name_the_fewest_options_that_fit(config_only):
    spec = make_spec(config_only, gradient_checkpointing=False, keep_rotated_gradients=True)
    shape = read_shape(str(config_only), spec.hyperparameters.target_modules)
    peak = plan(spec, shape).peak
    capacity = int(peak * 0.7)
    changes, fitted = ways_to_fit(spec, shape, lambda _n: capacity, [2, 4])
    assert fitted.peak <= capacity < peak
    for dropped in changes:
        rest = [change for change in changes if change is not dropped]
        assert plan(apply(spec, rest), shape).peak > capacity, f"{dropped.label} is not needed"
    assert ways_to_fit(spec, shape, lambda _n: usable_bytes(0.001), [2]) is None


@pytest.mark.skipif(resident_bytes() is None, reason="needs Linux /proc")
def test_a_measured_bf16_job_lands_within_a_fifth_of_the_plan(tokenizer, tmp_path):
    """A real `warp run` in a process of its own, its Phase 3 figure from metrics.json: the
    rise of peak RSS, with glibc returning freed blocks at once so that RSS follows the live
    tensors as CUDA's `max_memory_allocated` does (`bench/plan_accuracy.py`)."""
    model = save_checkpoint(tiny_llama(tokenizer, hidden_size=512), tokenizer, tmp_path / "m")
    spec = make_spec(
        model,
        method="full",
        dtype="bfloat16",
        target_modules=PROJECTIONS,
        max_steps=2,
        batch_size=8,
        grad_accum_steps=2,
        max_length=128,
        checkpoint_every=1000,
    )
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "warp_core", "run", str(tmp_path / "spec.json")]
    command += ["--out", str(tmp_path / "out"), "--json"]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    measured = json.loads((tmp_path / "out" / "metrics.json").read_text())["memory"]["finetune"]
    predicted = finetune_added(spec)
    assert 0.8 <= predicted / measured <= 1.2, (predicted, measured)


def test_warp_plan_prints_the_plan_and_the_gpus_it_fits(config_only, tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(make_spec(config_only).model_dump_json())
    runner = CliRunner()
    printed = runner.invoke(app, ["plan", str(spec_path), "--json", "--nproc-per-node", "2"])
    assert printed.exit_code == 0, printed.output
    planned = json.loads(printed.stdout)
    assert planned["processes"] == 2
    assert list(planned["phases"]) == ["basis", "importance", "finetune"]
    assert [gpu["gib"] for gpu in planned["gpus"]] == list(GPU_SIZES_GIB)
    assert all(gpu["fits"] for gpu in planned["gpus"])  # a small model fits any of them
    shown = runner.invoke(app, ["plan", str(spec_path)])
    assert shown.exit_code == 0, shown.output
    assert "fits GPUs of 24, 40, 48, 80, 94, 141, 192 GiB" in " ".join(shown.stdout.split())


def test_warp_plan_names_the_options_for_gpus_a_7b_job_does_not_fit(tmp_path):
    """Llama-2-7B's config alone, the default spec: one 80 GiB GPU takes the optimizer state
    offloaded; GPUs of 48 GiB or less cannot hold Phase 2 at any setting."""
    llama_2_7b_config().save_pretrained(tmp_path / "model")
    spec = {
        "base_model": str(tmp_path / "model"),
        "safety_data": {"source": "LibrAI/do-not-answer", "limit": 800},
        "utility_data": {"source": "openai/gsm8k", "limit": 5000},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    shown = CliRunner().invoke(app, ["plan", str(tmp_path / "spec.json")])
    assert shown.exit_code == 0, shown.output
    lines = {line.split(":")[0].strip(): line for line in shown.stdout.splitlines()}
    assert "offload optimizer_state ->" in lines["80 GiB"]
    assert "no option makes it fit" in lines["48 GiB"]


def test_warp_plan_refuses_an_invalid_spec(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"base_model": "x"}))
    assert CliRunner().invoke(app, ["plan", str(tmp_path / "spec.json")]).exit_code == 2
