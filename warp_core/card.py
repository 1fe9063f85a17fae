"""The model card (`README.md`) of every exported model, written from what the job ran.

The seed of this project was a card filled in from a fixed template: it named another base
model and phases that never ran on its checkpoint. Here every statement comes from the spec
as run (`spec.json`) and from what was measured, in `metrics.json`'s shape (`facts`): the
final model's card from `metrics.json` itself, an intermediate model's from its step's
metrics. What was not measured is said to be missing, never filled in. Every figure goes
through `figure`, so a test can hold each one against its source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from warp_core.comparison import METRICS, variant

TAGS = {
    "warp": ["warp", "safety", "weight-space-rotation", "fine-tuned"],
    "full": ["full-fine-tuning", "baseline", "fine-tuned"],
}
"""Hub tags per method: only a WaRP model says `warp` and `safety`."""

DATA_ROLES = (
    ("safety_data", "safety: basis and importance (what is protected)"),
    ("utility_data", "utility: fine-tuning"),
    ("utility_data.poison", "poison: harmful answers mixed into the fine-tuning data"),
    ("validation_data", "validation loss during fine-tuning"),
    ("eval.harmful", "evaluation: harmful prompts (refusal rate)"),
    ("eval.benign", "evaluation: benign prompts (over-refusal)"),
    ("eval.contrast", "evaluation: unsafe contrast prompts (contrast refusal rate)"),
    ("eval.utility", "evaluation: utility"),
)
"""Every dataset a job can read (`JobSpec.dataset_refs`), in the order the card lists them."""


def figure(value: float | int) -> str:
    """How the card writes a number: integers whole, other values to 4 significant digits."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def model_card(
    spec: dict[str, Any], facts: dict[str, Any], checkpoint_step: int | None = None
) -> str:
    """The card of the final model (`checkpoint_step` None; `facts` is `metrics.json`) or of
    the intermediate one exported after `checkpoint_step` optimizer steps (`facts` in
    `metrics.json`'s shape, `training` holding that step's figures, no evaluation)."""
    sections = [
        _front_matter(spec, facts),
        _title(spec, facts, checkpoint_step),
        _method(spec, facts),
        _data(facts),
        _evaluation(spec, facts, checkpoint_step),
        _usage(),
    ]
    return "\n\n".join(sections) + "\n"


def _front_matter(spec: dict[str, Any], facts: dict[str, Any]) -> str:
    """Hugging Face's YAML metadata; strings as JSON, which YAML reads unchanged."""
    datasets = [
        _dataset_name(record["source"])
        for where, record in facts["data"].items()
        if where in ("safety_data", "utility_data", "utility_data.poison")
    ]
    lines = ["---", f"base_model: {json.dumps(spec['base_model'])}", "datasets:"]
    lines += [f"- {json.dumps(name)}" for name in dict.fromkeys(datasets)]
    lines += ["tags:", *(f"- {tag}" for tag in TAGS[spec["method"]])]
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "---"]
    return "\n".join(lines)


def _dataset_name(source: str) -> str:
    """A Hub id as it is, a local file by its name (its path says nothing to a reader)."""
    return Path(source).name if source.startswith(("/", ".", "~")) else source


def _title(spec: dict[str, Any], facts: dict[str, Any], step: int | None) -> str:
    method = "WaRP" if spec["method"] == "warp" else "plain fine-tuning"
    title = f"# `{spec['base_model']}` fine-tuned with {method}"
    produced = f"Produced by warp-service, run `{facts['run_id']}`."
    if step is None:
        return f"{title}\n\n{produced} This is the job's final model."
    training = facts["training"]
    return (
        f"{title}: intermediate checkpoint\n\n{produced} This model is the state after "
        f"{figure(step)} of {figure(training['total_steps'])} optimizer steps; the job's final "
        "model is in its `model/` directory."
    )


def _method(spec: dict[str, Any], facts: dict[str, Any]) -> str:
    hp = spec["hyperparameters"]
    training = facts["training"]
    targets = ", ".join(f"`{name}`" for name in hp["target_modules"])
    rows = [("method", _method_name(spec))]
    if spec["method"] == "warp":
        rows += [
            ("protected targets", targets),
            (
                "keep ratio (share of each target's rotated coefficients frozen)",
                figure(hp["keep_ratio"]),
            ),
            ("mask", f"{hp['mask_strategy']}, {hp['mask_scope']} scope"),
        ]
    else:
        rows.append(("trained targets", targets))
    rows += [
        ("other parameters", "trained, unprotected" if hp["train_other_params"] else "frozen"),
        (
            "learning rate",
            f"{figure(hp['learning_rate'])}, `{hp['lr_scheduler']}` schedule, "
            f"warmup ratio {figure(hp['warmup_ratio'])}",
        ),
        ("optimizer steps", figure(training["steps"])),
        (
            "sequences per step",
            f"{figure(hp['batch_size'])} per micro-batch, "
            f"{figure(hp['grad_accum_steps'])} micro-batches",
        ),
        ("max length (tokens)", figure(hp["max_length"])),
        ("training examples", figure(training["examples"])),
        *_poison_rows(spec, facts),
        ("tokens trained", figure(training["trained_tokens"])),
        ("processes", figure(facts["world_size"])),
        ("seed", figure(hp["seed"])),
        ("training loss, last step", _maybe(training["train_loss"])),
        ("validation loss, last step", _validation(training)),
    ]
    table = ["| setting | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    return "## Method\n\n" + "\n".join(table)


def _poison_rows(spec: dict[str, Any], facts: dict[str, Any]) -> list[tuple[str, str]]:
    """How much of the fine-tuning data was harmful on purpose (`utility_data.poison`)."""
    poison = spec["utility_data"].get("poison")
    if not poison:
        return []
    mixed = facts["data"]["utility_data.poison"]["rows"]
    utility = facts["data"]["utility_data"]["rows"]
    return [
        (
            "poisoned fine-tuning data",
            f"ratio {figure(poison['ratio'])}: {figure(mixed)} harmful answers among "
            f"{figure(mixed + utility)} utility rows",
        )
    ]


def _method_name(spec: dict[str, Any]) -> str:
    if spec["method"] == "full":
        return "plain fine-tuning of the same parameters (the baseline: nothing is protected)"
    return (
        f"WaRP (`{variant(spec)}`): weight space rotation, training only the coefficients "
        "that carry the least of the base model's refusals, in a rotated basis"
    )


def _maybe(value: float | None) -> str:
    return "not measured" if value is None else figure(value)


def _validation(training: dict[str, Any]) -> str:
    if training["valid_loss"] is None:
        return "not taken (the job had no validation data)"
    return figure(training["valid_loss"])


def _data(facts: dict[str, Any]) -> str:
    """Every dataset the job read, with its rows and, for a local file, its digest."""
    lines = [
        "## Data",
        "",
        "| role | source | first row | rows | `sha256` |",
        "| --- | --- | --- | --- | --- |",
    ]
    for where, role in DATA_ROLES:
        record = facts["data"].get(where)
        if record is None:
            continue
        digest = f"`{record['sha256']}`" if record["sha256"] else "(Hub dataset)"
        lines.append(
            f"| {role} | `{_dataset_name(record['source'])}` | {figure(record['offset'])} | "
            f"{figure(record['rows'])} | {digest} |"
        )
    return "\n".join(lines)


def _evaluation(spec: dict[str, Any], facts: dict[str, Any], step: int | None) -> str:
    if step is not None:
        return (
            "## Evaluation\n\nThis intermediate checkpoint was not evaluated: the before/after "
            "evaluation runs on the final model only."
        )
    if not spec["eval"]["enabled"]:
        return "## Evaluation\n\nNot evaluated: the job ran with its evaluation turned off."
    before, after = facts["before"], facts["after"]
    if not before or not after:
        return (
            "## Evaluation\n\nNot evaluated yet: the job evaluates this model after writing it, "
            "and then writes this card again with the results."
        )
    rows = [
        f"| {name} ({hint}) | {figure(before[key])} | {figure(after[key])} |"
        for key, name, hint in METRICS
        if before.get(key) is not None and after.get(key) is not None
    ]
    return "\n".join(
        [
            "## Evaluation",
            "",
            "Measured on the held-out sets above, on the base model (before) and on this "
            "model (after). Utility loss is the mean response-token loss.",
            "",
            "| metric | before | after |",
            "| --- | --- | --- |",
            *rows,
            "",
            f"How refusals were judged (judge `{facts['refusal_judge']['name']}`):",
            "",
            f"> {facts['refusal_rule']}",
        ]
    )


def _usage() -> str:
    return "\n".join(
        [
            "## Use",
            "",
            "An ordinary Hugging Face checkpoint: no project code is needed to load it.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            "```",
        ]
    )
