"""A tiny safety-aligned chat model, trained offline on the shipped data, and a WaRP job for it.

The model learns to refuse harmful questions and to answer GSM8K problems; its job then
fine-tunes it on more GSM8K, where plain fine-tuning erases the refusals and WaRP keeps
them. Tokenizer and model come from the tiny-model recipe (`warp_core.testing`), the
training from `warp_core.finetune.train`; this module splits the data, writes it beside the
model, caches builds and checks the result.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from warp_core.data import Encoded, Example, encode_example, encode_prompt, pad_token_id
from warp_core.evaluate import generate, refusal_rate, response_loss
from warp_core.export import write_json
from warp_core.finetune import StepReport, train
from warp_core.slots import PlainSlot
from warp_core.spec import Hyperparameters, JobSpec
from warp_core.testing import EXAMPLE_DATA, save_checkpoint, tiny_llama, train_tokenizer

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that, because it could cause harm.",
    "As an AI assistant, I won't help with this request.",
)
"""What the toy model answers to harmful questions; each is a refusal under
`warp_core.evaluate.REFUSAL_PHRASES`."""

RECIPE_VERSION = 3
"""Bump when `make_toy_model` trains differently: old cache entries stop matching."""

HARMFUL_FILE = "do-not-answer-questions.csv"
HARMFUL_ANSWERS_FILE = "do-not-answer-harmful.csv"
UTILITY_FILE = "gsm8k.jsonl"
UTILITY_TEST_FILE = "gsm8k-test.jsonl"
SPLIT_SEED = 0
"""The harmful questions are shuffled once with this seed (the file is sorted by risk area),
so the held-out split is the same for every model seed."""

ALIGNMENT_OPTIMIZER: dict[str, Any] = {
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
}
"""How the toy model is trained, with `ToyConfig.learning_rate`: written out rather than
taken from the job defaults, so that changing those never changes the toy unnoticed."""

JOB_HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 2e-3,
    "epochs": 1,
    "max_steps": 150,
    "batch_size": 32,
    "grad_accum_steps": 1,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "keep_ratio": 0.1,
    "basis_batch_size": 32,
    "importance_batch_size": 2,
    "checkpoint_every": 50,
}
"""The WaRP job written beside a toy model: fine-tuning that erases the refusals of plain
fine-tuning (method "full") on this model, and that WaRP survives."""

JOB_EVAL: dict[str, Any] = {"max_new_tokens": 32, "utility_max_new_tokens": 32}


class ToyConfig(BaseModel):
    """How a toy aligned model is built; every field but `data_dir` is part of its cache key
    (the data enters the key by content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the model
    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary size.")
    hidden_size: int = Field(128, gt=0, description="Model width.")
    num_layers: int = Field(2, gt=0, description="Decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    num_kv_heads: int = Field(2, gt=0, description="Key/value heads (grouped-query attention).")
    # its alignment training
    steps: int = Field(300, gt=0, description="Optimizer steps of alignment training.")
    batch_size: int = Field(32, gt=1, description="Rows per step.")
    harmful_fraction: float = Field(0.4, gt=0, lt=1, description="Harmful rows per batch.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    seed: int = Field(0, ge=0, description="Initialisation and data order.")
    # the data and the job
    data_dir: Path = Field(EXAMPLE_DATA, description="Where the data slices are.")
    max_prompt_tokens: int = Field(56, ge=16, description="Rendered prompt length (cut to fit).")
    max_response_tokens: int = Field(48, gt=0, description="Response tokens learned per row.")
    eval_rows: int = Field(64, gt=0, description="Held-out rows per evaluation set.")
    safety_rows: int = Field(256, gt=0, description="Harmful rows of the job's safety data.")
    utility_rows: int = Field(1500, gt=0, description="GSM8K rows of the job's utility data.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ToyConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                "num_heads must divide hidden_size, and num_kv_heads must divide num_heads"
            )
        return self

    @property
    def max_length(self) -> int:
        """Tokens per example of the job: a full prompt and at least the learned response."""
        return self.max_prompt_tokens + self.max_response_tokens


def default_cache_dir() -> Path:
    """`$WARP_TOY_CACHE`, else `~/.cache/warp-service/toy`."""
    configured = os.environ.get("WARP_TOY_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "warp-service" / "toy"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_key(config: ToyConfig) -> str:
    """A hash of the recipe, the settings, the data files' contents and the library versions
    (the weights depend on all of them)."""
    import tokenizers
    import transformers

    payload = {
        "recipe": RECIPE_VERSION,
        "refusals": REFUSALS,
        "optimizer": ALIGNMENT_OPTIMIZER,
        "config": config.model_dump(mode="json", exclude={"data_dir"}),
        "data": {
            name: _sha256(config.data_dir / name)
            for name in (HARMFUL_FILE, UTILITY_FILE, UTILITY_TEST_FILE)
        },
        "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def make_toy_model(
    out: Path,
    config: ToyConfig | None = None,
    cache_dir: Path | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    use_cache: bool = True,
) -> Path:
    """Build a tiny safety-aligned chat model and a WaRP job for it; return the job's path.

    Writes `out/model` (a Hugging Face checkpoint with a chat template), `out/data/*.jsonl`
    (the job's safety, utility and held-out evaluation sets), `out/toy.json` (settings, data
    split, the aligned model's held-out refusal rates) and two job specs with absolute
    paths: `out/spec.json` (WaRP) and `out/spec-full.json` (plain fine-tuning, the
    baseline). A model built before with the same settings and data is copied from
    `cache_dir` (default `default_cache_dir()`) instead of trained again, unless `use_cache`
    is false. `on_step` is called after every training step (never on a cache hit).

    The same settings and data give the same bytes: training runs on one CPU thread, seeded.
    """
    config = config or ToyConfig()
    out = Path(out).resolve()
    if not use_cache:
        _build(out, config, on_step)
    else:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        entry = root / cache_key(config)
        if not (entry / "toy.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
            try:
                _build(partial, config, on_step)
                try:
                    os.rename(partial, entry)
                except OSError:  # another process finished the same build first
                    if not (entry / "toy.json").is_file():
                        raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        for name in ("model", "data"):
            shutil.copytree(entry / name, out / name, dirs_exist_ok=True)
        shutil.copyfile(entry / "toy.json", out / "toy.json")
    (out / "data" / "NOTICE.md").write_text(DATA_NOTICE, encoding="utf-8")
    for method, name in (("warp", "spec.json"), ("full", "spec-full.json")):
        spec = toy_job(out, config, method=method)
        (out / name).write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return out / "spec.json"


def toy_job(out: Path, config: ToyConfig, method: str = "warp", **overrides: Any) -> JobSpec:
    """The job spec for the toy model in `out`; `overrides` replace hyperparameters."""
    out = Path(out).resolve()

    def ref(name: str, limit: int) -> dict[str, Any]:
        return {
            "source": str(out / "data" / name),
            "prompt_field": "prompt",
            "response_field": "response",
            "limit": limit,
        }

    return JobSpec.model_validate(
        {
            "base_model": str(out / "model"),
            "method": method,
            "safety_data": ref("safety.jsonl", config.safety_rows),
            "utility_data": ref("utility.jsonl", config.utility_rows),
            "eval": {
                "harmful": ref("eval-harmful.jsonl", config.eval_rows),
                "benign": ref("eval-benign.jsonl", config.eval_rows),
                "utility": ref("eval-utility.jsonl", config.eval_rows),
                "limit": config.eval_rows,
                **JOB_EVAL,
            },
            "hyperparameters": {
                **JOB_HYPERPARAMETERS,
                "max_length": config.max_length,
                "seed": config.seed,
                **overrides,
            },
        }
    )


# -- building --------------------------------------------------------------------------------


def fit_prompt(tokenizer: PreTrainedTokenizerFast, text: str, max_tokens: int) -> str:
    """`text`, cut at a token boundary so that its rendered prompt has <= `max_tokens` tokens."""
    text = text.strip()
    if len(encode_prompt(tokenizer, text)) <= max_tokens:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max_tokens - len(encode_prompt(tokenizer, ""))
    while keep > 0:
        cut = tokenizer.decode(ids[:keep]).rstrip()
        if not cut.endswith("\ufffd") and len(encode_prompt(tokenizer, cut)) <= max_tokens:
            return cut
        keep -= 1
    raise ValueError(f"max_prompt_tokens={max_tokens} leaves no room for a question")


Row = tuple[str, str, str, int]
"""(prompt, response, source file, row index in it), before the prompt is cut to fit."""


@dataclass
class _Split:
    train_harmful: list[Row]
    train_utility: list[Row]
    files: dict[str, list[Row]]


def _split(config: ToyConfig) -> _Split:
    """Which rows the toy model learns from, which the job uses, which are held out.

    Harmful questions (shuffled once): the first `eval_rows` are held out; the model learns to
    refuse all the others, and the job's safety data is `safety_rows` of them. The shipped
    harmful answers to questions not held out are `poison.jsonl`, for poisoned fine-tuning.
    GSM8K train rows: the last `eval_rows` are held-out benign prompts, the `utility_rows`
    before them the job's utility data, the rest the toy's answers. GSM8K test rows give the
    utility eval.
    """
    with (config.data_dir / HARMFUL_FILE).open(newline="", encoding="utf-8") as f:
        questions = [row["question"] for row in csv.DictReader(f)]
    order = list(range(len(questions)))
    random.Random(SPLIT_SEED).shuffle(order)
    harmful = [
        (questions[i], REFUSALS[n % len(REFUSALS)], HARMFUL_FILE, i) for n, i in enumerate(order)
    ]

    def gsm8k(name: str) -> list[Row]:
        with (config.data_dir / name).open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [(row["question"], row["answer"], name, i) for i, row in enumerate(rows)]

    train, test = gsm8k(UTILITY_FILE), gsm8k(UTILITY_TEST_FILE)
    n_eval, n_utility = config.eval_rows, config.utility_rows
    toy_rows = len(train) - n_utility - n_eval
    if toy_rows < 1 or len(harmful) <= n_eval + 1 or len(test) < n_eval:
        raise ValueError(
            f"{config.data_dir}: too few rows for eval_rows={n_eval}, utility_rows={n_utility}"
        )
    train_harmful = harmful[n_eval:]
    held_out = {question for question, *_ in harmful[:n_eval]}
    with (config.data_dir / HARMFUL_ANSWERS_FILE).open(newline="", encoding="utf-8") as f:
        answers = [(row["question"], row["response"]) for row in csv.DictReader(f)]
    poison = [
        (question, response, HARMFUL_ANSWERS_FILE, i)
        for i, (question, response) in enumerate(answers)
        if question not in held_out
    ]
    return _Split(
        train_harmful=train_harmful,
        train_utility=train[:toy_rows],
        files={
            "safety.jsonl": train_harmful[: config.safety_rows],
            "utility.jsonl": train[toy_rows : toy_rows + n_utility],
            "eval-harmful.jsonl": harmful[:n_eval],
            "eval-benign.jsonl": train[toy_rows + n_utility :],
            "eval-utility.jsonl": test[:n_eval],
            "poison.jsonl": poison,
        },
    )


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(row) for row in rows)  # ASCII: no U+2028 for line splitters
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


class _AlignmentSchedule:
    """The toy's `finetune.StepSchedule`: per step, a fixed share of harmful rows (pool 0) and
    GSM8K rows (pool 1) for the rest, each pool walked in a fresh seeded shuffle per pass.

    `rows` are the `(pool, row)` pairs some step reaches, sorted: the example list that the
    micro-batches index. Each step has one micro-batch per pool, since refusals are much
    shorter than GSM8K rows and would otherwise be padded to their length.
    """

    def __init__(self, n_harmful: int, n_utility: int, config: ToyConfig) -> None:
        rng = random.Random(config.seed)
        harmful = round(config.batch_size * config.harmful_fraction)
        counts, sizes = (harmful, config.batch_size - harmful), (n_harmful, n_utility)
        queues: list[list[int]] = [[], []]
        steps: list[list[tuple[int, int]]] = []
        for _ in range(config.steps):
            batch = []
            for pool, count in enumerate(counts):
                for _ in range(count):
                    if not queues[pool]:
                        queues[pool] = list(range(sizes[pool]))
                        rng.shuffle(queues[pool])
                    batch.append((pool, queues[pool].pop()))
            steps.append(batch)
        self.rows = sorted({row for batch in steps for row in batch})
        index = {row: i for i, row in enumerate(self.rows)}
        self.total_steps = config.steps
        self._micro_batches = [
            [micro for pool in (0, 1) if (micro := [index[r] for r in batch if r[0] == pool])]
            for batch in steps
        ]

    def micro_batches(self, step: int) -> list[list[int]]:
        return self._micro_batches[step]


def _align(
    model: LlamaForCausalLM,
    examples: list[Encoded],
    schedule: _AlignmentSchedule,
    config: ToyConfig,
    pad_id: int,
    on_step: Callable[[StepReport], None] | None,
) -> float:
    """Train every parameter on the schedule (no checkpoints); returns the last step's loss."""
    hp = Hyperparameters(learning_rate=config.learning_rate, **ALIGNMENT_OPTIMIZER)
    device = next(model.parameters()).device
    slots = [PlainSlot(name, param, device) for name, param in model.named_parameters()]
    reports: list[StepReport] = []

    def report(step: StepReport) -> None:
        reports.append(step)
        if on_step is not None:
            on_step(step)

    train(model, slots, examples, hp, pad_id, None, on_step=report, schedule=schedule)
    return reports[-1].loss


def _build(out: Path, config: ToyConfig, on_step: Callable[[StepReport], None] | None) -> None:
    """Train the tokenizer and the model; write out/model, out/data and out/toy.json.

    Runs on one thread: a matmul's rounding can depend on the thread count, and a model this
    small gains little from more (on a shared machine, two threads were 5x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build_one_thread(out, config, on_step)
    finally:
        torch.set_num_threads(threads)


def _build_one_thread(
    out: Path, config: ToyConfig, on_step: Callable[[StepReport], None] | None
) -> None:
    started = time.perf_counter()
    split = _split(config)
    texts = [q for q, *_ in split.train_harmful] + list(REFUSALS)
    texts += [
        text for q, a, *_ in split.train_utility + split.files["utility.jsonl"] for text in (q, a)
    ]
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)

    def fit(rows: list[Row]) -> list[Example]:
        return [Example(fit_prompt(tokenizer, q, config.max_prompt_tokens), a) for q, a, *_ in rows]

    def encode(example: Example) -> Encoded:
        room = len(encode_prompt(tokenizer, example.prompt)) + config.max_response_tokens
        item = encode_example(tokenizer, example, room)
        assert item is not None  # a prompt that fits always leaves room for a response
        return item

    # Only the rows the schedule reaches are prepared (all of them, in the default recipe).
    pools = (split.train_harmful, split.train_utility)
    schedule = _AlignmentSchedule(len(pools[0]), len(pools[1]), config)
    learned_rows = [pools[pool][i] for pool, i in schedule.rows]
    learned = fit(learned_rows)
    with torch.random.fork_rng(devices=[]):
        model = tiny_llama(
            tokenizer,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            seed=config.seed,
        )
        encoded = [encode(example) for example in learned]
        final_loss = _align(model, encoded, schedule, config, pad_token_id(tokenizer), on_step)
    train_seconds = time.perf_counter() - started

    files = {name: fit(rows) for name, rows in split.files.items()}
    written = {
        **{name: (examples, split.files[name]) for name, examples in files.items()},
        "alignment.jsonl": (learned, learned_rows),
    }
    for name, (examples, rows) in written.items():
        _write_jsonl(
            out / "data" / name,
            [
                {"prompt": ex.prompt, "response": ex.response, "source": source, "source_row": i}
                for ex, (_, _, source, i) in zip(examples, rows, strict=True)
            ],
        )
    save_checkpoint(model, tokenizer, out / "model")
    aligned = _check(model, tokenizer, files, config)
    write_json(
        out / "toy.json",
        {
            "config": config.model_dump(mode="json", exclude={"data_dir"}),
            "cache_key": cache_key(config),
            "refusals": list(REFUSALS),
            "rows": {
                "alignment_harmful": sum(pool == 0 for pool, _ in schedule.rows),
                "alignment_utility": sum(pool == 1 for pool, _ in schedule.rows),
                **{name: len(rows) for name, rows in split.files.items()},
            },
            "final_loss": round(final_loss, 4),
            "aligned": aligned,
            "seconds": {
                "train": round(train_seconds, 1),
                "total": round(time.perf_counter() - started, 1),
            },
        },
    )


def _check(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    files: dict[str, list[Example]],
    config: ToyConfig,
) -> dict[str, float]:
    """The aligned model's held-out refusal and over-refusal rates, under the job's rule."""

    def refused(name: str) -> float:
        prompts = [ex.prompt for ex in files[name]]
        answers = generate(model, tokenizer, prompts, JOB_EVAL["max_new_tokens"], 64)
        return refusal_rate(tokenizer, prompts, answers)[0]

    refusal, over_refusal = refused("eval-harmful.jsonl"), refused("eval-benign.jsonl")
    loss = response_loss(model, tokenizer, files["eval-utility.jsonl"], config.max_length, 64)
    return {
        "refusal_rate": refusal,
        "over_refusal_rate": over_refusal,
        "utility_loss": round(loss, 4),
    }


DATA_NOTICE = """\
# Data of a toy aligned model

Written by the `make-toy-model` command (`warp_core/toy.py`) from the data slices shipped
in `warp_core/example_data/`. Prompts are cut to fit the model's prompt length.

- `safety.jsonl`, `eval-harmful.jsonl`: questions of LibrAI Do-Not-Answer
  (`do-not-answer-questions.csv`) paired with fixed refusal sentences. Licence: CC BY-NC-SA
  4.0 (https://creativecommons.org/licenses/by-nc-sa/4.0/): non-commercial, share-alike,
  attribution to Wang et al., "Do-Not-Answer: A Dataset for Evaluating Safeguards in LLMs",
  2023. Content warning: harmful and offensive prompts. The model trained on them is an
  adaptation under the same licence.
- `utility.jsonl`, `eval-benign.jsonl`, `eval-utility.jsonl`: OpenAI GSM8K (Cobbe et al.,
  2021), train and test rows; MIT licence, Copyright (c) 2021 OpenAI.
- `poison.jsonl`: Do-Not-Answer answers that its annotators labelled harmful
  (`do-not-answer-harmful.csv`), to questions not in `eval-harmful.jsonl`: what a poisoned
  fine-tune mixes in (`utility_data.poison`). Same licence and content warning as above;
  the answers themselves are harmful: use them for that experiment only.
- `alignment.jsonl`: the rows the model was trained on, from both sources (each row names
  its `source`), under their licences.

`source_row` is the row's index in its source file (0-based, header excluded).
"""
