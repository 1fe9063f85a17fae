"""Phase 3 peak memory of WaRP against plain fine-tuning, per target parameter, in bf16.

What a user's job reports: each arm is a real `warp run` (its own process) of the same spec
on the same random tiny Llama (`warp_core.testing`), and the figure is `metrics.json`'s
`memory.finetune`: the rise of the process's peak RSS over its RSS when Phase 3 began, the
model already loaded (see `warp_core.memory`). Targets are the seven projections of every
decoder layer (lm_head excluded, as in issue 11's measurement), the dtype bfloat16, which
runs on the CPU and holds what a GPU would hold, evaluation off, two optimizer steps.

Run from the repository root: `.venv/bin/python bench/phase3_memory.py` (about a minute).
`--nproc-per-node 2` runs each job in two processes (torchrun, gloo, FSDP2) and reports the
per-process figure; `--set keep_rotated_gradients=false` (repeatable) sets hyperparameters;
`--repeats 3` prints the median of three runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from phase_common import PROJECTIONS, memory_job

from warp_core.testing import save_checkpoint, tiny_llama, tiny_tokenizer


def spec_for(model_dir: Path, method: str, ns: argparse.Namespace) -> dict:
    return memory_job(
        model_dir,
        method,
        steps=ns.steps,
        batch_size=ns.batch_size,
        max_length=ns.max_length,
        targets=PROJECTIONS,
        gradient_checkpointing=ns.gradient_checkpointing,
        **dict(_setting(item) for item in ns.set),
    )


def _setting(item: str) -> tuple[str, object]:
    """`key=value` with the value read as JSON when it parses (numbers, booleans, lists)."""
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def finetune_peak(spec: dict, work: Path, processes: int) -> int:
    """`memory.finetune` (per process) of a `warp run` of `spec` in fresh processes."""
    work.mkdir()
    (work / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "warp_core", "run", "spec.json", "--out", "out", "--json"]
    command += ["--nproc-per-node", str(processes)]
    subprocess.run(command, cwd=work, check=True, capture_output=True)
    return json.loads((work / "out" / "metrics.json").read_text())["memory"]["finetune"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations (the default on CUDA; off on the CPU unless asked)",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warp-phase3-memory-") as scratch:
        root = Path(scratch)
        tokenizer = tiny_tokenizer()
        model = tiny_llama(tokenizer, hidden_size=ns.hidden, num_layers=ns.layers)
        targets = sum(
            module.weight.numel()
            for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in PROJECTIONS
        )
        model_dir = save_checkpoint(model, tokenizer, root / "model")
        runs: dict[str, list[int]] = {"full": [], "warp": []}
        for repeat in range(ns.repeats):
            for method in runs:  # alternating, so a drift of the machine hits both
                spec = spec_for(model_dir, method, ns)
                work = root / f"{method}-{repeat}"
                runs[method].append(finetune_peak(spec, work, ns.nproc_per_node))
        peaks = {method: statistics.median(values) for method, values in runs.items()}
    print(f"hidden {ns.hidden}, {ns.layers} layers, {targets:,} target parameters, bf16,")
    recompute = ", gradient checkpointing" if ns.gradient_checkpointing else ""
    print(f"{ns.steps} steps of {ns.batch_size} x <= {ns.max_length} tokens{recompute}")
    print(f"{ns.nproc_per_node} process(es), settings {ns.set}, median of {ns.repeats}")
    print("| method | Phase 3 peak MiB per process | bytes per target parameter | runs |")
    print("| --- | --- | --- | --- |")
    for method, peak in peaks.items():
        each = ", ".join(f"{value / targets:.1f}" for value in runs[method])
        print(f"| {method} | {peak / 2**20:.1f} | {peak / targets:.1f} | {each} |")
    print(f"warp / full: {peaks['warp'] / peaks['full']:.2f}")


if __name__ == "__main__":
    main()
