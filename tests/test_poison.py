"""Poisoned fine-tuning data (`utility_data.poison`): exact counts, determinism by seed, the
shipped harmful answers, and the spec's rules."""

from __future__ import annotations

import csv

import pytest
from pydantic import ValidationError

from tests.helpers import make_spec, utility_ref
from warp_core.data import Example, load_examples, mix_poison
from warp_core.spec import HARMFUL_ANSWERS, JobSpec, Poison

CLEAN = [Example(f"q{i}", f"a{i}") for i in range(256)]
POISON = [Example(f"harm{i}", f"comply{i}") for i in range(153)]


@pytest.mark.parametrize(("ratio", "count"), [(0.0, 0), (0.05, 13), (0.1, 26), (0.2, 51)])
def test_a_ratio_replaces_that_share_of_the_rows(ratio: float, count: int) -> None:
    mixed, mixed_in = mix_poison(CLEAN, POISON, ratio, seed=0)
    assert mixed_in == count and len(mixed) == len(CLEAN)
    assert mixed[: 256 - count] == CLEAN[: 256 - count]  # the first clean rows are kept
    poison = mixed[256 - count :]
    assert all(example in POISON for example in poison)
    assert len({example.prompt for example in poison}) == count  # without replacement


def test_the_draw_is_fixed_by_the_seed() -> None:
    first, _ = mix_poison(CLEAN, POISON, 0.1, seed=3)
    assert mix_poison(CLEAN, POISON, 0.1, seed=3)[0] == first
    assert mix_poison(CLEAN, POISON, 0.1, seed=4)[0] != first


def test_too_few_poison_rows_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs 102 poison rows, but its source has 100"):
        mix_poison(CLEAN, POISON[:100], 0.4, seed=0)


def test_the_shipped_harmful_answers_are_the_default_source() -> None:
    poison = Poison(ratio=0.1)
    assert (poison.source, poison.preset) == (str(HARMFUL_ANSWERS), "do-not-answer-harmful")
    examples = load_examples(poison)
    with HARMFUL_ANSWERS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(examples) == len(rows) == 153
    assert [(e.prompt, e.response) for e in examples] == [
        (row["question"], row["response"]) for row in rows
    ]


def spec_with(model_dir, poison) -> JobSpec:
    raw = make_spec(model_dir, max_steps=1).model_dump(mode="json")
    raw["utility_data"]["poison"] = poison
    raw["eval"] = {"limit": 4}
    return JobSpec.model_validate(raw)


def test_a_poisoned_spec_lists_its_poison_and_holds_out_clean_rows(model_dir) -> None:
    spec = spec_with(model_dir, {"ratio": 0.1})
    assert ("utility_data.poison", spec.utility_data.poison) in list(spec.dataset_refs())
    assert spec.eval.utility.model_dump() == {
        **utility_ref(limit=4, offset=32),
        **{"config": None, "split": "train", "prompt_field": None, "response_field": None},
    }
    moved = spec.map_datasets(
        lambda ref: ref.model_copy(update={"source": f"/in/{ref.source[-8:]}"})
    )
    assert (
        moved.utility_data.poison.source.startswith("/in/")
        and moved.utility_data.poison.ratio == 0.1
    )
    assert moved.utility_data.source.startswith("/in/")


@pytest.mark.parametrize(
    ("poison", "where", "reason"),
    [
        ({"ratio": 1.0}, ("utility_data", "poison", "ratio"), "less than 1"),
        ({"ratio": -0.1}, ("utility_data", "poison", "ratio"), "greater than or equal to 0"),
        ({}, ("utility_data", "poison", "ratio"), "Field required"),
        (
            {"source": "x.csv", "preset": "xstest-safe", "ratio": 0.1},
            (),
            "utility_data.poison: needs a response",
        ),
    ],
)
def test_a_bad_poison_names_the_field_and_the_reason(model_dir, poison, where, reason) -> None:
    with pytest.raises(ValidationError) as error:
        spec_with(model_dir, poison)
    (entry,) = error.value.errors()
    assert entry["loc"] == where
    assert reason in entry["msg"]
