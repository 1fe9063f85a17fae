"""Cost of WaRP Phase 3 against plain fine-tuning: same model, batch, data and targets.

Both arms call the real `warp_core.finetune.train` on a fp32 `tiny_llama` with the default
targets (every linear projection + lm_head, everything else frozen):

- plain: one `PlainSlot` per target (AdamW on the weights themselves);
- warp:  one `RotatedSlot` per target, with a random orthogonal basis per distinct layer
  input (grouped by `warp_core.basis.group_by_input`, so q/k/v and gate/up share one) and a
  per-module mask freezing 10% of coefficients (`masks_from_importance` on random scores).
  The rotations are dense matmuls, so their cost does not depend on which basis is used.

Every sequence is exactly `--seq-len` tokens (GSM8K examples encoded with the chat template
and packed back to back), so every micro-batch does the same work. Each (arm, micro-batches
per step) runs in its own child process; arms alternate and the whole grid is repeated.
A child runs `train` for `--warmup + --steps` optimizer steps and keeps the last `--steps`.
The checkpoint goes to a temporary directory with `checkpoint_every` larger than the run,
so it is saved once, at the last step; its time is measured and subtracted from that step.

Run from the repository root: `.venv/bin/python bench/phase3_overhead.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from phase_common import (
    UTILITY_ROWS,
    LoadMeter,
    add_model_args,
    build_model,
    default_busy,
    emit_result,
    exit_on_sigterm,
    load_tokenizer,
    machine,
    markdown_table,
    memory_mib,
    model_size,
    run_child,
    utility_examples,
)
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from warp_core import finetune
from warp_core.basis import Bases, group_by_input
from warp_core.data import Encoded, collate, encode_example, pad_token_id
from warp_core.finetune import Checkpoint, PlainSlot, RotatedSlot, Slot, StepReport, train
from warp_core.importance import masks_from_importance
from warp_core.model import Target, find_targets, set_trainable
from warp_core.spec import DEFAULT_TARGET_MODULES, Hyperparameters
from warp_core.testing import tiny_tokenizer

ARMS = ("plain", "warp")
PIECES = ("forward_backward", "load_grad", "optimizer", "write_back", "other")


class Stopwatch:
    """Wall-clock totals per named piece of an optimizer step; `take` reads and resets."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, timed into `key`."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - start

        return timed

    def start(self, key: str) -> None:
        self._started[key] = time.perf_counter()

    def stop(self, key: str) -> None:
        self.totals[key] += time.perf_counter() - self._started.pop(key)

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


class TimedCheckpoint(Checkpoint):
    """The real checkpoint, with the time of each save recorded under `save`."""

    def __init__(self, path: Path, watch: Stopwatch) -> None:
        super().__init__(path)
        self.watch = watch

    def save(self, step: int, slots: Any, optimizer: Any, scheduler: Any) -> None:
        self.watch.start("save")
        cpu = time.process_time()
        super().save(step, slots, optimizer, scheduler)
        self.watch.totals["save_cpu"] += time.process_time() - cpu
        self.watch.stop("save")


def fixed_length_items(tokenizer: Any, seq_len: int, count_unit: int) -> list[Encoded]:
    """GSM8K examples encoded as training sees them, packed into `seq_len`-token items.

    Labels keep the prompt tokens at -100, as `encode_example` sets them. The item count is
    a multiple of `count_unit` (micro-batch x every accumulation count), so no optimizer
    step of the `Schedule` is short of micro-batches.
    """
    ids: list[int] = []
    labels: list[int] = []
    for example in utility_examples(UTILITY_ROWS):
        encoded = encode_example(tokenizer, example, max_length=1_000_000)
        if encoded is not None:
            ids += encoded.input_ids
            labels += encoded.labels
    chunks = [
        Encoded(ids[i : i + seq_len], labels[i : i + seq_len])
        for i in range(0, len(ids) - seq_len + 1, seq_len)
    ]
    wanted = max(count_unit, len(chunks) // count_unit * count_unit)
    return [chunks[i % len(chunks)] for i in range(wanted)]


def warp_slots(
    model: torch.nn.Module,
    targets: list[Target],
    sample: dict[str, torch.Tensor],
    keep_ratio: float,
) -> tuple[list[Slot], float]:
    """RotatedSlots with random orthogonal bases and random top-`keep_ratio` masks.

    Returns the slots and the MiB of state they hold beyond the model (W0 copies, dC,
    masks, bases; gradients and Adam moments not included).
    """
    generator = torch.Generator().manual_seed(0)
    groups = group_by_input(model, targets, sample)
    basis: dict[str, torch.Tensor] = {}
    for key, members in groups.items():
        n = members[0].module.in_features
        basis[key] = torch.linalg.qr(torch.randn(n, n, generator=generator)).Q.contiguous()
    key_of = {t.name: key for key, members in groups.items() for t in members}
    bases = Bases(key_of, basis, {key: torch.ones(len(u)) for key, u in basis.items()})
    scores = {t.param_name: torch.rand(t.weight.shape, generator=generator) for t in targets}
    masks = masks_from_importance(scores, keep_ratio, "module")
    slots: list[Slot] = [
        RotatedSlot(t.param_name, t.weight, bases.for_target(t), masks[t.param_name])
        for t in targets
    ]
    state = sum(u.nbytes for u in basis.values())
    for slot in slots:
        state += slot.base.nbytes + slot.master.nbytes + slot.frozen.nbytes
    return slots, state / 2**20


def child(ns: argparse.Namespace) -> dict[str, Any]:
    """One arm at one accumulation count: warm-up + timed optimizer steps through `train`."""
    if ns.threads:
        torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    workdir = Path(ns.workdir)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    pad_id = pad_token_id(tokenizer)
    raw = json.loads((workdir / "items.json").read_text())
    items = [Encoded(ids, labels) for ids, labels in raw]
    model = build_model(tokenizer, model_size(ns))
    targets = find_targets(model, list(DEFAULT_TARGET_MODULES))
    set_trainable(model, targets, False)
    model_memory = memory_mib()

    if ns.arm == "warp":
        slots, state_mib = warp_slots(model, targets, collate(items[:1], pad_id), ns.keep_ratio)
    else:
        slots, state_mib = [PlainSlot(t.param_name, t.weight) for t in targets], 0.0

    watch = Stopwatch()
    for slot in slots:
        slot.load_grad = watch.wrap("load_grad", slot.load_grad)  # type: ignore[method-assign]
        slot.write_back = watch.wrap("write_back", slot.write_back)  # type: ignore[method-assign]
    finetune.accumulate_gradients = watch.wrap(  # train() looks it up in the module
        "forward_backward", finetune.accumulate_gradients
    )
    optimizers: list[torch.optim.Optimizer] = []

    def before_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        optimizers[:] = [optimizer]
        watch.start("optimizer")

    register_optimizer_step_pre_hook(before_step)
    register_optimizer_step_post_hook(lambda *_: watch.stop("optimizer"))

    hp = Hyperparameters(
        batch_size=ns.micro_batch,
        grad_accum_steps=ns.accum,
        max_steps=ns.warmup + ns.steps,
        max_length=ns.seq_len,
        checkpoint_every=10**9,
        dtype="float32",
        seed=0,
    )
    reports: list[tuple[StepReport, dict[str, float], dict[str, float]]] = []
    meter = LoadMeter()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = TimedCheckpoint(Path(tmp) / "finetune.pt", watch)
        train(
            model,
            slots,
            items,
            hp,
            pad_id,
            checkpoint,
            on_step=lambda report: reports.append((report, watch.take(), meter.mark())),
        )
    expected_tokens = ns.micro_batch * ns.accum * ns.seq_len
    steps = []
    for report, parts, load in reports[ns.warmup :]:
        if report.tokens != expected_tokens:
            raise RuntimeError(f"step {report.step} had {report.tokens} tokens")
        save = parts.pop("save", 0.0)
        cpu = load["cpu"] - parts.pop("save_cpu", 0.0)
        seconds = report.seconds - save
        parts["other"] = seconds - sum(parts.values())
        steps.append(
            {
                "seconds": seconds,
                "cpu": cpu,
                "others": load["others"],
                "save": save,
                "loss": report.loss,
                **parts,
            }
        )

    frozen_moved = 0.0
    if ns.arm == "warp":
        frozen_moved = max(float(s.master[s.frozen].abs().max()) for s in slots)
    adam_bytes = sum(
        value.nbytes
        for state in optimizers[0].state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )
    return {
        "arm": ns.arm,
        "accum": ns.accum,
        "steps": steps,
        "model_rss_mib": model_memory["rss"],
        "peak_mib": memory_mib()["peak"],
        "slot_state_mib": state_mib,
        "adam_state_mib": adam_bytes / 2**20,
        "trainable": sum(t.weight.numel() for t in targets),
        "sum_out_in2": sum(t.weight.numel() * t.weight.shape[1] for t in targets),
        "frozen_max_abs_dC": frozen_moved,
        "threads": torch.get_num_threads(),
    }


def child_argv(ns: argparse.Namespace, workdir: Path, arm: str, accum: int) -> list[str]:
    size = model_size(ns)
    argv = ["--workdir", str(workdir), "--arm", arm, "--accum", str(accum), *size.argv()]
    argv += ["--seq-len", str(ns.seq_len), "--micro-batch", str(ns.micro_batch)]
    argv += ["--steps", str(ns.steps), "--warmup", str(ns.warmup)]
    argv += ["--keep-ratio", str(ns.keep_ratio), "--threads", str(ns.threads)]
    return argv


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def in_eff(result: dict[str, Any]) -> float:
    """`sum(out * in^2) / sum(out * in)` over the targets: the width the rotations scale with."""
    return result["sum_out_in2"] / result["trainable"]


def predicted_overhead(result: dict[str, Any], tokens: int) -> float:
    """Rotation FLOPs per step (`4 out in^2`: G_W U and dC U^T) over forward+backward FLOPs
    (`6 out in` per token) of the target layers."""
    return 2 / 3 * in_eff(result) / tokens


def report(ns: argparse.Namespace, results: list[dict[str, Any]], vocab: int) -> str:
    """The tables: time per optimizer step, breakdown, peak memory."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by[result["arm"], result["accum"]].append(result)

    def step_values(arm: str, accum: int, key: str) -> list[float]:
        return [step[key] for r in by[arm, accum] for step in r["steps"] if key in step]

    def paired_ratios(accum: int) -> list[float]:
        plain, warp = by["plain", accum], by["warp", accum]
        return [
            median([s["seconds"] for s in w["steps"]]) / median([s["seconds"] for s in p["steps"]])
            for p, w in zip(plain, warp, strict=False)
        ]

    time_rows, cpu_rows, piece_rows, memory_rows = [], [], [], []
    for accum in ns.accum:
        plain = median(step_values("plain", accum, "seconds"))
        warp = median(step_values("warp", accum, "seconds"))
        rotation = median(
            [
                s.get("load_grad", 0.0) + s.get("write_back", 0.0)
                for r in by["warp", accum]
                for s in r["steps"]
            ]
        )
        pairs = paired_ratios(accum)
        time_rows.append(
            [
                accum,
                ns.micro_batch * accum * ns.seq_len,
                f"{plain:.2f}",
                f"{warp:.2f}",
                f"{warp / plain:.3f}",
                f"{min(pairs):.3f}-{max(pairs):.3f}",
                f"{rotation:.3f}",
                f"{1 + rotation / plain:.3f}",
                f"{1 + predicted_overhead(results[0], ns.micro_batch * accum * ns.seq_len):.3f}",
            ]
        )
        plain_cpu = median(step_values("plain", accum, "cpu"))
        warp_cpu = median(step_values("warp", accum, "cpu"))
        others = step_values("plain", accum, "others") + step_values("warp", accum, "others")
        cpu_rows.append(
            [
                accum,
                f"{plain_cpu:.2f}",
                f"{warp_cpu:.2f}",
                f"{warp_cpu / plain_cpu:.3f}",
                f"{median(others):.2f}",
                f"{max(others):.2f}",
            ]
        )
        for arm in ARMS:
            pieces = [median(step_values(arm, accum, key)) for key in PIECES]
            total = median(step_values(arm, accum, "seconds"))
            piece_rows.append([arm, accum, *(f"{p:.3f}" for p in pieces), f"{total:.2f}"])
        peaks = {arm: median([r["peak_mib"] for r in by[arm, accum]]) for arm in ARMS}
        memory_rows.append(
            [
                accum,
                f"{peaks['plain']:.0f}",
                f"{peaks['warp']:.0f}",
                f"{peaks['warp'] / peaks['plain']:.3f}",
                f"{peaks['warp'] - peaks['plain']:.0f}",
            ]
        )
    some_warp = next(r for r in results if r["arm"] == "warp")
    some_plain = next(r for r in results if r["arm"] == "plain")
    model_rss = median([r["model_rss_mib"] for r in results])
    saves = [s["save"] for r in results for s in r["steps"] if s["save"]]
    retried = sum(r.get("attempts", 1) - 1 for r in results)
    info = machine()
    lines = [
        f"model: {model_size(ns).describe(vocab)}; "
        f"{some_warp['trainable'] / 1e6:.2f}M trainable target weights, fp32",
        f"batch: micro-batch {ns.micro_batch} x {ns.seq_len} tokens (no padding); "
        f"{ns.warmup} warm-up + {ns.steps} timed optimizer steps per run; "
        f"{ns.repeats} repeats, arms alternating; medians over all timed steps",
        f"machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']}, "
        f"{some_warp['threads']} torch threads, load average at end {info['loadavg']}; "
        f"{retried} run(s) repeated because other processes used > {ns.busy} cores",
        "",
        "Wall seconds per optimizer step (checkpoint save excluded):",
        markdown_table(
            [
                "micro-batches/step",
                "tokens/step",
                "plain s",
                "warp s",
                "warp/plain",
                "per-repeat ratio range",
                "rotation s (load_grad+write_back)",
                "1 + rotation/plain",
                "FLOP model",
            ],
            time_rows,
        ),
        "FLOP model: 1 + (4 sum out*in^2) / (6 sum out*in * tokens/step) = "
        f"1 + (2/3) * {in_eff(results[0]):.0f} / tokens (effective input width of the targets)",
        "",
        "CPU seconds of the child per step, and CPU used by other processes meanwhile:",
        markdown_table(
            [
                "micro-batches/step",
                "plain CPU s",
                "warp CPU s",
                "warp/plain",
                "others' load (cores, median)",
                "others' load (max)",
            ],
            cpu_rows,
        ),
        "",
        "Median wall seconds per piece of a step:",
        markdown_table(["arm", "micro-batches/step", *PIECES, "step"], piece_rows),
        "",
        "Peak RSS of the child process (VmHWM, MiB; "
        f"{model_rss:.0f} MiB after imports and model build):",
        markdown_table(
            ["micro-batches/step", "plain peak", "warp peak", "warp/plain", "warp - plain"],
            memory_rows,
        ),
        "",
        f"warp slot state beyond the model (W0 copies + dC + masks + bases): "
        f"{some_warp['slot_state_mib']:.0f} MiB; Adam moments: warp "
        f"{some_warp['adam_state_mib']:.0f} MiB, plain {some_plain['adam_state_mib']:.0f} MiB",
        f"checkpoint save (excluded above): median {median(saves):.2f} s; "
        f"largest |dC| on frozen coefficients after training: "
        f"{max(r['frozen_max_abs_dC'] for r in results if r['arm'] == 'warp'):.1e}",
    ]
    return "\n".join(lines)


def measure(script: Path, argv: list[str], busy: float, attempts: int = 2) -> dict[str, Any]:
    """Run one child; run it again (once) if other processes disturbed it."""
    for attempt in range(1, attempts + 1):
        result = run_child(script, argv)
        result["attempts"] = attempt
        if median([s["others"] for s in result["steps"]]) <= busy:
            break
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument(
        "--accum",
        type=int,
        nargs="+",
        default=[1, 4, 8],
        help="micro-batches per optimizer step to measure (default 1 4 8)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the grid (3)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--keep-ratio", type=float, default=0.1, help="frozen share (0.1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--busy",
        type=float,
        default=None,
        help="re-run a child once when other processes used more than this many cores "
        "(median over its timed steps; default: idle cores + 0.3)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=ARMS, default="plain", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.busy is None:
        ns.busy = default_busy(ns.threads)
    if ns.child:
        ns.accum = ns.accum[0]
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = parse(argv)
    if ns.child:
        emit_result(child(ns))
        return
    exit_on_sigterm()
    started = time.perf_counter()
    script = Path(__file__).resolve()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="warp-bench-") as tmp:
        workdir = Path(tmp)
        tokenizer = tiny_tokenizer(ns.vocab)
        tokenizer.save_pretrained(workdir / "tokenizer")
        unit = ns.micro_batch * math.lcm(*ns.accum)
        items = fixed_length_items(tokenizer, ns.seq_len, unit)
        (workdir / "items.json").write_text(
            json.dumps([[item.input_ids, item.labels] for item in items])
        )
        print(f"{len(items)} items of {ns.seq_len} tokens; vocab {len(tokenizer)}", file=sys.stderr)
        for repeat in range(ns.repeats):
            for index, accum in enumerate(ns.accum):
                arms = ARMS if (repeat + index) % 2 == 0 else ARMS[::-1]
                for arm in arms:
                    result = measure(script, child_argv(ns, workdir, arm, accum), ns.busy)
                    results.append(result)
                    per_step = median([s["seconds"] for s in result["steps"]])
                    print(
                        f"repeat {repeat + 1}/{ns.repeats} accum {accum} {arm}: "
                        f"{per_step:.2f} s/step, peak {result['peak_mib']:.0f} MiB "
                        f"[{time.perf_counter() - started:.0f} s]",
                        file=sys.stderr,
                    )
        vocab = len(tokenizer)
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))
    print(report(ns, results, vocab))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
