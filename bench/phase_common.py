"""Helpers shared by the benchmarks: data, tokenizer, model, memory and child processes.

Benchmarks run every measured configuration in a child process of their own, so the peak
resident memory (`VmHWM`) read inside the child belongs to that configuration alone. The
parent trains the tokenizer once (`warp_core.testing.tiny_tokenizer`), saves it to a
temporary directory, and the children load it from there, so every child builds exactly the
same model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from warp_core.data import Example, load_examples
from warp_core.memory import resident_bytes
from warp_core.spec import DatasetRef
from warp_core.testing import SAFETY_SLICE, UTILITY_SLICE, example_job, tiny_llama

REPO = Path(__file__).resolve().parents[1]
UTILITY_ROWS = 400
"""Rows of the GSM8K slice Phase 3 trains on (its first 400, unchanged since the slice had
400 rows), so every token count stays the same when the slice grows."""
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The seven projections of a Llama decoder layer: the targets issue 11 measures memory with
(the default targets and lm_head)."""
RESULT_PREFIX = "RESULT "
"""A child prints its result as one JSON line starting with this prefix."""


def safety_examples(limit: int | None = None) -> list[Example]:
    """Rows `[0, limit)` of the do-not-answer slice: harmful prompt + refusal."""
    return load_examples(DatasetRef(source=str(SAFETY_SLICE), preset="do-not-answer", limit=limit))


def utility_examples(limit: int | None = None) -> list[Example]:
    """Rows `[0, limit)` of the GSM8K slice: question + worked answer."""
    return load_examples(DatasetRef(source=str(UTILITY_SLICE), preset="gsm8k", limit=limit))


def memory_job(
    model_dir: Path,
    method: str,
    *,
    steps: int,
    batch_size: int,
    max_length: int,
    targets: list[str] | None = None,
    **hyperparameters: Any,
) -> dict[str, Any]:
    """The job the memory benchmarks run through `warp run`: the example job on `model_dir`
    in bf16 (which holds on the CPU what a GPU would hold), evaluation off, 32 safety rows,
    `steps` optimizer steps, a checkpoint only at the end; `targets` (default: the spec's)."""
    spec = example_job(str(model_dir)).model_dump(mode="json")
    spec["method"] = method
    spec["safety_data"]["limit"] = 32
    spec["eval"] = {"enabled": False}
    spec["hyperparameters"] |= {
        "dtype": "bfloat16",
        "max_steps": steps,
        "batch_size": batch_size,
        "grad_accum_steps": 1,
        "max_length": max_length,
        "checkpoint_every": 1000,
        "basis_batch_size": 8,
        **({"target_modules": targets} if targets else {}),
        **hyperparameters,
    }
    return spec


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """The tokenizer the parent saved (a local directory, never the Hub)."""
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


@dataclass(frozen=True)
class ModelSize:
    """Shape of the `tiny_llama` the benchmarks build (intermediate None: 2.75 x hidden)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int | None

    def argv(self) -> list[str]:
        """The command-line flags that reproduce this size in a child process."""
        args = ["--hidden", str(self.hidden), "--layers", str(self.layers)]
        args += ["--heads", str(self.heads), "--kv-heads", str(self.kv_heads)]
        if self.intermediate:
            args += ["--intermediate", str(self.intermediate)]
        return args

    def describe(self, vocab: int) -> str:
        inter = self.intermediate or int(self.hidden * 2.75)
        return (
            f"Llama hidden {self.hidden}, {self.layers} layers, {self.heads} heads, "
            f"{self.kv_heads} kv heads, intermediate {inter}, vocab {vocab}"
        )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--hidden`, `--layers`, `--heads`, `--kv-heads`, `--intermediate`, `--vocab`."""
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    parser.add_argument(
        "--intermediate", type=int, default=None, help="MLP size (default 2.75 x hidden)"
    )
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary (4096)")


def model_size(ns: argparse.Namespace) -> ModelSize:
    return ModelSize(ns.hidden, ns.layers, ns.heads, ns.kv_heads, ns.intermediate)


def build_model(tokenizer: PreTrainedTokenizerFast, size: ModelSize) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama (seed 0), untied lm_head, in eval mode."""
    model = tiny_llama(
        tokenizer,
        hidden_size=size.hidden,
        num_layers=size.layers,
        num_heads=size.heads,
        num_kv_heads=size.kv_heads,
        intermediate_size=size.intermediate,
        seed=0,
    )
    return model.float()


def memory_mib() -> dict[str, float]:
    """This process's resident memory now (`rss`) and its peak so far (`peak`), in MiB."""
    now = resident_bytes() or {"rss": float("nan"), "peak": float("nan")}
    return {name: value / 2**20 for name, value in now.items()}


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so a stopped parent kills its running child (as
    `subprocess.run` does on any exception) and removes its temporary directory."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def emit_result(result: dict[str, Any]) -> None:
    """Print a child's result where `run_child` finds it."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, args: list[str]) -> dict[str, Any]:
    """Run `script --child ARGS` in a fresh interpreter and return its JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = subprocess.run(
        [sys.executable, str(script), "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line.removeprefix(RESULT_PREFIX))
    raise RuntimeError(f"child {args} printed no result:\n{done.stdout[-2000:]}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in load],
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (from `/proc/stat`)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Wall time, this process's CPU time, and the CPU other processes used, between marks.

    `others` (in cores) is the machine's busy CPU time minus this process's, divided by the
    wall time: a measure of how much the figures were disturbed by other work.
    """

    def __init__(self) -> None:
        self.last = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), busy_cpu_seconds()

    def mark(self) -> dict[str, float]:
        """Deltas since the previous mark: `wall`, `cpu` (own) and `others` (cores)."""
        now = self._now()
        wall, cpu, busy = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return {"wall": wall, "cpu": cpu, "others": max(0.0, busy - cpu) / max(wall, 1e-9)}


def default_busy(threads: int) -> float:
    """How many cores other processes may use before a measurement is re-run: the cores
    the benchmark leaves idle, plus 0.3 (0.3 with every core used, 1.3 with one of two)."""
    used = threads or torch.get_num_threads()
    return max(0, (os.cpu_count() or 1) - used) + 0.3
