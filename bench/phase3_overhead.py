"""Cost of WaRP Phase 3 against plain fine-tuning: same model, batch, data and targets.

Every arm calls the real `warp_core.finetune.train` on a fp32 Llama with the default
targets (every linear projection + lm_head, everything else frozen):

- plain: one `PlainSlot` per target (AdamW on the weights themselves);
- warp:  one `RotatedSlot` per target, with a random orthogonal basis per distinct layer
  input (grouped by `warp_core.basis.group_by_input`, so q/k/v and gate/up share one) and a
  per-module mask freezing 10% of coefficients (`masks_from_importance` on random scores),
  every rotated gradient formed from the accumulated weight gradient (`gradient_rotation:
  weights`, the dense `G_W U`). The rotations are dense matmuls, so their cost does not depend
  on which basis is used.
- warp-auto: the same, with the default `gradient_rotation: auto`: a target with more
  outputs than the step has tokens forms `G_W U` from the rotated activations instead
  (`warp_core.rotation`).

`--tokenizer DIR` builds the model on a real tokenizer (its vocabulary sets lm_head's size):
`--tokenizer ../shared/models/smollm2-135m-instruct-tokenizer --hidden 576 --layers 30
--heads 9 --kv-heads 3 --intermediate 1536` is SmolLM2-135M's shape.

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
from transformers import AutoTokenizer

from warp_core import finetune
from warp_core.basis import group_by_input
from warp_core.checkpoint import Checkpoint
from warp_core.data import Encoded, collate, encode_example, pad_token_id
from warp_core.distributed import World
from warp_core.finetune import StepReport, train
from warp_core.importance import masks_from_importance
from warp_core.model import Target, find_targets, set_trainable
from warp_core.optimizer import SlotAdamW
from warp_core.rotation import ActivationRotation
from warp_core.slots import PlainSlot, RotatedSlot, Slot
from warp_core.spec import DEFAULT_TARGET_MODULES, Hyperparameters
from warp_core.testing import tiny_tokenizer

ARMS = ("plain", "warp", "warp-auto")
WARP_ARMS = ("warp", "warp-auto")
PIECES = ("forward_backward", "rotate", "optimizer", "write_back", "other")


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

    def __init__(self, directory: Path, watch: Stopwatch) -> None:
        super().__init__(directory, World.alone(torch.device("cpu")))
        self.watch = watch

    def save(self, step: int, slots: Any, optimizer: Any) -> None:
        self.watch.start("save")
        cpu = time.process_time()
        super().save(step, slots, optimizer)
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
) -> tuple[list[RotatedSlot], float]:
    """RotatedSlots with random orthogonal bases and random top-`keep_ratio` masks.

    Returns the slots and the MiB of state they hold beyond the model (W0 copies, dC,
    packed masks, bases; gradients and Adam moments not included).
    """
    generator = torch.Generator().manual_seed(0)
    groups = group_by_input(model, targets, sample)
    basis_of: dict[str, torch.Tensor] = {}
    for members in groups.values():
        n = members[0].module.in_features
        basis = torch.linalg.qr(torch.randn(n, n, generator=generator)).Q.contiguous()
        basis_of |= {t.name: basis for t in members}
    scores = {t.param_name: torch.rand(t.weight.shape, generator=generator) for t in targets}
    masks = masks_from_importance(scores, keep_ratio, "module")
    cpu = torch.device("cpu")
    slots = [
        RotatedSlot(
            t.param_name, t.weight, _constant(basis_of[t.name]), masks[t.param_name], cpu, cpu
        )
        for t in targets
    ]
    state = sum(u.nbytes for u in {id(u): u for u in basis_of.values()}.values())
    for slot in slots:
        state += slot.base.nbytes + slot.master.nbytes + slot.frozen_bits.nbytes
    return slots, state / 2**20


def _constant(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: value


def frozen_change(slots: list[RotatedSlot]) -> float:
    """Largest `|(W - W0) U|` at frozen coefficients, relative to the largest change."""
    worst = 0.0
    for slot in slots:
        change = (slot.param.detach() - slot.base) @ slot.basis()
        frozen = torch.zeros_like(change, dtype=torch.bool)
        for block in slot.blocks:
            frozen[block.rows] = slot._frozen(block)
        worst = max(worst, float(change[frozen].abs().max() / change.abs().max()))
    return worst


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

    rotation = None
    warp: list[RotatedSlot] = []
    if ns.arm in WARP_ARMS:
        warp, state_mib = warp_slots(model, targets, collate(items[:1], pad_id), ns.keep_ratio)
        head = model.get_output_embeddings()
        entries = [
            (slot, t.module, t.module is head) for slot, t in zip(warp, targets, strict=True)
        ]
        setting = "weights" if ns.arm == "warp" else "auto"
        rotation = ActivationRotation(entries, setting, rotations=1)
        slots: list[Slot] = list(warp)
    else:
        cpu = torch.device("cpu")
        slots, state_mib = [PlainSlot(t.param_name, t.weight, cpu) for t in targets], 0.0

    watch = Stopwatch()
    for slot in slots:
        slot.gradient = watch.wrap("rotate", slot.gradient)  # type: ignore[method-assign]
        slot.write_back = watch.wrap("write_back", slot.write_back)  # type: ignore[method-assign]
    finetune.accumulate_gradients = watch.wrap(  # train() looks it up in the module
        "forward_backward", finetune.accumulate_gradients
    )
    optimizers: list[SlotAdamW] = []
    update = SlotAdamW.update

    def timed_update(optimizer: SlotAdamW, *args: Any) -> None:
        optimizers[:] = [optimizer]
        watch.start("optimizer")
        update(optimizer, *args)
        watch.stop("optimizer")

    SlotAdamW.update = timed_update  # type: ignore[method-assign]

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
        checkpoint = TimedCheckpoint(Path(tmp) / "finetune", watch)
        train(
            model,
            slots,
            items,
            hp,
            pad_id,
            checkpoint,
            on_step=lambda report: reports.append((report, watch.take(), meter.mark())),
            rotation=rotation,
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

    adam_bytes = sum(m.exp_avg.nbytes + m.exp_avg_sq.nbytes for m in optimizers[0].moments.values())
    return {
        "arm": ns.arm,
        "accum": ns.accum,
        "steps": steps,
        "model_rss_mib": model_memory["rss"],
        "peak_mib": memory_mib()["peak"],
        "slot_state_mib": state_mib,
        "adam_state_mib": adam_bytes / 2**20,
        "trainable": sum(t.weight.numel() for t in targets),
        "matmul_parameters": matmul_parameters(model),
        "sum_out_in2": sum(t.weight.numel() * t.weight.shape[1] for t in targets),
        "frozen_change": frozen_change(warp) if warp else 0.0,
        "threads": torch.get_num_threads(),
    }


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters a token's forward multiplies by: every weight but the input embedding
    (a lookup), the `P` of the `6 P T` FLOPs of a training step."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


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


def floor(result: dict[str, Any], tokens: int) -> float:
    """Exact WaRP's floor: the write-back `dC U^T` alone (`2 out in^2` per target) over the
    step's `6 P T`, P the whole model's matmul parameters."""
    return 1 + 2 * result["sum_out_in2"] / (6 * result["matmul_parameters"] * tokens)


def report(ns: argparse.Namespace, results: list[dict[str, Any]], vocab: int) -> str:
    """The tables: time per optimizer step against plain, breakdown, peak memory."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by[result["arm"], result["accum"]].append(result)

    def step_values(arm: str, accum: int, key: str) -> list[float]:
        return [step.get(key, 0.0) for r in by[arm, accum] for step in r["steps"]]

    def paired_ratios(arm: str, accum: int) -> list[float]:
        return [
            median([s["seconds"] for s in w["steps"]]) / median([s["seconds"] for s in p["steps"]])
            for p, w in zip(by["plain", accum], by[arm, accum], strict=False)
        ]

    first = results[0]
    time_rows, cpu_rows, piece_rows, memory_rows = [], [], [], []
    for accum in ns.accum:
        tokens = ns.micro_batch * accum * ns.seq_len
        plain = median(step_values("plain", accum, "seconds"))
        row: list[Any] = [accum, tokens, f"{plain:.2f}"]
        for arm in WARP_ARMS:
            warp = median(step_values(arm, accum, "seconds"))
            pairs = paired_ratios(arm, accum)
            row += [f"{warp:.2f}", f"{warp / plain:.3f} ({min(pairs):.3f}-{max(pairs):.3f})"]
        row += [f"{floor(first, tokens):.3f}", f"{1 + predicted_overhead(first, tokens):.3f}"]
        time_rows.append(row)
        cpus = {arm: median(step_values(arm, accum, "cpu")) for arm in ARMS}
        others = [v for arm in ARMS for v in step_values(arm, accum, "others")]
        cpu_rows.append(
            [accum, *(f"{cpus[arm]:.2f}" for arm in ARMS)]
            + [f"{cpus[arm] / cpus['plain']:.3f}" for arm in WARP_ARMS]
            + [f"{median(others):.2f}", f"{max(others):.2f}"]
        )
        for arm in ARMS:
            pieces = [median(step_values(arm, accum, key)) for key in PIECES]
            total = median(step_values(arm, accum, "seconds"))
            piece_rows.append([arm, accum, *(f"{p:.3f}" for p in pieces), f"{total:.2f}"])
        peaks = {arm: median([r["peak_mib"] for r in by[arm, accum]]) for arm in ARMS}
        memory_rows.append(
            [accum, *(f"{peaks[arm]:.0f}" for arm in ARMS)]
            + [f"{peaks[arm] / peaks['plain']:.3f}" for arm in WARP_ARMS]
        )
    some_warp = next(r for r in results if r["arm"] == "warp")
    some_plain = next(r for r in results if r["arm"] == "plain")
    model_rss = median([r["model_rss_mib"] for r in results])
    saves = [s["save"] for r in results for s in r["steps"] if s["save"]]
    retried = sum(r.get("attempts", 1) - 1 for r in results)
    info = machine()
    lines = [
        f"model: {model_size(ns).describe(vocab)}; "
        f"{some_warp['trainable'] / 1e6:.2f}M trainable target weights, "
        f"{first['matmul_parameters'] / 1e6:.2f}M matmul parameters, fp32",
        f"batch: micro-batch {ns.micro_batch} x {ns.seq_len} tokens (no padding); "
        f"{ns.warmup} warm-up + {ns.steps} timed optimizer steps per run; "
        f"{ns.repeats} repeats, arms alternating; medians over all timed steps",
        f"machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']}, "
        f"{some_warp['threads']} torch threads, load average at end {info['loadavg']}; "
        f"{retried} run(s) repeated because other processes used > {ns.busy} cores",
        "",
        "Wall seconds per optimizer step (checkpoint save excluded); ratios are medians with "
        "the range over repeats:",
        markdown_table(
            [
                "micro-batches/step",
                "tokens/step",
                "plain s",
                "warp s",
                "warp/plain",
                "warp-auto s",
                "warp-auto/plain",
                "floor",
                "dense FLOP model",
            ],
            time_rows,
        ),
        "floor: 1 + sum(2 out in^2) / (6 P T), the write-back alone (exact WaRP's floor); "
        "dense FLOP model: 1 + (4 sum out*in^2) / (6 sum out*in * T) = "
        f"1 + (2/3) * {in_eff(first):.0f} / T, both rotations dense, target layers only",
        "",
        "CPU seconds of the child per step, and CPU used by other processes meanwhile:",
        markdown_table(
            [
                "micro-batches/step",
                *(f"{arm} CPU s" for arm in ARMS),
                *(f"{arm}/plain" for arm in WARP_ARMS),
                "others' load (cores, median)",
                "others' load (max)",
            ],
            cpu_rows,
        ),
        "",
        "Median wall seconds per piece of a step (rotate: forming the masked rotated "
        "gradients in the optimizer step):",
        markdown_table(["arm", "micro-batches/step", *PIECES, "step"], piece_rows),
        "",
        "Peak RSS of the child process (VmHWM, MiB; "
        f"{model_rss:.0f} MiB after imports and model build):",
        markdown_table(
            [
                "micro-batches/step",
                *(f"{arm} peak" for arm in ARMS),
                *(f"{arm}/plain" for arm in WARP_ARMS),
            ],
            memory_rows,
        ),
        "",
        f"warp slot state beyond the model (W0 copies + dC + packed masks + bases): "
        f"{some_warp['slot_state_mib']:.0f} MiB; Adam moments: warp "
        f"{some_warp['adam_state_mib']:.0f} MiB, plain {some_plain['adam_state_mib']:.0f} MiB",
        f"checkpoint save (excluded above): median {median(saves):.2f} s; "
        f"largest |(W - W0) U| on frozen coefficients after training, relative to the "
        f"largest change: {max(r['frozen_change'] for r in results):.1e}",
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
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a tokenizer directory to build the model on (default: the tiny one, --vocab)",
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
        if ns.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer, local_files_only=True)
        else:
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
