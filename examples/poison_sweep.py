"""WaRP against plain fine-tuning on poisoned data, on the toy aligned model.

The harmful fine-tuning papers (Vaccine, Lisa, Booster) mix a share of harmful requests with
compliant answers into the user's fine-tuning data and ask whether the model's refusals
survive. This runs that on the toy: for each seed, the toy aligned model (`make-toy-model`,
cached), then its WaRP and plain jobs with `utility_data.poison` at each ratio, the poison
being the toy's `data/poison.jsonl` (Do-Not-Answer answers labelled harmful, to questions
not in the held-out harmful set), every job also asked the held-out harmful questions under
each jailbreak template of `warp_core.attacks`. It prints a Markdown table per seed and the
mean over seeds, and writes `results.json` to `--out`.

Run from the repository root (about 1 minute per job on one core; finished jobs are kept):

    python examples/poison_sweep.py --out runs/poison --seeds 0,1,2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from warp_core.attacks import ATTACKS, attack_metric
from warp_core.pipeline import run
from warp_core.spec import JobSpec
from warp_core.toy import ToyConfig, make_toy_model, toy_job

COLUMNS = {
    "refusal_rate": "refusal",
    "contrast_refusal_rate": "XSTest unsafe",
    **{attack_metric(name): name.replace("_", " ") for name in ATTACKS},
    "worst_attack_refusal_rate": "worst attack",
    "over_refusal_rate": "over-refusal",
    "utility_loss": "utility loss",
}
"""Figures after fine-tuning: refusal rates on the held-out harmful questions (plain, then
under each attack), on XSTest's unsafe prompts, over-refusal on held-out GSM8K questions."""


def poisoned_job(toy: Path, seed: int, method: str, ratio: float, utility_rows: int) -> JobSpec:
    """The toy's job with `utility_rows` utility rows, `ratio` of them poison, and attacks."""
    raw = toy_job(toy, ToyConfig(seed=seed), method=method).model_dump(mode="json")
    raw["utility_data"]["limit"] = utility_rows
    raw["utility_data"]["poison"] = {
        "source": str(toy / "data" / "poison.jsonl"),
        "prompt_field": "prompt",
        "response_field": "response",
        "ratio": ratio,
    }
    raw["eval"]["attacks"] = ["all"]
    return JobSpec.model_validate(raw)


def sweep(ns: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for seed in ns.seeds:
        toy = ns.out / f"toy-{seed}"
        make_toy_model(toy, ToyConfig(seed=seed))
        for ratio in ns.ratios:
            for method in ("warp", "full"):
                out = ns.out / f"seed{seed}-{method}-{ratio:g}"
                print(f"seed {seed}, {method}, poison ratio {ratio:g} -> {out}", flush=True)
                spec = poisoned_job(toy, seed, method, ratio, ns.utility_rows)
                metrics = run(spec, out)
                key = f"{seed}/{method}/{ratio:g}"
                results[key] = {"before": metrics["before"], "after": metrics["after"]}
    return results


def table(rows: dict[str, dict[str, float]], title: str) -> str:
    """One row per (method, ratio): the after-fine-tuning figures."""
    lines = [
        f"{title}",
        "",
        "| poison ratio | method | " + " | ".join(COLUMNS.values()) + " |",
        "| ---: | --- |" + " ---: |" * len(COLUMNS),
    ]
    for label, after in rows.items():
        method, ratio = label.split("/")
        cells = " | ".join(f"{after[key]:.3f}" for key in COLUMNS)
        lines.append(f"| {ratio} | {method} | {cells} |")
    return "\n".join(lines)


def report(results: dict[str, Any], ns: argparse.Namespace) -> str:
    parts = []
    for seed in ns.seeds:
        before = results[f"{seed}/warp/{ns.ratios[0]:g}"]["before"]
        aligned = ", ".join(f"{COLUMNS[k]} {before[k]:.3f}" for k in COLUMNS)
        rows = {
            f"{m}/{r:g}": results[f"{seed}/{m}/{r:g}"]["after"]
            for r in ns.ratios
            for m in ("warp", "full")
        }
        parts.append(table(rows, f"Seed {seed} (aligned model: {aligned}):"))
    means = {
        f"{m}/{r:g}": {
            k: mean(results[f"{s}/{m}/{r:g}"]["after"][k] for s in ns.seeds) for k in COLUMNS
        }
        for r in ns.ratios
        for m in ("warp", "full")
    }
    parts.append(table(means, f"Mean over seeds {', '.join(map(str, ns.seeds))}:"))
    return "\n\n".join(parts)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/poison"))
    p.add_argument("--seeds", default="0", help="toy model and job seeds, comma-separated (0)")
    p.add_argument("--ratios", default="0,0.05,0.1,0.2", help="poison ratios (0,0.05,0.1,0.2)")
    p.add_argument(
        "--utility-rows", type=int, default=480, help="utility rows, poison included (480)"
    )
    ns = p.parse_args(argv)
    ns.seeds = [int(s) for s in ns.seeds.split(",")]
    ns.ratios = [float(r) for r in ns.ratios.split(",")]
    ns.out = ns.out.resolve()
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = parse(argv)
    torch.set_num_threads(1)
    results = sweep(ns)
    ns.out.mkdir(parents=True, exist_ok=True)
    settings = {"seeds": ns.seeds, "ratios": ns.ratios, "utility_rows": ns.utility_rows}
    (ns.out / "results.json").write_text(json.dumps({"settings": settings, "jobs": results}))
    print("\n" + report(results, ns))


if __name__ == "__main__":
    main()
