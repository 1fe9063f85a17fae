"""Which model and data sources a server running other people's jobs may read."""

from __future__ import annotations

import os

import pytest

from service.sources import problem, source_problems
from warp_core.spec import EXAMPLE_DATA, XSTEST_PROMPTS, JobSpec


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "allowed" / "model").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", tmp_path / "allowed" / "escape")
    return tmp_path / "allowed"


@pytest.mark.parametrize("hub_id", ["gpt2", "openai/gsm8k", "meta-llama/Llama-2-7b-chat-hf"])
def test_hub_ids_are_accepted(hub_id, root):
    assert problem(hub_id, [root]) is None and problem(hub_id, []) is None


@pytest.mark.parametrize(
    "source", ["https://example.com/m", "s3://bucket/model", "file:///etc/passwd", "hf://x/y"]
)
def test_urls_of_any_scheme_are_refused(source, root):
    assert "URLs are not accepted" in problem(source, [root])


def test_absolute_paths_must_really_lie_under_a_root(root):
    assert problem(str(root / "model"), [root]) is None
    assert "outside the allowed roots" in problem(str(root / ".." / "secret"), [root])
    assert "outside the allowed roots" in problem(str(root / "escape"), [root]), "symlink"
    assert "outside the allowed roots" in problem("/etc", [root])
    assert "accepts no local paths" in problem(str(root / "model"), [])


@pytest.mark.parametrize("source", ["./model", "../model", "a/b/c", "~/model", "owner/../x"])
def test_relative_paths_are_refused_naming_the_allowed_roots(source, root):
    assert "neither a Hub id (owner/name) nor an absolute path" in problem(source, [root])
    assert f"WARP_DATA_ROOTS: {root}" in problem(source, [root])
    assert "WARP_DATA_ROOTS is empty" in problem(source, [])


def test_a_local_file_name_is_not_taken_for_a_hub_id(root):
    assert "neither a Hub id" in problem("rows.jsonl", [root], local_file=True)


def test_every_field_is_named(root):
    spec = JobSpec.model_validate(
        {
            "base_model": "/etc/model",
            "safety_data": {"source": "LibrAI/do-not-answer", "limit": 8},
            "utility_data": {
                "source": "rows.jsonl",
                "prompt_field": "q",
                "response_field": "a",
                "limit": 8,
            },
            "eval": {"utility": {"source": "file:abc", "prompt_field": "q", "response_field": "a"}},
        }
    )
    fields = [p["field"] for p in source_problems(spec, [root])]
    assert fields == ["base_model", "utility_data.source"]


def test_the_data_shipped_with_warp_core_is_readable_whatever_the_roots(root):
    spec = JobSpec.model_validate(
        {
            "base_model": "gpt2",
            "safety_data": {"source": "LibrAI/do-not-answer", "limit": 8},
            "utility_data": {"source": "openai/gsm8k", "limit": 8},
        }
    )
    assert spec.eval.benign is not None and spec.eval.benign.source == str(XSTEST_PROMPTS)
    assert source_problems(spec, [root]) == [] and source_problems(spec, []) == []
    assert problem(str(EXAMPLE_DATA / "do-not-answer.csv"), []) is None
    assert "outside the allowed roots" in problem(str(EXAMPLE_DATA / ".." / "spec.py"), [root])
