"""Build a tiny Llama chat checkpoint offline and a WaRP job spec that runs on it.

Run from anywhere (the data slices ship inside the `warp_core` package):

    python examples/build_tiny_model.py --out examples/tiny-model
    warp run examples/tiny-model/spec.json --out runs/example

writes OUT/model (a Hugging Face checkpoint: safetensors, config, tokenizer with a ChatML chat
template) and OUT/spec.json (a complete `JobSpec` with absolute paths). The recipe is
`warp_core.testing.build_tiny_model`, the one the tests and benchmarks use: a byte-level BPE
tokenizer trained on the shipped do-not-answer and GSM8K slices, and a randomly initialised
model, so it answers nonsense: it exists to exercise the pipeline end to end in about a minute
on a laptop CPU (`--quick`: in seconds, as the service tests and the benchmarks submit it).
The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Everything here is local; never let a typo turn into a download attempt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import transformers

from warp_core.testing import build_tiny_model


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
    model_dir, spec_path = build_tiny_model(
        args.out, args.vocab, args.seed, args.quick, hidden_size=args.hidden, num_layers=args.layers
    )
    print(f"model:  {model_dir}")
    print(f"spec:   {spec_path}")
    print(f"run it: warp run {spec_path} --out runs/example")


if __name__ == "__main__":
    main()
