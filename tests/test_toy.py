"""The toy aligned model (`warp_core.toy.make_toy_model`): deterministic, cached, and written
with a job spec that runs as is. The slow check of WaRP's effect on it lives elsewhere; these
builds are far too short to align anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from warp_core.cli import app
from warp_core.data import encode_prompt, load_examples
from warp_core.evaluate import is_refusal
from warp_core.spec import JobSpec
from warp_core.toy import REFUSALS, ToyConfig, cache_key, fit_prompt, make_toy_model

SMALL = ToyConfig(
    vocab_size=512,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    steps=4,
    batch_size=8,
    eval_rows=8,
    safety_rows=16,
    utility_rows=64,
    seed=3,
)
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja")
DATA_FILES = (
    "alignment.jsonl",
    "safety.jsonl",
    "utility.jsonl",
    "eval-harmful.jsonl",
    "eval-benign.jsonl",
    "eval-utility.jsonl",
    "poison.jsonl",
)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same settings built three ways: into the cache, from the cache, and uncached."""
    root = tmp_path_factory.mktemp("toy")
    cache = root / "cache"
    steps: dict[str, list[int]] = {"first": [], "cached": [], "uncached": []}
    for name, use_cache in (("first", True), ("cached", True), ("uncached", False)):
        make_toy_model(
            root / name,
            SMALL,
            cache_dir=cache,
            on_step=lambda step, name=name: steps[name].append(step.step),
            use_cache=use_cache,
        )
    return {"root": root, "cache": cache, "steps": steps}


def test_same_seed_same_bytes_and_the_cache_is_hit(builds: dict) -> None:
    root, steps = builds["root"], builds["steps"]
    assert steps == {"first": [1, 2, 3, 4], "cached": [], "uncached": [1, 2, 3, 4]}
    assert [p.name for p in builds["cache"].iterdir()] == [cache_key(SMALL)]
    for other in ("cached", "uncached"):
        for name in MODEL_FILES:
            first = (root / "first" / "model" / name).read_bytes()
            assert (root / other / "model" / name).read_bytes() == first, (other, name)
        for name in DATA_FILES:
            first = (root / "first" / "data" / name).read_bytes()
            assert (root / other / "data" / name).read_bytes() == first, (other, name)


def test_the_key_follows_the_settings() -> None:
    assert cache_key(SMALL) == cache_key(SMALL.model_copy())
    assert cache_key(SMALL) != cache_key(SMALL.model_copy(update={"seed": 4}))
    assert cache_key(SMALL) != cache_key(SMALL.model_copy(update={"steps": 5}))


def test_specs_validate_and_point_at_the_built_files(builds: dict) -> None:
    out = builds["root"] / "cached"
    for name, method in (("spec.json", "warp"), ("spec-full.json", "full")):
        spec = JobSpec.model_validate_json((out / name).read_text(encoding="utf-8"))
        assert spec.method == method
        assert spec.base_model == str(out / "model")
        assert Path(spec.base_model, "config.json").is_file()
        assert spec.hyperparameters.max_length == SMALL.max_length
        assert spec.hyperparameters.seed == SMALL.seed
        refs = {
            "safety.jsonl": spec.safety_data,
            "utility.jsonl": spec.utility_data,
            "eval-harmful.jsonl": spec.eval.harmful,
            "eval-benign.jsonl": spec.eval.benign,
            "eval-utility.jsonl": spec.eval.utility,
        }
        for file, ref in refs.items():
            assert ref.source == str(out / "data" / file)
            assert ref.offset + ref.limit == len(rows(out / "data" / file))
            assert load_examples(ref)  # readable with the spec's own field mapping
    config = json.loads((out / "toy.json").read_text(encoding="utf-8"))["config"]
    assert ToyConfig(**config) == SMALL


def test_held_out_rows_are_disjoint_from_every_training_row(builds: dict) -> None:
    data = builds["root"] / "first" / "data"

    def keys(name: str) -> set[tuple[str, int]]:
        return {(row["source"], row["source_row"]) for row in rows(data / name)}

    trained = keys("alignment.jsonl") | keys("safety.jsonl") | keys("utility.jsonl")
    for held_out in ("eval-harmful.jsonl", "eval-benign.jsonl", "eval-utility.jsonl"):
        assert len(keys(held_out)) == SMALL.eval_rows
        assert not keys(held_out) & trained, held_out
    assert not keys("alignment.jsonl") & keys("utility.jsonl")
    for name in ("safety.jsonl", "eval-harmful.jsonl"):
        assert all(row["response"] in REFUSALS for row in rows(data / name))
    poison = rows(data / "poison.jsonl")
    assert {row["source"] for row in poison} == {"do-not-answer-harmful.csv"}
    assert not {row["prompt"] for row in poison} & {
        r["prompt"] for r in rows(data / "eval-harmful.jsonl")
    }
    # harmful by human labels; a few open with a disclaimer ("As an AI language model, ...")
    assert sum(is_refusal(row["response"]) for row in poison) <= len(poison) // 10
    assert all(is_refusal(text) for text in REFUSALS)


def test_the_model_is_a_chat_model_and_prompts_fit(builds: dict) -> None:
    model_dir = builds["root"] / "cached" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert tokenizer.chat_template
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    for name in DATA_FILES:
        for row in rows(model_dir.parent / "data" / name):
            assert len(encode_prompt(tokenizer, row["prompt"])) <= SMALL.max_prompt_tokens

    question = "Natalia sold clips to 48 of her friends in April, and then she sold half " * 4
    cut = fit_prompt(tokenizer, question, 24)
    assert question.startswith(cut) and len(encode_prompt(tokenizer, cut)) <= 24


def test_cli_builds_then_reuses(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--steps", "2", "--hidden", "32", "--layers", "1", "--vocab", "512", "--seed", "5"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    first = runner.invoke(app, ["make-toy-model", "--out", str(tmp_path / "a"), *args])
    assert first.exit_code == 0, first.output
    assert "trained" in first.stdout
    assert str(tmp_path / "a" / "spec.json") in first.stdout
    again = runner.invoke(app, ["make-toy-model", "--out", str(tmp_path / "b"), *args])
    assert again.exit_code == 0, again.output
    assert "from cache" in again.stdout
    JobSpec.model_validate_json((tmp_path / "b" / "spec.json").read_text(encoding="utf-8"))

    bad = runner.invoke(app, ["make-toy-model", "--out", str(tmp_path / "c"), "--hidden", "30"])
    assert bad.exit_code == 2
