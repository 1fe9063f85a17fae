"""The artifact format of a job's output directory, written and read back.

    spec.json                     the spec as run
    state.json                    the run id, the stages completed, their seconds and memory
    metrics.json                  before/after metrics, refusal rule, run id, training, data,
                                  timings, memory, spectrum (what the final model card shows)
    training.json                 {"steps", "total_steps", "examples", "trained_tokens",
                                  "train_loss", "valid_loss"}: the last step's losses (valid
                                  None without validation data), tokens of all steps
    data.json                     {"safety_data" | "utility_data" | "utility_data.poison" |
                                  "validation_data" | "eval.harmful" | ...: {"source",
                                  "config", "split", "preset", "offset", "rows", "sha256"}}:
                                  every dataset read, with the rows used (sha256 of a local
                                  file, None for a Hub dataset)
    results.csv                   one row per optimizer step, in step order, the columns below
    tensorboard/                  TensorBoard event files of the same figures (and before/after)
    tracking.json                 {"wandb": run id, "mlflow": run id}: a resumed job logs there
    model/                        an ordinary Hugging Face checkpoint (safetensors + tokenizer)
                                  and its model card, README.md (`card.model_card`)
    models/step-0000000N/         the same after N optimizer steps: the intermediate models
                                  (`hyperparameters.n_checkpoints`, evenly spaced)
    checkpoints.json              every exported model, by step (the final one last)
    warp/basis.safetensors        {basis key: U} (fp32, in x in), one per distinct input
    warp/eigenvalues.safetensors  {basis key: eigenvalues} (fp32, descending)
    warp/basis_of.json            {target module name: basis key}
    warp/spectrum.json            per basis: dim, directions holding 90% of the energy, share
    warp/masks.safetensors        {parameter name: mask} (bool, the weight's shape, True = frozen)
    warp/targets.json             {parameter name: {"basis": key, "frozen": int, "total": int}}
    eval/{before,after}.json      the metrics and the generated samples behind them
    checkpoints/finetune/         resumable training state, sharded (`checkpoint.Checkpoint`)
    report.md, report.png         the job's report (`report.write_report`, rebuilt every run)

`results.csv` (`tracking.RESULTS_COLUMNS`), a header then one row per optimizer step 1..N;
floats written exactly (`repr`); a resumed job continues it, each step once:

    step           the optimizer step, from 1
    train_loss     mean response-token loss of the step's examples (all processes)
    valid_loss     mean response-token loss on validation_data; empty where not taken (taken
                   every eval_every steps, at each exported model and at the last step)
    learning_rate  the learning rate the step used
    grad_norm      global gradient norm before clipping
    tokens         tokens of the step's examples, prompts and responses, without padding

`checkpoints.json`: `[{"step": N, "path": "models/step-0000000N", "metrics": {...}}, ...,
{"step": total_steps, "path": "model", "metrics": {...}}]`, `path` relative to the output
directory, `metrics` the step's row as in the `metrics` event (`valid_loss` always there
when the job has validation data). The same entry is reported as a `checkpoint` event
(`warp_core.events`) once the model is on disk; a `metrics` event after every step carries
`step`, `total_steps`, `train_loss`, `learning_rate`, `grad_norm`, `tokens` and, where taken,
`valid_loss`.

All but the report, `results.csv` (appended a row at a time) and the TensorBoard files are
written under their name + `.partial` (`model.partial/` for the model) and renamed when
complete (`files.replacing`), so a reader never sees half a file, nor a model without its
card.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from warp_core.basis import Bases
from warp_core.distributed import World
from warp_core.files import replacing
from warp_core.model import Target


def write_json(path: Path, payload: Any) -> None:
    """Atomically write `payload` as indented JSON."""
    with replacing(path) as partial:
        partial.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with replacing(path) as partial:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial))


def save_bases(warp_dir: Path, bases: Bases, spectrum: dict[str, Any]) -> None:
    """Phase 1 output: the bases, which target reads which, and their spectra."""
    _save_tensors(warp_dir / "basis.safetensors", bases.U)
    _save_tensors(warp_dir / "eigenvalues.safetensors", bases.eigenvalues)
    write_json(warp_dir / "basis_of.json", bases.key_of)
    write_json(warp_dir / "spectrum.json", spectrum)


def load_bases(warp_dir: Path, device: torch.device, rows: RowsOf | None = None) -> Bases:
    """The bases, whole, or only the rows `rows(n)` of each when given."""
    return Bases(
        key_of=read_json(warp_dir / "basis_of.json"),
        U=load_rows(warp_dir / "basis.safetensors", device, rows),
        eigenvalues=load_file(str(warp_dir / "eigenvalues.safetensors"), device=str(device)),
    )


RowsOf = Callable[[int], slice]
"""Which rows of an n-row tensor this process holds (`World.rows`)."""


def load_rows(path: Path, device: torch.device, rows: RowsOf | None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, whole, or only its rows `rows(n)`: a process of a
    sharded job reads only its own rows of a 7B model's masks and bases."""
    if rows is None:
        return load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt", device=str(device)) as tensors:
        loaded = {}
        for name in tensors.keys():  # noqa: SIM118 (safe_open is not a dict)
            part = tensors.get_slice(name)
            mine = rows(part.get_shape()[0])
            loaded[name] = part[mine.start : mine.stop]
        return loaded


def save_masks(
    warp_dir: Path, targets: list[Target], bases: Bases, masks: dict[str, torch.Tensor]
) -> None:
    """Phase 2 output: the masks and, per target weight, its basis and frozen count."""
    _save_tensors(warp_dir / "masks.safetensors", masks)
    write_json(
        warp_dir / "targets.json",
        {
            t.param_name: {
                "basis": bases.key_of[t.name],
                "frozen": int(masks[t.param_name].sum()),
                "total": masks[t.param_name].numel(),
            }
            for t in targets
        },
    )


def load_masks(
    warp_dir: Path, device: torch.device, rows: RowsOf | None = None
) -> dict[str, torch.Tensor]:
    """The masks, whole, or only the rows `rows(n)` of each when given."""
    return load_rows(warp_dir / "masks.safetensors", device, rows)


def save_model(
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    weights: dict[str, torch.Tensor] | None = None,
    card: str | None = None,
) -> None:
    """The fine-tuned model as a plain Hugging Face checkpoint (no project code to load it),
    with its model card as README.md, the directory renamed into place whole.

    `weights` replace the model's own state dict (a sharded model's, gathered whole). A job's
    models always have a `card`; a base model converted by a benchmark has none."""
    with replacing(model_dir) as partial:
        model.save_pretrained(partial, state_dict=weights)
        tokenizer.save_pretrained(partial)
        if card is not None:
            (partial / "README.md").write_text(card)


def list_checkpoint(out_dir: Path, entry: dict[str, Any]) -> None:
    """Add an exported model to `checkpoints.json` (replacing an earlier export to the same
    path), in step order."""
    path = out_dir / "checkpoints.json"
    entries = [e for e in (read_json(path) if path.exists() else []) if e["path"] != entry["path"]]
    write_json(path, sorted([*entries, entry], key=lambda e: e["step"]))


def forget_checkpoints_after(out_dir: Path, step: int) -> None:
    """Drop the models exported after `step`, and their entries: a job resumed from `step`
    exports them again from the same state."""
    path = out_dir / "checkpoints.json"
    if not path.exists():
        return
    entries = read_json(path)
    for entry in entries:
        if entry["step"] > step:
            shutil.rmtree(out_dir / entry["path"], ignore_errors=True)
    write_json(path, [e for e in entries if e["step"] <= step])


def full_state_dict(model: Any, world: World) -> dict[str, torch.Tensor] | None:
    """A sharded model's weights gathered whole, in host memory, on rank 0 (every rank must
    call it); None for a model of one process, which saves its own."""
    if world.size == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
