"""Phase 1 (bases) and Phase 2 (importance + masks): time and peak memory against tokens.

For each safety-set size (rows `[0, n)` of the do-not-answer slice, encoded with the chat
template and truncated to `--max-length` tokens) a child process builds the same fp32
`tiny_llama` and runs the real code:

- Phase 1: `warp_core.basis.build_bases` over batches of `basis_batch_size` (default 8);
  its time is split into the forward passes that accumulate `G = sum x x^T` and the `eigh`
  decompositions after them (timed through `build_bases`'s `on_batch` callback).
- Phase 2: `warp_core.importance.importance_scores` over batches of
  `importance_batch_size` (default 2), then `masks_from_importance` (keep_ratio 0.1, per
  module).

Peak RSS is read per phase: the child resets its high-water mark (Linux
`/proc/self/clear_refs`) before each phase and reads `VmHWM` after it; "added" is the peak
minus the RSS at the phase's start. What the benchmark shows: the memory a phase adds
depends on the batch size and the model, not on the number of tokens, while the time grows
linearly with tokens (plus a constant: the `eigh` of Phase 1).

Run from the repository root: `.venv/bin/python bench/phase12_scaling.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from phase_common import (
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
    safety_examples,
)

from warp_core.basis import build_bases
from warp_core.data import batches, encode_examples, pad_token_id
from warp_core.importance import importance_scores, masks_from_importance
from warp_core.memory import reset_peak
from warp_core.model import find_targets
from warp_core.spec import DEFAULT_TARGET_MODULES, Hyperparameters
from warp_core.testing import tiny_tokenizer


def rotation_seconds(targets: list[Any], bases: Any) -> float:
    """Time of one `I += |G U|` pass over every target (what Phase 2 pays per batch)."""
    grads = {t.name: torch.randn(t.weight.shape) for t in targets}
    scores = {t.name: torch.zeros(t.weight.shape) for t in targets}
    start = time.perf_counter()
    for target in targets:
        scores[target.name].add_((grads[target.name] @ bases.for_target(target)).abs_())
    return time.perf_counter() - start


def child(ns: argparse.Namespace) -> dict[str, Any]:
    """Phases 1 and 2 on the first `ns.examples` safety rows, timed and memory-metered."""
    if ns.threads:
        torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(Path(ns.workdir) / "tokenizer")
    model = build_model(tokenizer, model_size(ns))
    targets = find_targets(model, list(DEFAULT_TARGET_MODULES))
    hp = Hyperparameters(max_length=ns.max_length)
    encoded, dropped = encode_examples(tokenizer, safety_examples(limit=ns.examples), hp.max_length)
    pad = pad_token_id(tokenizer)
    basis_batches = list(batches(encoded, hp.basis_batch_size, pad))
    importance_batches = list(batches(encoded, hp.importance_batch_size, pad))
    tokens = sum(int(b["attention_mask"].sum()) for b in basis_batches)
    label_tokens = sum(int((b["labels"] != -100).sum()) for b in basis_batches)

    gc.collect()
    start_1 = memory_mib()
    peak_reset = reset_peak()
    marks: list[float] = []
    meter = LoadMeter()
    began = time.perf_counter()
    bases = build_bases(
        model, targets, basis_batches, on_batch=lambda: marks.append(time.perf_counter())
    )
    ended = time.perf_counter()
    load_1 = meter.mark()
    end_1 = memory_mib()
    moments_mib = sum(u.nbytes for u in bases.U.values()) / 2**20

    gc.collect()
    start_2 = memory_mib()
    reset_peak()
    meter.mark()
    began_2 = time.perf_counter()
    scores = importance_scores(model, targets, bases, importance_batches)
    masks = masks_from_importance(scores, hp.keep_ratio, hp.mask_scope)
    ended_2 = time.perf_counter()
    load_2 = meter.mark()
    end_2 = memory_mib()
    frozen = sum(int(m.sum()) for m in masks.values())
    scores_mib = sum(s.nbytes for s in scores.values()) / 2**20
    rotation = statistics.median(rotation_seconds(targets, bases) for _ in range(3))

    return {
        "examples": len(encoded),
        "dropped": dropped,
        "tokens": tokens,
        "label_tokens": label_tokens,
        "phase1": {
            "seconds": ended - began,
            "moments_seconds": marks[-1] - began,
            "eigh_seconds": ended - marks[-1],
            "batches": len(basis_batches),
            "rss_start": start_1["rss"],
            "peak": end_1["peak"],
            "bases_mib": moments_mib,
            "cpu": load_1["cpu"],
            "others": load_1["others"],
        },
        "phase2": {
            "seconds": ended_2 - began_2,
            "batches": len(importance_batches),
            "rss_start": start_2["rss"],
            "peak": end_2["peak"],
            "scores_mib": scores_mib,
            "rotation_per_batch": rotation,
            "frozen": frozen,
            "cpu": load_2["cpu"],
            "others": load_2["others"],
        },
        "peak_reset": peak_reset,
        "threads": torch.get_num_threads(),
        "trainable": sum(t.weight.numel() for t in targets),
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares `y = a + b x`: returns `(a, b)`."""
    if len(xs) < 2:
        return float("nan"), float("nan")
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def report(ns: argparse.Namespace, results: list[dict[str, Any]], vocab: int) -> str:
    """Two tables (Phase 1, Phase 2; medians over repeats) and fits of time on tokens."""
    by_size: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_size.setdefault(r["examples"], []).append(r)

    def med(runs: list[dict[str, Any]], phase: str, key: str) -> float:
        return statistics.median(r[phase][key] for r in runs)

    def added(runs: list[dict[str, Any]], phase: str) -> float:
        return statistics.median(r[phase]["peak"] - r[phase]["rss_start"] for r in runs)

    rows_1, rows_2, tokens, seconds_1, seconds_2 = [], [], [], [], []
    for examples in sorted(by_size):
        runs = by_size[examples]
        k = runs[0]["tokens"] / 1000
        tokens.append(runs[0]["tokens"])
        seconds_1.append(med(runs, "phase1", "seconds"))
        seconds_2.append(med(runs, "phase2", "seconds"))
        rows_1.append(
            [
                examples,
                runs[0]["tokens"],
                runs[0]["phase1"]["batches"],
                f"{seconds_1[-1]:.2f}",
                f"{med(runs, 'phase1', 'moments_seconds'):.2f}",
                f"{med(runs, 'phase1', 'eigh_seconds'):.2f}",
                f"{med(runs, 'phase1', 'moments_seconds') / k:.3f}",
                f"{med(runs, 'phase1', 'peak'):.0f}",
                f"{added(runs, 'phase1'):.0f}",
                f"{med(runs, 'phase1', 'others'):.2f}",
            ]
        )
        rows_2.append(
            [
                examples,
                runs[0]["tokens"],
                runs[0]["phase2"]["batches"],
                f"{seconds_2[-1]:.2f}",
                f"{seconds_2[-1] / k:.3f}",
                f"{statistics.median(r['phase2']['rotation_per_batch'] for r in runs):.3f}",
                f"{med(runs, 'phase2', 'peak'):.0f}",
                f"{added(runs, 'phase2'):.0f}",
                f"{med(runs, 'phase2', 'others'):.2f}",
            ]
        )
    a1, b1 = fit([float(t) for t in tokens], seconds_1)
    a2, b2 = fit([float(t) for t in tokens], seconds_2)
    first = results[0]
    hp = Hyperparameters()
    info = machine()
    retried = sum(r.get("attempts", 1) - 1 for r in results)
    repeats = min(len(runs) for runs in by_size.values())
    return "\n".join(
        [
            f"model: {model_size(ns).describe(vocab)}; "
            f"{first['trainable'] / 1e6:.2f}M target weights, fp32",
            f"safety data: do-not-answer rows [0, n), max_length {ns.max_length}; "
            f"basis batch {hp.basis_batch_size}, importance batch {hp.importance_batch_size}, "
            f"keep_ratio {hp.keep_ratio} per {hp.mask_scope}; medians of {repeats} repeats",
            f"machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']}, "
            f"{first['threads']} torch threads, load average at end {info['loadavg']}; "
            f"{retried} run(s) repeated because other processes used > {ns.busy} cores",
            "" if first["peak_reset"] else "WARNING: could not reset VmHWM between phases",
            "Phase 1 (build_bases):",
            markdown_table(
                [
                    "examples",
                    "tokens",
                    "batches",
                    "seconds",
                    "moments s",
                    "eigh s",
                    "moments s per 1k tokens",
                    "peak RSS MiB",
                    "added MiB",
                    "others' load",
                ],
                rows_1,
            ),
            f"fit: seconds = {a1:.2f} + {b1 * 1000:.3f} x (tokens / 1000); "
            f"bases held after it: {first['phase1']['bases_mib']:.0f} MiB",
            "",
            "Phase 2 (importance_scores + masks_from_importance):",
            markdown_table(
                [
                    "examples",
                    "tokens",
                    "batches",
                    "seconds",
                    "s per 1k tokens",
                    "rotation (G U) s per batch",
                    "peak RSS MiB",
                    "added MiB",
                    "others' load",
                ],
                rows_2,
            ),
            f"fit: seconds = {a2:.2f} + {b2 * 1000:.3f} x (tokens / 1000); "
            f"scores held: {first['phase2']['scores_mib']:.0f} MiB",
        ]
    )


def measure(script: Path, argv: list[str], busy: float, attempts: int = 2) -> dict[str, Any]:
    """Run one child; run it again (once) if other processes disturbed it."""
    for attempt in range(1, attempts + 1):
        result = run_child(script, argv)
        result["attempts"] = attempt
        if max(result["phase1"]["others"], result["phase2"]["others"]) <= busy:
            break
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument(
        "--examples",
        type=int,
        nargs="+",
        default=[32, 64, 128],
        help="safety-set sizes to measure (default 32 64 128; the slice has 300 rows)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per size (default 2)")
    parser.add_argument(
        "--busy",
        type=float,
        default=None,
        help="re-run a child once when other processes used more than this many cores "
        "during a phase (default: idle cores + 0.3)",
    )
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (256)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.busy is None:
        ns.busy = default_busy(ns.threads)
    if ns.child:
        ns.examples = ns.examples[0]
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = parse(argv)
    if ns.child:
        emit_result(child(ns))
        return
    exit_on_sigterm()
    started = time.perf_counter()
    script = Path(__file__).resolve()
    results = []
    with tempfile.TemporaryDirectory(prefix="warp-bench-") as tmp:
        tokenizer = tiny_tokenizer(ns.vocab)
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        for repeat in range(ns.repeats):
            sizes = ns.examples if repeat % 2 == 0 else ns.examples[::-1]
            for n in sizes:
                argv_child = ["--workdir", tmp, "--examples", str(n), *model_size(ns).argv()]
                argv_child += ["--max-length", str(ns.max_length), "--threads", str(ns.threads)]
                result = measure(script, argv_child, ns.busy)
                results.append(result)
                print(
                    f"repeat {repeat + 1}/{ns.repeats}: {n} examples, {result['tokens']} tokens: "
                    f"phase 1 {result['phase1']['seconds']:.1f} s, "
                    f"phase 2 {result['phase2']['seconds']:.1f} s "
                    f"[{time.perf_counter() - started:.0f} s]",
                    file=sys.stderr,
                )
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))
    print(report(ns, results, len(tokenizer)))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
