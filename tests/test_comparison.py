"""What `warp compare` and `GET /v1/compare` put side by side, and what they call each job."""

from __future__ import annotations

from warp_core.comparison import comparison_markdown, comparison_specs, labels, variant

SPEC = {"method": "warp", "hyperparameters": {"keep_ratio": 0.1, "learning_rate": 1e-3}}


def metrics(refusal: float, loss: float) -> dict:
    before = {"refusal_rate": 1.0, "over_refusal_rate": 0.05, "utility_loss": 4.0}
    return {"before": before, "after": {**before, "refusal_rate": refusal, "utility_loss": loss}}


def test_comparison_specs_change_only_the_method_or_the_mask():
    specs = comparison_specs(SPEC, ablations=True)
    assert [variant(s) for s in specs] == ["warp", "full", "warp, no mask", "warp, random mask"]
    for spec in specs:
        hp = spec["hyperparameters"]
        changed = {k for k, v in hp.items() if SPEC["hyperparameters"].get(k) != v}
        assert changed <= {"keep_ratio", "mask_strategy"}
        assert spec["hyperparameters"]["learning_rate"] == 1e-3
    assert specs[3]["hyperparameters"]["mask_strategy"] == "random"
    assert SPEC["hyperparameters"] == {"keep_ratio": 0.1, "learning_rate": 1e-3}, "not mutated"
    assert len(comparison_specs(SPEC)) == 2


def test_labels_add_the_id_only_where_a_variant_repeats():
    jobs = [("aaaaaaaa1", SPEC), ("bbbbbbbb2", {**SPEC, "method": "full"}), ("cccccccc3", SPEC)]
    assert labels(jobs) == ["warp aaaaaaaa", "full", "warp cccccccc"]


def test_markdown_has_a_row_per_job_and_the_share_of_the_utility_gain():
    text = comparison_markdown([("warp", metrics(0.98, 3.1)), ("full", metrics(0.0, 3.0))])
    lines = text.splitlines()
    assert lines[0].startswith("| job | refusal rate")
    assert "| warp | 1.000 -> 0.980 |" in text and "| full | 1.000 -> 0.000 |" in text
    assert "GSM8K" not in text, "metrics no job reported are left out"
    assert lines[-1] == "- warp: refusal rate 0.98 (full: 0.00), 90% of full's utility-loss drop."


def test_markdown_without_a_full_job_has_no_verdict():
    text = comparison_markdown([("warp", metrics(0.98, 3.1))])
    assert text.splitlines()[-1].startswith("| warp |")
