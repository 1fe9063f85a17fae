"""`warp plan` against real runs: predicted and measured memory per process and phase.

Each configuration is a real job, `python -m warp_core run SPEC --out DIR --json` in a process
of its own (`--nproc-per-node 2`: torchrun, gloo, FSDP2 on the CPU), on a random tiny Llama
(`warp_core.testing`) in bfloat16, which runs on the CPU and holds what a GPU would hold,
evaluation off. The measured figure is `metrics.json`'s `memory`: on the CPU the rise of the
peak RSS over the RSS at the phase's start, the most of any process (`warp_core.memory`);
the predicted one is the plan's `added` for the CPU (`warp_core.plan`), from the saved
config.json alone. Then the plan of Llama-2-7B-chat (its config written to a temporary
directory; no weights) with the default spec and targets on CUDA, in one and two processes,
and what it takes on one 80 GB GPU.

Every configuration runs twice: with glibc's defaults (what a user's job reports) and with
`MALLOC_MMAP_THRESHOLD_=65536`, which makes glibc return every freed block of 64 KiB or more
at once, so that RSS follows the live tensors as CUDA's `max_memory_allocated` does (`LIVE`).

`--calibrate` measures the constants the plan uses, each in a fresh process: the bytes
`basis.eigenbasis` holds per entry of the moment, what a process keeps from its first forward
and backward passes, and what autograd saves in a Phase 3 forward (by storage, through
`saved_tensors_hooks`) against the plan's activation terms.

Run from the repository root: `.venv/bin/python bench/plan_accuracy.py` (about 20 minutes on
2 cores; `--quick` runs one configuration of each method, `--only-7b` only the 7B plan).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from phase_common import PROJECTIONS, emit_result, markdown_table, memory_job, run_child

from warp_core.basis import eigenbasis
from warp_core.loss import response_loss_sum
from warp_core.memory import PeakMemory, release_free_memory, resident_bytes
from warp_core.model import find_targets, set_trainable
from warp_core.plan import GIB, model_shape, plan, read_shape, usable_bytes, ways_to_fit
from warp_core.spec import JobSpec
from warp_core.testing import (
    build_tiny_model,
    example_job,
    llama_2_7b_config,
    tiny_llama,
    tiny_tokenizer,
)

TARGETS = {"projections": PROJECTIONS, "default": None}
"""The two target sets measured: the seven projections (issue 11's measurement) and the
default (the projections and lm_head)."""


def spec_for(
    model_dir: Path, method: str, targets: list[str] | None, ns: argparse.Namespace
) -> dict:
    return memory_job(
        model_dir,
        method,
        steps=ns.steps,
        batch_size=ns.batch_size,
        max_length=ns.max_length,
        targets=targets,
        grad_accum_steps=ns.grad_accum,
    )


MIB = 2**20
HEADERS = [
    "method",
    "targets",
    "processes",
    "phase",
    "measured MiB",
    "freed at once",
    "predicted MiB",
    "/ measured",
    "/ freed at once",
    "peak moment",
]
LIVE = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc returns every freed block of 64 KiB or more at once: RSS then follows the live
tensors, which is what CUDA's `max_memory_allocated` counts. By default glibc keeps freed
blocks below its dynamic mmap threshold (up to 32 MiB) in its heap, where a later, larger
request cannot always reuse them: a tiny model's tensors all fall below it."""


def measure(spec: dict, work: Path, processes: int, env: dict[str, str]) -> dict[str, int]:
    """`metrics.json`'s memory of a `warp run` of `spec` in `processes` fresh processes."""
    work.mkdir(parents=True)
    (work / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "warp_core", "run", "spec.json", "--out", "out", "--json"]
    command += ["--nproc-per-node", str(processes)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    done = subprocess.run(
        command, cwd=work, capture_output=True, text=True, check=False, env=environment
    )
    if done.returncode != 0:
        raise RuntimeError(f"warp run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((work / "out" / "metrics.json").read_text())["memory"]


def compare(model_dir: Path, root: Path, ns: argparse.Namespace) -> list[list[Any]]:
    """One row per configuration and phase: measured and predicted MiB, their ratio."""
    rows = []
    for targets_name, targets in TARGETS.items():
        if ns.quick and targets_name != "projections":
            continue
        for method in ("warp", "full"):
            for processes in (1, 2):
                if ns.quick and processes != 1:
                    continue
                spec = spec_for(model_dir, method, targets, ns)
                name = f"{method}-{targets_name}-{processes}"
                default = measure(spec, root / name, processes, {})
                live = measure(spec, root / f"{name}-live", processes, LIVE)
                job = JobSpec.model_validate(spec)
                shape = read_shape(str(model_dir), job.hyperparameters.target_modules)
                predicted = plan(job, shape, processes, "cpu")
                for phase in predicted.phases:
                    added = phase.added
                    got, got_live = default[phase.name], live[phase.name]
                    rows.append(
                        [
                            method,
                            targets_name,
                            processes,
                            phase.name,
                            f"{got / MIB:.1f}",
                            f"{got_live / MIB:.1f}",
                            f"{added / MIB:.1f}",
                            f"{added / got:.2f}",
                            f"{added / got_live:.2f}",
                            phase.peak_moment.name,
                        ]
                    )
                print(markdown_table(HEADERS, rows[-len(predicted.phases) :]), flush=True)
    return rows


def llama_7b(root: Path) -> None:
    """The plan of Llama-2-7B-chat with the default spec and targets, on CUDA."""
    model_dir = root / "llama-2-7b-chat-config"
    llama_2_7b_config().save_pretrained(model_dir)
    spec = JobSpec.model_validate(
        {
            "base_model": str(model_dir),
            "safety_data": {"source": "LibrAI/do-not-answer", "limit": 800},
            "utility_data": {"source": "openai/gsm8k", "limit": 5000},
        }
    )
    shape = read_shape(str(model_dir), spec.hyperparameters.target_modules)
    rows = []
    for processes in (1, 2):
        predicted = plan(spec, shape, processes, "cuda")
        for phase in predicted.phases:
            terms = ", ".join(f"{k} {v / GIB:.1f}" for k, v in phase.as_dict()["terms"].items())
            rows.append(
                [
                    processes,
                    phase.name,
                    f"{phase.resident / GIB:.1f}",
                    f"{phase.peak / GIB:.1f}",
                    terms,
                ]
            )
    print("\nLlama-2-7B-chat, default spec and targets, bf16, CUDA, GiB per process:")
    print(markdown_table(["processes", "phase", "resident", "peak", "terms at the peak"], rows))
    found = ways_to_fit(spec, shape, lambda n: usable_bytes(80) if n == 1 else None)
    if found is None:
        print("one 80 GiB GPU: no option makes it fit")
        return
    changes, fitted = found
    labels = ", ".join(change.label for change in changes)
    usable = usable_bytes(80) / GIB
    print(f"one 80 GiB GPU ({usable:.0f} GiB usable): {labels}")
    print(f"  -> {fitted.peak / GIB:.1f} GiB per process, largest phase {fitted.largest.name}")


# -- calibration -----------------------------------------------------------------------------


def eigh_bytes_per_entry(n: int) -> float:
    """What `basis.eigenbasis` of an n x n moment adds, in bytes per entry (the fp32 result
    included, the moment not)."""
    vectors = torch.randn(n, n)
    moment = vectors @ vectors.T
    del vectors
    with PeakMemory(torch.device("cpu")) as peak:
        eigenbasis(moment)
    return peak.bytes / (n * n)


def first_use_bytes() -> dict[str, float]:
    """What a process keeps (RSS, freed memory given back) from its first forward pass and
    its first backward pass, on a bf16 tiny Llama (hidden 512, 4 layers)."""
    model = tiny_llama(tiny_tokenizer(), hidden_size=512, num_layers=4).to(torch.bfloat16)
    ids = torch.randint(0, 1000, (8, 128))

    def rss() -> int:
        release_free_memory()
        return resident_bytes()["rss"]

    start = rss()
    with torch.no_grad():
        model(input_ids=ids)
    forward = rss()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": (forward - start) / MIB, "backward": (rss() - forward) / MIB}


def saved_activations(hidden: int, layers: int, batch: int, length: int) -> dict[str, float]:
    """MiB autograd saves in a Phase 3 forward (`loss.response_loss_sum`, the projections
    trained, a padded bf16 batch, half the positions responses), by storage, against the
    plan's activation term plus the log-softmax the loss saves (4 bytes per logit)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers).to(torch.bfloat16)
    set_trainable(model, find_targets(model, PROJECTIONS), train_other_params=False)
    model.train()
    ids = torch.randint(0, len(tokenizer), (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : length // 2] = -100
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        response_loss_sum(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    spec = JobSpec.model_validate(
        {
            **example_job("unused").model_dump(mode="json"),
            "hyperparameters": {
                "dtype": "bfloat16",
                "batch_size": batch,
                "max_length": length,
                "target_modules": PROJECTIONS,
                "gradient_checkpointing": False,
            },
        }
    )
    finetune = plan(spec, model_shape(model, PROJECTIONS), 1, "cpu").phases[-1]
    backward = next(m for m in finetune.moments if m.name == "backward")
    activations = next(t.bytes for t in backward.terms if t.name == "activations")
    responses = int((labels[:, 1:] != -100).sum())
    return {
        "saved": sum(saved.values()) / MIB,
        "planned": (activations + 4 * responses * len(tokenizer)) / MIB,
    }


CALIBRATIONS = {
    "eigh-1408": lambda: {"bytes_per_entry": eigh_bytes_per_entry(1408)},
    "eigh-4096": lambda: {"bytes_per_entry": eigh_bytes_per_entry(4096)},
    "first-use": first_use_bytes,
    "saved-512x4": lambda: saved_activations(512, 4, 8, 128),
    "saved-256x2": lambda: saved_activations(256, 2, 4, 256),
}
"""Each calibration runs in a process of its own (`--child NAME`)."""


def calibrate() -> None:
    for name in CALIBRATIONS:
        result = run_child(Path(__file__), [name])
        print(name, json.dumps({k: round(v, 2) for k, v in result.items()}), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        emit_result(CALIBRATIONS[sys.argv[2]]())
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="one process, projections only")
    parser.add_argument("--only-7b", action="store_true", help="print the 7B plan only")
    parser.add_argument("--calibrate", action="store_true", help="measure the plan's constants")
    ns = parser.parse_args()
    if ns.calibrate:
        calibrate()
        return
    with tempfile.TemporaryDirectory(prefix="warp-plan-accuracy-") as scratch:
        root = Path(scratch)
        if not ns.only_7b:
            model_dir, _ = build_tiny_model(
                root / "tiny", hidden_size=ns.hidden, num_layers=ns.layers
            )
            print(
                f"tiny Llama hidden {ns.hidden}, {ns.layers} layers, bf16 on the CPU, "
                f"{ns.steps} steps of {ns.grad_accum} micro-batches of "
                f"{ns.batch_size} x {ns.max_length} tokens"
            )
            rows = compare(model_dir, root, ns)
            print("\nall configurations:")
            print(markdown_table(HEADERS, rows))
        llama_7b(root)


if __name__ == "__main__":
    main()
