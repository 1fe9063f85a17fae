"""The whole job as users run it: artifacts, reload, events, resume, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import make_spec
from warp_core.attacks import ATTACKS
from warp_core.data import load_examples
from warp_core.pipeline import Cancelled, Pipeline, run
from warp_core.spec import HARMFUL_ANSWERS, XSTEST_PROMPTS, DatasetRef
from warp_core.testing import save_checkpoint, tiny_llama, xstest_slices

SMALL_EVAL = {"limit": 4, "max_new_tokens": 8, "utility_max_new_tokens": 8, **xstest_slices(4)}


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """One complete WaRP job with evaluation, shared by the artifact tests."""
    events = []
    pipeline = Pipeline(
        make_spec(model_dir, eval=SMALL_EVAL), tmp_path_factory.mktemp("job"), events.append
    )
    pipeline.run()
    return pipeline, events


def test_artifacts_follow_the_documented_format(finished):
    pipeline, _ = finished
    out = pipeline.out
    targets = json.loads((out / "warp" / "targets.json").read_text())
    bases = load_file(out / "warp" / "basis.safetensors")
    masks = load_file(out / "warp" / "masks.safetensors")
    state = pipeline.model.state_dict()
    assert set(targets) == {t.param_name for t in pipeline.targets} == set(masks)
    assert set(bases) == {entry["basis"] for entry in targets.values()}
    for name, entry in targets.items():
        assert masks[name].dtype == torch.bool and masks[name].shape == state[name].shape
        assert entry["frozen"] == int(masks[name].sum()) == round(0.1 * state[name].numel())
        assert entry["total"] == state[name].numel()
        basis = bases[entry["basis"]]
        assert basis.dtype == torch.float32 and basis.shape == (state[name].shape[1],) * 2
    assert json.loads((out / "spec.json").read_text()) == pipeline.spec.model_dump(mode="json")


def test_metrics_report_before_and_after(finished):
    pipeline, _ = finished
    metrics = json.loads((pipeline.out / "metrics.json").read_text())
    for which in ("before", "after"):
        values = metrics[which]
        assert {"refusal_rate", "over_refusal_rate", "utility_loss", "gsm8k_accuracy"} <= set(
            values
        )
        assert 0 <= values["refusal_rate"] <= 1 and values["utility_loss"] > 0
    assert metrics["after"]["utility_loss"] < metrics["before"]["utility_loss"]
    assert metrics["refusal_judge"]["name"] == "ngram"  # the default judge, by its description
    assert metrics["refusal_rule"] == metrics["refusal_judge"]["description"]
    assert set(metrics["timings"]) == {"basis", "importance", "finetune", "evaluate"}
    assert all(seconds > 0 for seconds in metrics["timings"].values())
    assert set(metrics["memory"]) == set(metrics["timings"]) and metrics["world_size"] == 1
    assert all(isinstance(peak, int) and peak >= 0 for peak in metrics["memory"].values())
    spectrum = metrics["spectrum"]
    assert set(spectrum) == set(load_file(pipeline.out / "warp" / "basis.safetensors"))
    assert all(0 < s["directions_90"] <= s["dim"] for s in spectrum.values())
    samples = json.loads((pipeline.out / "eval" / "after.json").read_text())["samples"]
    assert len(samples["harmful"]) == 4
    report = (pipeline.out / "report.md").read_text()
    assert "| refusal rate (harmful)" in report and "keep_ratio 0.1" in report


def test_a_job_measures_over_refusal_and_contrast_refusals_on_xstest(finished):
    pipeline, _ = finished
    metrics = json.loads((pipeline.out / "metrics.json").read_text())
    samples = json.loads((pipeline.out / "eval" / "after.json").read_text())["samples"]
    safe = load_examples(DatasetRef(source=str(XSTEST_PROMPTS), preset="xstest-safe", limit=4))
    unsafe = load_examples(DatasetRef(source=str(XSTEST_PROMPTS), preset="xstest-unsafe", limit=4))
    assert [s["prompt"] for s in samples["benign"]] == [e.prompt for e in safe]
    assert [s["prompt"] for s in samples["contrast"]] == [e.prompt for e in unsafe]
    for when in ("before", "after"):
        refused = json.loads((pipeline.out / "eval" / f"{when}.json").read_text())["samples"]
        rates = metrics[when]
        assert rates["over_refusal_rate"] == sum(s["refused"] for s in refused["benign"]) / 4
        assert rates["contrast_refusal_rate"] == sum(s["refused"] for s in refused["contrast"]) / 4
    assert "contrast_refusal_rate" in metrics["refusal_judge"]["rates"]
    for where, preset in (("eval.benign", "xstest-safe"), ("eval.contrast", "xstest-unsafe")):
        record = metrics["data"][where]
        assert (record["source"], record["preset"], record["rows"]) == (
            str(XSTEST_PROMPTS),
            preset,
            4,
        )
    report = (pipeline.out / "report.md").read_text()
    assert "| over-refusal (benign; default XSTest safe)" in report
    assert "| refusal (contrast; default XSTest unsafe)" in report
    card = (pipeline.out / "model" / "README.md").read_text()
    assert "refusal (contrast; default XSTest unsafe)" in card and "xstest_prompts.csv" in card
    assert (pipeline.out / "report.png").read_bytes().startswith(b"\x89PNG")


def test_exported_model_reloads_without_project_code(finished):
    pipeline, _ = finished
    reloaded = AutoModelForCausalLM.from_pretrained(pipeline.out / "model")
    tokenizer = AutoTokenizer.from_pretrained(pipeline.out / "model")
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 times 7?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pipeline.model(ids).logits)


def test_exported_update_is_zero_on_frozen_coordinates(finished, model_dir):
    """The invariant checked from the artifacts alone, as a user could."""
    out = finished[0].out
    final = load_file(out / "model" / "model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    bases = load_file(out / "warp" / "basis.safetensors")
    masks = load_file(out / "warp" / "masks.safetensors")
    for name, entry in json.loads((out / "warp" / "targets.json").read_text()).items():
        change = (final[name].double() - base[name].double()) @ bases[entry["basis"]].double()
        assert change[masks[name]].abs().max() <= 1e-6 * change.abs().max(), name


def test_events_tell_phases_and_progress(finished):
    _, events = finished
    phases = [(e.kind, e.phase) for e in events if e.kind.startswith("phase")]
    assert phases == [
        (kind, phase)
        for phase in ("evaluate", "basis", "importance", "finetune", "evaluate")
        for kind in ("phase_started", "phase_finished")
    ]
    fractions = [e.data["fraction"] for e in events if "fraction" in e.data]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    steps = [e.data for e in events if e.kind == "progress" and e.phase == "finetune"]
    assert [s["step"] for s in steps] == list(range(1, steps[-1]["total_steps"] + 1))
    assert {"loss", "learning_rate", "tokens_per_s", "eta_s", "grad_norm"} <= set(steps[0])
    assert steps[-1]["eta_s"] == 0


def test_a_cancelled_job_resumes_without_redoing_finished_phases(model_dir, tmp_path):
    spec = make_spec(model_dir)
    with pytest.raises(Cancelled):
        run(spec, tmp_path, should_stop=lambda: (tmp_path / "warp" / "basis.safetensors").exists())
    events = []
    metrics = run(spec, tmp_path, on_event=events.append)
    started = [e.phase for e in events if e.kind == "phase_started"]
    assert started == ["importance", "finetune"]
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert metrics["memory"]["basis"] is not None, "measured by the first call, kept"


def test_an_output_directory_belongs_to_one_spec(model_dir, tmp_path):
    run(make_spec(model_dir, max_steps=1), tmp_path)
    with pytest.raises(ValueError, match="different spec"):
        run(make_spec(model_dir, max_steps=2), tmp_path)


def test_plain_fine_tuning_writes_no_warp_artifacts(model_dir, tmp_path):
    metrics = run(make_spec(model_dir, method="full", max_steps=2), tmp_path)
    assert not (tmp_path / "warp").exists()
    assert metrics["spectrum"] == {} and metrics["timings"]["basis"] == 0.0
    assert metrics["memory"]["basis"] is None and metrics["memory"]["finetune"] is not None
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_a_tied_lm_head_is_untied_so_embeddings_stay_frozen(tokenizer, tmp_path):
    tied_dir = save_checkpoint(
        tiny_llama(tokenizer, tie_word_embeddings=True), tokenizer, tmp_path / "tied"
    )
    pipeline = Pipeline(make_spec(tied_dir, max_steps=2), tmp_path / "out")
    pipeline.run()
    original = AutoModelForCausalLM.from_pretrained(tied_dir).model.embed_tokens.weight
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert not exported.config.tie_word_embeddings
    assert torch.equal(exported.model.embed_tokens.weight, original)
    assert not torch.equal(exported.lm_head.weight, original)


def warp_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warp_core", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_runs_a_job(model_dir, tmp_path):
    """`warp run` on a spec with attacks and poisoned utility data: both show in its outputs."""
    spec = make_spec(model_dir, max_steps=2, eval={**SMALL_EVAL, "attacks": ["all"]})
    raw = spec.model_dump(mode="json")
    raw["utility_data"]["poison"] = {"ratio": 0.25}  # the shipped harmful answers
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(raw))
    result = warp_cli("run", str(spec_file), "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["after"]["refusal_rate"] is not None
    assert summary["after"]["worst_attack_refusal_rate"] == min(
        summary["after"][f"refusal_rate_under_{name}"] for name in ATTACKS
    )
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert (data["utility_data"]["rows"], data["utility_data.poison"]["rows"]) == (24, 8)
    assert data["utility_data.poison"]["source"] == str(HARMFUL_ANSWERS)
    assert (
        "ratio 0.25: 8 harmful answers among 32 utility rows"
        in (tmp_path / "out" / "model" / "README.md").read_text()
    )
    table = warp_cli("run", str(spec_file), "--out", str(tmp_path / "out"))
    assert table.returncode == 0 and "refusal_rate" in table.stdout and "artifacts:" in table.stdout
    assert (tmp_path / "out" / "metrics.json").exists()


def test_cli_explains_a_bad_spec(model_dir, tmp_path):
    spec = json.loads(make_spec(model_dir).model_dump_json())
    spec["hyperparameters"]["learning_rate"] = -1
    spec["hyperparameters"]["mask_scope"] = "layer"
    spec_file = tmp_path / "bad.json"
    spec_file.write_text(json.dumps(spec))
    result = warp_cli("run", str(spec_file), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "hyperparameters.learning_rate" in result.stderr
    assert "hyperparameters.mask_scope" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_fails_clearly_when_the_model_is_missing(model_dir, tmp_path):
    spec = make_spec(model_dir).model_copy(update={"base_model": str(tmp_path / "nowhere")})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    result = warp_cli("run", str(spec_file), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "job failed" in result.stderr and "nowhere" in result.stderr


def test_cli_reports_an_unreadable_spec_file(tmp_path):
    result = warp_cli("run", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "cannot read spec" in result.stderr
