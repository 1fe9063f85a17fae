"""Which jobs answer "what does WaRP buy on this spec?", what to call them, and their numbers
side by side. Plain Python (no torch, no matplotlib), so the HTTP client starts fast.

A metric is a column only where some job has it: attacks (`eval.attacks`) add theirs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from warp_core.attacks import ATTACKS, WORST_ATTACK_METRIC, attack_metric

METRICS = (
    ("refusal_rate", "refusal rate (harmful)", "higher keeps safety"),
    ("over_refusal_rate", "over-refusal (benign; default XSTest safe)", "lower is better"),
    ("contrast_refusal_rate", "refusal (contrast; default XSTest unsafe)", "higher keeps safety"),
    (WORST_ATTACK_METRIC, "refusal (harmful, worst attack)", "higher keeps safety"),
    *(
        (attack_metric(name), f"refusal (harmful, {name.replace('_', ' ')})", "higher keeps safety")
        for name in ATTACKS
    ),
    ("utility_loss", "utility loss", "lower is better"),
    ("gsm8k_accuracy", "GSM8K accuracy", "higher is better"),
    ("mbpp_pass_at_1", "MBPP pass@1", "higher is better"),
)

Entry = tuple[str, dict[str, Any]]
"""(label, metrics.json content) of one job."""


def _value(metrics: dict[str, Any] | None, key: str) -> str:
    value = (metrics or {}).get(key)
    return "-" if value is None else f"{value:.3f}"


def variant(spec: dict[str, Any]) -> str:
    """What a job is, in a word or three: `warp`, `full`, or a WaRP ablation, with the poison
    ratio of its fine-tuning data if it has one (`full, poison 0.1`)."""
    poison = (spec.get("utility_data") or {}).get("poison")
    return _method_variant(spec) + (f", poison {poison['ratio']:g}" if poison else "")


def _method_variant(spec: dict[str, Any]) -> str:
    hp = spec.get("hyperparameters", {})
    if spec.get("method") != "warp":
        return str(spec.get("method"))
    if hp.get("keep_ratio") == 0:
        return "warp, no mask"
    if hp.get("mask_strategy") == "random":
        return "warp, random mask"
    return "warp"


def comparison_specs(spec: dict[str, Any], ablations: bool = False) -> list[dict[str, Any]]:
    """The jobs that answer "what does WaRP buy on this spec?": `warp` and `full`, plus, with
    `ablations`, WaRP with no mask (`keep_ratio` 0) and with a random mask of the same size."""
    hp = spec.get("hyperparameters", {})
    jobs = [{**spec, "method": "warp"}, {**spec, "method": "full"}]
    if ablations:
        jobs += [
            {**spec, "method": "warp", "hyperparameters": {**hp, **change}}
            for change in ({"keep_ratio": 0.0}, {"mask_strategy": "random"})
        ]
    return jobs


def labels(jobs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """A label per (job id, spec): its variant, with the id where a variant repeats."""
    names = [variant(spec) for _, spec in jobs]
    return [
        name if names.count(name) == 1 else f"{name} {job_id[:8]}"
        for name, (job_id, _) in zip(names, jobs, strict=True)
    ]


def comparison_markdown(entries: Sequence[Entry]) -> str:
    """A Markdown table: one row per job, one column per metric, cells `before -> after`."""
    shown = [
        (key, name, hint)
        for key, name, hint in METRICS
        if any((m.get("before") or {}).get(key) is not None for _, m in entries)
    ]
    header = "| job | " + " | ".join(f"{name} ({hint})" for _, name, hint in shown) + " |"
    rule = "| --- |" + " --- |" * len(shown)
    rows = [
        f"| {label} | "
        + " | ".join(
            f"{_value(m.get('before'), key)} -> {_value(m.get('after'), key)}"
            for key, _, _ in shown
        )
        + " |"
        for label, m in entries
    ]
    summary = verdicts(entries)
    return "\n".join([header, rule, *rows, *(["", *summary] if summary else [])])


def verdicts(entries: Sequence[Entry]) -> list[str]:
    """One sentence per job against the plain fine-tuning (`full`) job, if one is compared:
    the refusal rate each ends with, and the share of full's utility-loss drop it got."""
    baseline = next((m for label, m in entries if label.startswith("full")), None)
    if not baseline or not baseline.get("after"):
        return []
    full_drop = baseline["before"]["utility_loss"] - baseline["after"]["utility_loss"]
    lines = []
    for label, metrics in entries:
        if label.startswith("full") or not metrics.get("after"):
            continue
        drop = metrics["before"]["utility_loss"] - metrics["after"]["utility_loss"]
        share = f"{drop / full_drop:.0%}" if full_drop > 0 else "n/a"
        lines.append(
            f"- {label}: refusal rate {metrics['after']['refusal_rate']:.2f} "
            f"(full: {baseline['after']['refusal_rate']:.2f}), {share} of full's "
            "utility-loss drop."
        )
    return lines
