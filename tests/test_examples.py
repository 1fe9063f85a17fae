"""The shipped data slices and their notices, and the examples/ folder: the tiny-model builder
and the job spec."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import REPO
from warp_core.spec import XSTEST_PROMPTS, DatasetRef, JobSpec
from warp_core.testing import EXAMPLE_DATA

EXAMPLES = REPO / "examples"
SHARED_DATA = REPO.parent / "shared" / "data"
SLICE_SUFFIXES = (".csv", ".jsonl")
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_script(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def count_rows(path: Path) -> int:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return sum(1 for _ in csv.DictReader(f))
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if json.loads(line) is not None)


def readme_table() -> dict[str, tuple[int, str]]:
    """file -> (rows, link target of the licence cell) from the slices' README.md."""
    table = {}
    for line in (EXAMPLE_DATA / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].endswith(SLICE_SUFFIXES):
            link = re.search(r"\]\(([^)]+)\)", cells[3])
            assert link, f"licence cell of {cells[0]} links to no notice: {cells[3]!r}"
            table[cells[0]] = (int(cells[1]), link.group(1))
    return table


def dataset_refs(spec: JobSpec) -> list[DatasetRef]:
    """The sets the spec names itself (XSTest, the default benign and contrast sets, is named
    by its installed path)."""
    refs = [spec.safety_data, spec.utility_data, spec.eval.harmful, spec.eval.benign]
    refs = [ref for ref in [*refs, spec.eval.contrast, spec.eval.utility] if ref is not None]
    return [ref for ref in refs if ref.source != str(XSTEST_PROMPTS)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "build"
    result = run_script(EXAMPLES / "build_tiny_model.py", "--out", out, cwd=out.parent)
    assert str(out / "model") in result.stdout
    assert str(out / "spec.json") in result.stdout
    return out


def test_checkpoint_loads_as_a_chat_model(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built / "model", local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(built / "model", local_files_only=True)
    assert tokenizer.chat_template
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.vocab_size == len(tokenizer) <= 1024
    assert (
        model.config.eos_token_id
        == tokenizer.eos_token_id
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_built_spec_is_valid_and_points_at_existing_files(built: Path) -> None:
    spec = JobSpec.model_validate_json((built / "spec.json").read_text(encoding="utf-8"))
    assert spec.base_model == str((built / "model").resolve())
    assert Path(spec.base_model, "config.json").is_file()
    assert spec.method == "warp"
    assert (spec.safety_data.preset, spec.safety_data.limit) == ("do-not-answer", 200)
    assert (spec.utility_data.preset, spec.utility_data.limit) == ("gsm8k", 256)
    assert (spec.eval.limit, spec.eval.max_new_tokens, spec.eval.utility_max_new_tokens) == (
        16,
        32,
        64,
    )
    hp = spec.hyperparameters
    assert (hp.max_length, hp.batch_size, hp.grad_accum_steps, hp.epochs) == (256, 8, 2, 1)
    assert (hp.learning_rate, hp.keep_ratio, hp.checkpoint_every) == (1e-3, 0.1, 8)
    assert hp.importance_batch_size == 2
    for ref in dataset_refs(spec):
        path = Path(ref.source)
        assert path.is_absolute() and path.is_file() and path.parent == EXAMPLE_DATA
        # Every slice, held-out ones included, is really there: none comes up short.
        assert ref.limit is not None
        assert ref.offset + ref.limit <= count_rows(path), ref


def test_build_is_deterministic(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run_script(EXAMPLES / "build_tiny_model.py", "--out", again, "--seed", "0")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / "model" / name).read_bytes() == (built / "model" / name).read_bytes(), name


def test_example_spec_is_the_built_job_with_repo_relative_paths(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    raw = json.loads((EXAMPLES / "spec.json").read_text(encoding="utf-8"))
    spec = JobSpec.model_validate(raw)
    assert spec.base_model == "examples/tiny-model/model"
    for ref in dataset_refs(spec):
        assert not Path(ref.source).is_absolute()
        assert ref.source.startswith("warp_core/example_data/")
        assert (REPO / ref.source).is_file(), ref.source
        assert ref.is_local

    def relative(spec_json: str) -> JobSpec:
        spec_json = spec_json.replace(json.dumps(str(EXAMPLE_DATA))[1:-1], "warp_core/example_data")
        spec_json = spec_json.replace(
            json.dumps(str((built / "model").resolve()))[1:-1], "examples/tiny-model/model"
        )
        return JobSpec.model_validate_json(spec_json)

    # Both name the default XSTest sets by their installed path, made relative here alike.
    assert relative(spec.model_dump_json()) == relative((built / "spec.json").read_text())


def test_readme_table_matches_the_slices() -> None:
    table = readme_table()
    slices = sorted(p.name for p in EXAMPLE_DATA.iterdir() if p.suffix in SLICE_SUFFIXES)
    assert sorted(table) == slices
    for name, (rows, _) in table.items():
        assert count_rows(EXAMPLE_DATA / name) == rows, name
    size = sum(p.stat().st_size for p in EXAMPLE_DATA.iterdir())
    assert size < 2_200_000  # toy model data included


def test_each_slice_has_its_notice() -> None:
    for name, (_, notice) in readme_table().items():
        stem = name.removesuffix(Path(name).suffix).removesuffix("-test")
        assert notice == f"{stem}.NOTICE.md", name
        text = (EXAMPLE_DATA / notice).read_text(encoding="utf-8")
        assert name in text, f"{notice} does not mention {name}"
    dna = (EXAMPLE_DATA / "do-not-answer.NOTICE.md").read_text(encoding="utf-8")
    for needed in (
        "LibrAI",
        "Wang",
        "CC BY-NC-SA 4.0",
        "https://creativecommons.org/licenses/by-nc-sa/4.0/",
        "NonCommercial",
        "ShareAlike",
        "Content warning",
        "kunishou/do-not-answer-ja",
    ):
        assert needed in dna, needed
    assert "MIT License" in (EXAMPLE_DATA / "gsm8k.LICENSE").read_text(encoding="utf-8")
    assert "CC BY 4.0" in (EXAMPLE_DATA / "mbpp.NOTICE.md").read_text(encoding="utf-8")


def test_slice_contents() -> None:
    with (EXAMPLE_DATA / "do-not-answer.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [
        "id",
        "risk_area",
        "types_of_harm",
        "specific_harms",
        "question",
        "llama2-7b-chat_response",
    ]
    assert all(row["question"] and row["llama2-7b-chat_response"] for row in rows)
    with (EXAMPLE_DATA / "mbpp.jsonl").open(encoding="utf-8") as f:
        assert [json.loads(line)["task_id"] for line in f] == list(range(601, 701))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")
def test_slices_are_reproducible(tmp_path: Path) -> None:
    run_script(EXAMPLES / "make_data_slices.py", "--src", SHARED_DATA, "--out", tmp_path)
    made = sorted(p.name for p in tmp_path.iterdir())
    # xstest_prompts.csv is no slice: the whole file, checked against the shared copy in
    # tests/test_suites.py.
    slices = [name for name in readme_table() if name != "xstest_prompts.csv"]
    assert made == sorted([*slices, "gsm8k.LICENSE"])
    for name in made:
        assert (tmp_path / name).read_bytes() == (EXAMPLE_DATA / name).read_bytes(), name
