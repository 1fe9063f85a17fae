"""Reports that answer "did the model keep its refusals while it learned the task?".

Every job writes `report.md` (the numbers and the settings) and `report.png` (refusal rate
against utility loss, before -> after). `warp compare` draws the same plot with one arrow
per job, so WaRP and plain fine-tuning of the same spec sit side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt

from warp_core.attacks import ATTACKS
from warp_core.comparison import Entry, comparison_markdown, variant


def plot_tradeoff(entries: Sequence[Entry], path: Path) -> Path:
    """Refusal rate against utility loss: an arrow per job from before to after."""
    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=120)
    for index, (label, metrics) in enumerate(entries):
        before, after = metrics.get("before"), metrics.get("after")
        if not before or not after:
            continue
        color = f"C{index}"
        xs = [before["utility_loss"], after["utility_loss"]]
        ys = [before["refusal_rate"], after["refusal_rate"]]
        axes.annotate(
            "",
            xy=(xs[1], ys[1]),
            xytext=(xs[0], ys[0]),
            arrowprops={"arrowstyle": "->", "color": color, "lw": 1.5},
        )
        axes.scatter(xs[:1], ys[:1], facecolors="none", edgecolors=color, s=60)
        axes.scatter(xs[1:], ys[1:], color=color, s=60, label=f"{label} (after)")
    axes.set_xlabel("utility loss on held-out task data (lower is better)")
    axes.set_ylabel("refusal rate on held-out harmful prompts")
    axes.set_ylim(-0.05, 1.05)
    axes.set_title("Safety vs utility: before (hollow) -> after (filled)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def settings_lines(spec: dict[str, Any]) -> list[str]:
    hp = spec["hyperparameters"]
    lines = [
        f"- method: `{spec['method']}`, base model: `{spec['base_model']}`",
        f"- learning rate {hp['learning_rate']}, epochs {hp['epochs']}, max steps "
        f"{hp.get('max_steps')}, batch {hp['batch_size']} x {hp['grad_accum_steps']} micro-batches",
    ]
    if spec["method"] == "warp":
        lines.append(
            f"- keep_ratio {hp['keep_ratio']} ({hp['mask_scope']} scope, "
            f"{hp['mask_strategy']} mask) over {', '.join(hp['target_modules'])}; other "
            f"parameters {'trained' if hp['train_other_params'] else 'frozen'}"
        )
    return lines


def attack_lines(spec: dict[str, Any]) -> list[str]:
    """The jailbreak templates the harmful set was asked under, each with its source."""
    names = spec.get("eval", {}).get("attacks") or []
    if not names:
        return []
    return [
        "",
        "## Attacks",
        "The harmful prompts asked again inside each template (`warp_core/attacks.py`):",
        *(f"- `{name}`: {ATTACKS[name].citation}" for name in names),
    ]


def write_report(out_dir: Path, metrics: dict[str, Any], spec: dict[str, Any]) -> None:
    """`report.md` and `report.png` for one finished job."""
    label = variant(spec)
    plot_tradeoff([(label, metrics)], out_dir / "report.png")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in metrics["timings"].items())
    text = "\n".join(
        [
            f"# {label} job report",
            "",
            comparison_markdown([(label, metrics)]),
            "",
            "![refusal rate vs utility loss](report.png)",
            "",
            "## Settings",
            *settings_lines(spec),
            f"- timings: {timings}",
            "",
            "## Refusal rule",
            metrics["refusal_rule"],
            *attack_lines(spec),
            "",
        ]
    )
    (out_dir / "report.md").write_text(text)
