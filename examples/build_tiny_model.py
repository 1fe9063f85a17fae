"""Build a tiny Llama chat checkpoint offline and a WaRP job spec that runs on it.

Run from anywhere (the data slices are found next to this script):

    python examples/build_tiny_model.py --out examples/tiny-model
    warp run examples/tiny-model/spec.json --out runs/example

writes OUT/model (a Hugging Face checkpoint: safetensors, config, tokenizer with a ChatML chat
template) and OUT/spec.json (a complete `JobSpec` with absolute paths). The tokenizer is a
byte-level BPE trained on the prompts and responses of the example slices; the model is
randomly initialised, so it answers nonsense: it exists to exercise the pipeline end to end
in about a minute on a laptop CPU (`--quick`: in seconds, as the service tests and the
benchmarks submit it). The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

# Everything here is local; never let a typo turn into a download attempt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import transformers

from warp_core.data import load_examples
from warp_core.spec import DatasetRef, JobSpec
from warp_core.toy import save_checkpoint, tiny_llama, train_tokenizer

DATA_DIR = Path(__file__).resolve().parent / "data"

SAFETY_FILE = "do-not-answer.csv"
UTILITY_FILE = "gsm8k.jsonl"
UTILITY_TEST_FILE = "gsm8k-test.jsonl"
TOKENIZER_CORPUS = (
    (SAFETY_FILE, "do-not-answer"),
    (UTILITY_FILE, "gsm8k"),
    ("mbpp.jsonl", "mbpp"),
)
"""Slices whose prompts and responses train the tokenizer (the test split stays unseen)."""

HYPERPARAMETERS: dict[str, Any] = {
    # Sized for a randomly initialised 2-layer model on 2 CPU cores: 16 optimizer steps.
    "max_length": 256,
    "batch_size": 8,
    "grad_accum_steps": 2,
    "epochs": 1,
    "learning_rate": 1e-3,
    "keep_ratio": 0.1,
    "checkpoint_every": 8,
    "importance_batch_size": 2,
}


QUICK: dict[str, Any] = {
    # Seconds of work instead of a minute: what the service tests and benchmarks submit.
    "safety_data": {"limit": 32},
    "utility_data": {"limit": 64},
    "eval": {"limit": 4, "max_new_tokens": 8, "utility_max_new_tokens": 8},
    "hyperparameters": {"max_length": 192, "checkpoint_every": 2},
}


def spec_input(base_model: str, data_dir: str, seed: int = 0) -> dict[str, Any]:
    """The example job as written by hand: only the fields that differ from the defaults.

    `data_dir` is joined with "/" so that a relative `data_dir` gives portable paths.
    """

    def ref(name: str, preset: str, limit: int) -> dict[str, Any]:
        return {"source": f"{data_dir}/{name}", "preset": preset, "limit": limit}

    return {
        "base_model": base_model,
        "method": "warp",
        "safety_data": ref(SAFETY_FILE, "do-not-answer", 200),
        "utility_data": ref(UTILITY_FILE, "gsm8k", 256),
        "eval": {
            # harmful and benign default to the 16 rows after each training slice; GSM8K
            # accuracy and held-out loss come from the test split instead.
            "utility": ref(UTILITY_TEST_FILE, "gsm8k", 16),
            "limit": 16,
            "max_new_tokens": 32,
            "utility_max_new_tokens": 64,
        },
        "hyperparameters": {**HYPERPARAMETERS, "seed": seed},
    }


def training_texts(data_dir: Path) -> list[str]:
    """Prompts and responses as the pipeline loads them (MBPP prompts include the tests)."""
    texts = []
    for name, preset in TOKENIZER_CORPUS:
        for example in load_examples(DatasetRef(source=str(data_dir / name), preset=preset)):
            texts.extend((example.prompt, example.response))
    return texts


def quick(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` cut down to QUICK (the eval section is replaced, not merged)."""
    return {
        **spec,
        "safety_data": {**spec["safety_data"], **QUICK["safety_data"]},
        "utility_data": {**spec["utility_data"], **QUICK["utility_data"]},
        "eval": QUICK["eval"],
        "hyperparameters": {**spec["hyperparameters"], **QUICK["hyperparameters"]},
    }


def build(
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 1024,
    seed: int = 0,
    fast: bool = False,
) -> tuple[Path, Path]:
    """Write OUT/model and OUT/spec.json (cut down to QUICK if `fast`); return both paths."""
    out = out.resolve()
    tokenizer = train_tokenizer(training_texts(DATA_DIR), vocab_size=vocab)
    model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, seed=seed)
    model_dir = save_checkpoint(model, tokenizer, out / "model")
    spec_dict = spec_input(str(model_dir), str(DATA_DIR), seed)
    spec = JobSpec.model_validate(quick(spec_dict) if fast else spec_dict)
    spec_path = out / "spec.json"
    spec_path.write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return model_dir, spec_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (multiple of 4)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary size")
    parser.add_argument("--seed", type=int, default=0, help="model init and job seed")
    parser.add_argument(
        "--quick", action="store_true", help="a spec of seconds (small slices, short eval)"
    )
    args = parser.parse_args(argv)
    if args.hidden <= 0 or args.hidden % 4:
        parser.error("--hidden must be a positive multiple of 4 (4 attention heads)")
    if args.layers <= 0:
        parser.error("--layers must be positive")
    if args.vocab < 300:
        parser.error("--vocab must be at least 300 (256 bytes + special tokens + merges)")
    if args.seed < 0:
        parser.error("--seed must be non-negative")

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    model_dir, spec_path = build(
        args.out, args.hidden, args.layers, args.vocab, args.seed, args.quick
    )
    print(f"model:  {model_dir}")
    print(f"spec:   {spec_path}")
    print(f"run it: warp run {spec_path} --out runs/example")


if __name__ == "__main__":
    main()
