"""The job spec: documented defaults, presets inferred from Hub ids, default held-out eval sets,
readable validation errors and a lossless JSON round trip. Nothing here loads a dataset or a
model: Hub ids are only checked by validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from warp_core.spec import (
    DEFAULT_TARGET_MODULES,
    REFERENCE_TARGET_MODULES,
    XSTEST_PROMPTS,
    DatasetRef,
    EvalSpec,
    Hyperparameters,
    JobSpec,
    format_validation_error,
)

SAFETY = {"source": "LibrAI/do-not-answer", "limit": 100}
UTILITY = {"source": "openai/gsm8k", "limit": 200}


def job(**overrides: Any) -> dict[str, Any]:
    """A minimal valid job spec as plain data (what the CLI and the API receive)."""
    spec: dict[str, Any] = {
        "base_model": "meta-llama/Llama-2-7b-chat-hf",
        "safety_data": dict(SAFETY),
        "utility_data": dict(UTILITY),
    }
    spec.update(overrides)
    return spec


def validation_message(data: dict[str, Any], model: type = JobSpec) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return format_validation_error(info.value)


# --- defaults -------------------------------------------------------------------------------


def test_hyperparameter_defaults_match_the_documented_ones() -> None:
    hp = Hyperparameters()
    assert hp.learning_rate == 5e-5
    assert hp.epochs == 3
    assert hp.max_steps is None
    assert hp.max_length == 1024
    assert hp.lr_scheduler == "cosine"
    assert hp.warmup_ratio == 0.1
    assert (hp.adam_beta1, hp.adam_beta2) == (0.9, 0.999)  # torch's AdamW defaults
    assert hp.max_grad_norm == 1.0
    assert hp.keep_ratio == 0.1
    assert hp.mask_scope == "module"
    assert hp.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    assert hp.target_modules == list(DEFAULT_TARGET_MODULES)
    assert hp.train_other_params is False
    assert hp.importance_batch_size == 2


def test_default_target_modules_are_not_shared_between_specs() -> None:
    first, second = Hyperparameters(), Hyperparameters()
    first.target_modules.append("extra_proj")
    assert second.target_modules == list(DEFAULT_TARGET_MODULES)


def test_job_defaults() -> None:
    spec = JobSpec.model_validate(job())
    assert spec.method == "warp"
    assert spec.hyperparameters == Hyperparameters()
    assert spec.eval.enabled is True
    assert spec.eval.limit == EvalSpec().limit


def test_reference_target_modules_are_accepted() -> None:
    spec = JobSpec.model_validate(
        job(hyperparameters={"target_modules": list(REFERENCE_TARGET_MODULES)})
    )
    assert spec.hyperparameters.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "up_proj",
        "down_proj",
    ]


def test_full_method_is_accepted() -> None:
    assert JobSpec.model_validate(job(method="full")).method == "full"


# --- dataset references and presets ---------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "preset", "config"),
    [
        ("LibrAI/do-not-answer", "do-not-answer", None),
        ("librai/do-not-answer", "do-not-answer", None),
        ("openai/gsm8k", "gsm8k", "main"),
        ("gsm8k", "gsm8k", "main"),
        ("mbpp", "mbpp", None),
        ("google-research-datasets/mbpp", "mbpp", None),
    ],
)
def test_preset_is_inferred_from_hub_id(source: str, preset: str, config: str | None) -> None:
    ref = DatasetRef(source=source)
    assert not ref.is_local
    assert ref.preset == preset
    assert ref.config == config
    assert ref.prompt_field is None and ref.response_field is None


def test_explicit_gsm8k_config_is_kept() -> None:
    assert DatasetRef(source="openai/gsm8k", config="socratic").config == "socratic"


def test_hub_id_without_preset_needs_a_prompt_field() -> None:
    message = validation_message({"source": "someone/chat-pairs"}, DatasetRef)
    assert "prompt_field" in message
    ref = DatasetRef(source="someone/chat-pairs", prompt_field="q", response_field="a")
    assert ref.preset is None and not ref.is_local


def test_a_training_set_without_responses_is_rejected_naming_the_field() -> None:
    prompts_only = {"source": "someone/prompts", "prompt_field": "q", "limit": 10}
    message = validation_message(job(utility_data=prompts_only))
    assert message.startswith("spec: utility_data: needs a response")
    assert "response_field" in message
    message = validation_message(job(safety_data={"source": "walledai/AdvBench", "limit": 5}))
    assert "safety_data: needs a response" in message and "advbench has prompts only" in message
    utility = {"source": "/data/x.csv", "preset": "xstest-safe"}
    assert "eval.utility: needs a response" in validation_message(job(eval={"utility": utility}))


@pytest.mark.parametrize("which", ["harmful", "benign", "contrast"])
def test_refusal_check_sets_need_prompts_only(which: str) -> None:
    prompts = {"source": "/data/prompts.csv", "prompt_field": "question"}
    spec = JobSpec.model_validate(job(eval={which: prompts}))
    ref = getattr(spec.eval, which)
    assert ref.response_field is None and not ref.has_responses


@pytest.mark.parametrize(
    ("source", "preset", "config"),
    [
        ("walledai/AdvBench", "advbench", None),
        ("walledai/HarmBench", "harmbench", "standard"),
        ("walledai/StrongREJECT", "strongreject", None),
    ],
)
def test_harmful_suites_are_known_by_their_hub_ids(source, preset, config) -> None:
    ref = DatasetRef(source=source)
    assert (ref.preset, ref.config, ref.split) == (preset, config, "train")
    assert not ref.has_responses
    spec = JobSpec.model_validate(job(eval={"harmful": {"source": source}}))
    assert spec.eval.harmful == ref


def test_local_file_without_preset_or_fields_is_rejected() -> None:
    message = validation_message(job(utility_data={"source": "data/pairs.csv", "limit": 10}))
    assert message.startswith("utility_data: ")
    assert "prompt_field" in message


def test_local_file_with_only_a_prompt_field_is_a_prompt_only_set() -> None:
    ref = DatasetRef(source="pairs.jsonl", prompt_field="q")
    assert ref.is_local and not ref.has_responses


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.json", "pairs.jsonl", "pairs.PARQUET"])
def test_local_file_with_fields_is_accepted(name: str) -> None:
    ref = DatasetRef(source=f"data/{name}", prompt_field="q", response_field="a")
    assert ref.is_local
    assert ref.preset is None


def test_local_file_with_explicit_preset_needs_no_fields() -> None:
    ref = DatasetRef(source="/data/gsm8k/train.jsonl", preset="gsm8k")
    assert ref.is_local
    assert ref.preset == "gsm8k"
    assert ref.config is None  # configs are for the Hub only


def test_unknown_local_suffix_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("q,a\n1,2\n")
    message = validation_message(
        job(safety_data={"source": str(path), "prompt_field": "q", "response_field": "a"})
    )
    assert message.startswith("safety_data: ")
    assert "pairs.txt" in message
    for suffix in (".csv", ".json", ".jsonl", ".parquet"):
        assert suffix in message


def test_existing_directory_is_rejected_as_a_local_source(tmp_path: Path) -> None:
    message = validation_message(
        {"source": str(tmp_path), "prompt_field": "q", "response_field": "a"}, DatasetRef
    )
    assert "must end in one of" in message


@pytest.mark.parametrize(
    "source",
    [
        "https://huggingface.co/datasets/openai/gsm8k",
        "hf://datasets/openai/gsm8k",
        "http://example.com/pairs",
    ],
)
def test_url_source_is_rejected(source: str) -> None:
    message = validation_message(
        job(utility_data={"source": source, "prompt_field": "q", "response_field": "a"})
    )
    assert message.startswith("utility_data: ")
    assert source in message


@pytest.mark.parametrize("source", ["https://example.com/pairs.csv", "s3://bucket/pairs.parquet"])
def test_url_source_with_a_file_suffix_is_rejected(source: str) -> None:
    with pytest.raises(ValidationError):
        DatasetRef(source=source, prompt_field="q", response_field="a")


@pytest.mark.parametrize(
    "base_model", ["https://huggingface.co/meta-llama/Llama-2-7b-chat-hf", "hf://org/model"]
)
def test_url_base_model_is_rejected(base_model: str) -> None:
    message = validation_message(job(base_model=base_model))
    assert message.startswith("base_model: ")
    assert "URL" in message


@pytest.mark.parametrize("base_model", ["meta-llama/Llama-2-7b-chat-hf", "./checkpoints/tiny"])
def test_hub_id_or_local_directory_base_model_is_accepted(base_model: str) -> None:
    assert JobSpec.model_validate(job(base_model=base_model)).base_model == base_model


# --- default evaluation sets ----------------------------------------------------------------


def test_default_eval_sets_follow_the_training_slices() -> None:
    spec = JobSpec.model_validate(
        job(
            safety_data={**SAFETY, "offset": 10},
            utility_data={**UTILITY, "offset": 5},
            eval={"limit": 20},
        )
    )
    harmful, utility = spec.eval.harmful, spec.eval.utility
    assert harmful is not None and utility is not None
    assert (harmful.source, harmful.offset, harmful.limit) == ("LibrAI/do-not-answer", 110, 20)
    assert harmful.preset == "do-not-answer"
    assert (utility.source, utility.offset, utility.limit) == ("openai/gsm8k", 205, 20)
    assert (utility.preset, utility.config, utility.split) == ("gsm8k", "main", "train")
    # The training slices themselves are untouched.
    assert (spec.safety_data.offset, spec.safety_data.limit) == (10, 100)
    assert (spec.utility_data.offset, spec.utility_data.limit) == (5, 200)


def test_default_eval_limit_is_used() -> None:
    spec = JobSpec.model_validate(job())
    assert spec.eval.harmful is not None and spec.eval.utility is not None
    assert (spec.eval.harmful.offset, spec.eval.harmful.limit) == (100, EvalSpec().limit)
    assert (spec.eval.utility.offset, spec.eval.utility.limit) == (200, EvalSpec().limit)


def test_default_over_refusal_and_contrast_sets_are_xstest_shipped_with_warp_core() -> None:
    spec = JobSpec.model_validate(job())
    benign, contrast = spec.eval.benign, spec.eval.contrast
    assert benign == DatasetRef(source=str(XSTEST_PROMPTS), preset="xstest-safe")
    assert contrast == DatasetRef(source=str(XSTEST_PROMPTS), preset="xstest-unsafe")
    assert XSTEST_PROMPTS.is_file()
    # The recorded spec names them, so spec.json says what was run.
    dumped = spec.model_dump()["eval"]
    assert (dumped["benign"]["preset"], dumped["contrast"]["preset"]) == (
        "xstest-safe",
        "xstest-unsafe",
    )


@pytest.mark.parametrize("which", ["safety_data", "utility_data"])
def test_missing_training_limit_without_eval_sets_is_an_error(which: str) -> None:
    data = job()
    del data[which]["limit"]
    message = validation_message(data)
    assert "eval" in message
    assert "limit" in message
    assert data[which]["source"] in message


def test_explicit_eval_sets_are_kept() -> None:
    harmful = {"source": "/data/harmful.csv", "prompt_field": "q", "response_field": "a"}
    benign = {"source": "mbpp", "offset": 10, "limit": 7}
    utility = {"source": "openai/gsm8k", "split": "test", "limit": 30}
    spec = JobSpec.model_validate(
        job(
            safety_data={"source": "LibrAI/do-not-answer"},  # no limit: nothing held out
            utility_data={"source": "openai/gsm8k"},
            eval={"harmful": harmful, "benign": benign, "utility": utility},
        )
    )
    assert spec.eval.harmful == DatasetRef(**harmful)
    assert spec.eval.benign == DatasetRef(**benign)
    assert spec.eval.utility == DatasetRef(**utility)
    assert spec.eval.utility is not None and spec.eval.utility.split == "test"


def test_explicit_benign_set_is_the_default_utility_set() -> None:
    benign = {"source": "mbpp", "offset": 500, "limit": 10}
    spec = JobSpec.model_validate(job(utility_data={"source": "mbpp"}, eval={"benign": benign}))
    assert spec.eval.benign == DatasetRef(**benign)
    assert spec.eval.utility == spec.eval.benign


def test_a_prompt_only_benign_set_leaves_the_utility_default_to_the_training_slice() -> None:
    benign = {"source": "/data/xstest.csv", "preset": "xstest-safe"}
    spec = JobSpec.model_validate(job(eval={"benign": benign}))
    assert spec.eval.utility == spec.utility_data.following(spec.eval.limit)


def test_disabled_eval_needs_no_limits() -> None:
    spec = JobSpec.model_validate(
        job(
            safety_data={"source": "LibrAI/do-not-answer"},
            utility_data={"source": "openai/gsm8k"},
            eval={"enabled": False},
        )
    )
    assert spec.eval.enabled is False
    assert spec.eval.harmful is None and spec.eval.benign is None and spec.eval.utility is None


# --- validation errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        (
            {"hyperparameters": {"learning_rate": -1e-5}},
            "hyperparameters.learning_rate",
            "greater than 0",
        ),
        ({"hyperparameters": {"keep_ratio": 1.5}}, "hyperparameters.keep_ratio", "less than 1"),
        ({"hyperparameters": {"adam_beta2": 1.0}}, "hyperparameters.adam_beta2", "less than 1"),
        (
            {"hyperparameters": {"adam_beta1": -0.1}},
            "hyperparameters.adam_beta1",
            "greater than or equal to 0",
        ),
        (
            {"hyperparameters": {"warmup_ratio": 2}},
            "hyperparameters.warmup_ratio",
            "less than or equal to 1",
        ),
        (
            {"hyperparameters": {"max_length": 4}},
            "hyperparameters.max_length",
            "greater than or equal to 8",
        ),
        ({"hyperparameters": {"lr": 1e-4}}, "hyperparameters.lr", "Extra inputs are not permitted"),
        ({"epochs": 3}, "epochs", "Extra inputs are not permitted"),
        ({"method": "lora"}, "method", "'warp' or 'full'"),
        (
            {"hyperparameters": {"mask_scope": "layer"}},
            "hyperparameters.mask_scope",
            "'module' or 'global'",
        ),
        (
            {"hyperparameters": {"target_modules": ["q_proj", "v_proj", "q_proj"]}},
            "hyperparameters.target_modules",
            "duplicates",
        ),
        (
            {"hyperparameters": {"target_modules": ["model.layers.0.q_proj"]}},
            "hyperparameters.target_modules",
            "not paths",
        ),
        (
            {"hyperparameters": {"target_modules": []}},
            "hyperparameters.target_modules",
            "at least 1",
        ),
        ({"hyperparameters": {"epochs": "three"}}, "hyperparameters.epochs", "valid integer"),
        (
            {"hyperparameters": {"learning_rate": "fast"}},
            "hyperparameters.learning_rate",
            "valid number",
        ),
        (
            {"hyperparameters": {"target_modules": "q_proj"}},
            "hyperparameters.target_modules",
            "valid list",
        ),
        ({"eval": {"limit": 0}}, "eval.limit", "greater than 0"),
        (
            {"utility_data": {**UTILITY, "offset": -1}},
            "utility_data.offset",
            "greater than or equal to 0",
        ),
        ({"base_model": ""}, "base_model", "at least 1 character"),
    ],
)
def test_validation_error_names_field_and_reason(
    overrides: dict[str, Any], field: str, reason: str
) -> None:
    message = validation_message(job(**overrides))
    lines = message.splitlines()
    assert len(lines) == 1, message
    where, _, why = lines[0].partition(": ")
    assert where == field
    assert reason in why
    assert not why.startswith("Value error")


def test_missing_required_fields_are_each_named() -> None:
    message = validation_message({"base_model": "m"})
    assert message.splitlines() == ["safety_data: Field required", "utility_data: Field required"]


def test_every_problem_gets_its_own_line() -> None:
    message = validation_message(
        job(hyperparameters={"learning_rate": 0, "keep_ratio": -0.1, "epochs": 0}, method="x")
    )
    fields = [line.partition(": ")[0] for line in message.splitlines()]
    assert sorted(fields) == sorted(
        [
            "method",
            "hyperparameters.learning_rate",
            "hyperparameters.keep_ratio",
            "hyperparameters.epochs",
        ]
    )


def test_spec_level_error_is_labelled_spec() -> None:
    data = job()
    del data["safety_data"]["limit"]
    assert validation_message(data).startswith("spec: eval: ")


# --- JSON round trip ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        job(),
        job(
            method="full",
            safety_data={"source": "/data/refusals.csv", "preset": "do-not-answer", "limit": 64},
            utility_data={
                "source": "/data/pairs.parquet",
                "prompt_field": "instruction",
                "response_field": "output",
                "offset": 3,
                "limit": 40,
            },
            eval={"limit": 8, "max_new_tokens": 32, "utility": {"source": "mbpp", "limit": 5}},
            hyperparameters={
                "learning_rate": 2e-5,
                "max_steps": 10,
                "max_grad_norm": None,
                "keep_ratio": 0.0,
                "mask_scope": "global",
                "target_modules": list(REFERENCE_TARGET_MODULES),
                "train_other_params": True,
                "dtype": "bfloat16",
            },
        ),
        job(eval={"enabled": False}, utility_data={"source": "openai/gsm8k"}),
    ],
)
def test_spec_round_trips_through_json(data: dict[str, Any]) -> None:
    spec = JobSpec.model_validate(data)
    text = spec.model_dump_json()
    again = JobSpec.model_validate_json(text)
    assert again == spec
    assert again.model_dump_json() == text
