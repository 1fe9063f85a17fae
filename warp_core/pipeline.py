"""A whole WaRP job: evaluate, Phase 1, Phase 2, Phase 3, evaluate again, export.

`run(spec, out_dir, on_event, should_stop)` is what the CLI and the worker call. Each stage
records its completion in `out_dir/state.json` after its outputs are on disk, and training
checkpoints every `checkpoint_every` steps, so calling `run` again on the same directory
resumes where the last call stopped instead of starting over.

Phase 3 records every optimizer step (`results.csv`, TensorBoard, a `metrics` event, the
job's trackers: `warp_core.tracking`), takes the validation loss when it is due, and
exports the intermediate models (`models/step-N/`, listed in `checkpoints.json`, announced
by a `checkpoint` event). Every exported model carries its model card (`warp_core.card`).

Under torchrun every process runs this same pipeline as one rank of the job
(`warp_core.distributed`): the model is sharded by FSDP2, each phase splits its batches
between the ranks, and rank 0 alone writes the artifacts and reports events. Ranks agree on
every stop request, so they stop at the same step. Evaluation runs the same batches on every
rank (a sharded model needs all of them for a forward pass).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch

from warp_core import evaluate as evaluation
from warp_core.basis import build_bases, spectrum
from warp_core.card import model_card
from warp_core.checkpoint import Checkpoint
from warp_core.data import (
    Encoded,
    Example,
    batches,
    encode_examples,
    load_examples,
    mix_poison,
    pad_token_id,
)
from warp_core.distributed import World
from warp_core.events import Cancelled, Event, EventCallback
from warp_core.export import (
    forget_checkpoints_after,
    full_state_dict,
    list_checkpoint,
    load_bases,
    load_masks,
    read_json,
    save_bases,
    save_masks,
    save_model,
    write_json,
)
from warp_core.files import replacing, sha256_of
from warp_core.finetune import Schedule, StepReport, train
from warp_core.importance import importance_scores, masks_from_importance, random_scores
from warp_core.loss import mean_response_loss
from warp_core.memory import PeakMemory
from warp_core.model import (
    find_targets,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_gradient_checkpointing,
    resolve_keep_rotated,
    set_trainable,
    untie_lm_head,
)
from warp_core.report import write_report
from warp_core.rotation import ActivationRotation
from warp_core.slots import PlainSlot, RotatedSlot, Slot
from warp_core.spec import EVAL_SETS, REFUSAL_SETS, DatasetRef, JobSpec, load_spec
from warp_core.tracking import ResultsFile, StepMetrics, Tracking

__all__ = ["Cancelled", "Pipeline", "load_spec", "run"]

log = logging.getLogger(__name__)

STAGES: dict[str, tuple[str, float]] = {
    "evaluate_before": ("evaluate", 1.0),
    "basis": ("basis", 1.0),
    "importance": ("importance", 1.0),
    "finetune": ("finetune", 6.0),
    "evaluate_after": ("evaluate", 1.0),
}
"""Stage -> (the phase it reports as, its share of the progress bar)."""

FINAL_MODEL = "model"
"""Where the final model is, in the output directory (and in `checkpoints.json`)."""


def export_steps(total_steps: int, n_checkpoints: int) -> list[int]:
    """The optimizer steps after which the intermediate models are exported: `n_checkpoints`
    evenly spaced ones, `k * total_steps // (n_checkpoints + 1)` for k = 1..n, never step 0
    nor the last (whose model is the final one); fewer when the job has fewer steps."""
    spaced = {k * total_steps // (n_checkpoints + 1) for k in range(1, n_checkpoints + 1)}
    return sorted(spaced - {0, total_steps})


def intermediate_model(step: int) -> str:
    """Where the model exported after `step` optimizer steps is, in the output directory."""
    return f"models/step-{step:08d}"


class RunState:
    """`state.json`: the run id, which stages are complete, how long each took and its peak
    memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = read_json(path) if path.exists() else {}
        self.run_id: str | None = saved.get("run_id")
        self.completed: list[str] = saved.get("completed", [])
        self.timings: dict[str, float] = saved.get("timings", {})
        self.memory: dict[str, int | None] = saved.get("memory", {})

    def write(self) -> None:
        state = {
            "run_id": self.run_id,
            "completed": self.completed,
            "timings": self.timings,
            "memory": self.memory,
        }
        write_json(self.path, state)

    def done(self, stage: str) -> bool:
        return stage in self.completed

    def complete(self, stage: str, seconds: float, peak_bytes: int | None, write: bool) -> None:
        """Record a finished stage (in the file too when `write`: rank 0's job)."""
        self.completed.append(stage)
        self.timings[stage] = round(seconds, 3)
        self.memory[stage] = peak_bytes
        if write:
            self.write()


class Pipeline:
    def __init__(
        self,
        spec: JobSpec,
        out_dir: Path,
        on_event: EventCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        device: str | None = None,
        world: World | None = None,
        run_id: str | None = None,
    ) -> None:
        """`run_id` names this job in its model cards and trackers (the service passes its
        job id); default: the one `state.json` holds, or a new one."""
        self.spec = spec
        self.hp = spec.hyperparameters
        self.out = out_dir
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)
        self.world = world or World.alone(resolve_device(device))
        self.device = self.world.device
        self.dtype = resolve_dtype(self.hp.dtype, self.device)
        self.state = RunState(out_dir / "state.json")
        self.stages = [
            s for s in STAGES if spec.method == "warp" or s not in ("basis", "importance")
        ]
        if not spec.eval.enabled:
            self.stages = [s for s in self.stages if not s.startswith("evaluate")]
        self._stage = ""
        self._stage_progress = 0.0
        self.requested_run_id = run_id
        self.tracking = Tracking([], self.warn)
        self.results: ResultsFile | None = None  # rank 0's, while Phase 3 runs

    # -- events and cancellation ---------------------------------------------------------

    def check_stop(self) -> None:
        """Raise `Cancelled` once a stop is requested; every rank calls it at the same points
        and they agree, so all stop at the same step."""
        if self.world.any(self.should_stop()):
            raise Cancelled("cancelled by request")

    def emit(self, kind: str, **data: Any) -> None:
        if not self.world.main:
            return
        self.on_event(Event(kind, STAGES[self._stage][0] if self._stage else None, data))

    def warn(self, message: str) -> None:
        self.emit("log", message=message, level="warning")

    def fraction(self) -> float:
        """Overall progress in [0, 1], weighting stages by their usual cost."""
        total = sum(STAGES[s][1] for s in self.stages)
        finished = sum(STAGES[s][1] for s in self.stages if self.state.done(s))
        current = 0.0 if self.state.done(self._stage) else STAGES[self._stage][1]
        return min(1.0, (finished + current * self._stage_progress) / total)

    def progress(self, step: int, total_steps: int, **data: Any) -> None:
        self._stage_progress = step / max(total_steps, 1)
        self.emit("progress", step=step, total_steps=total_steps, fraction=self.fraction(), **data)

    def counter(self, total: int) -> Callable[[], None]:
        """An `on_batch` callback that reports progress and honours cancellation."""
        done = [0]

        def tick() -> None:
            done[0] += 1
            self.progress(done[0], total)
            self.check_stop()

        return tick

    def stage(self, name: str, work: Callable[[], None]) -> None:
        """Run one stage unless a previous call finished it, with its events and timing."""
        if name not in self.stages or self.state.done(name):
            return
        self._stage, self._stage_progress = name, 0.0
        which = {"stage": name.removeprefix("evaluate_")} if name.startswith("evaluate") else {}
        self.emit("phase_started", **which)
        self.check_stop()
        _ = self.loaded  # loaded before the phase's memory is measured, not counted in it
        started = time.perf_counter()
        with PeakMemory(self.device) as peak:
            work()
        seconds = time.perf_counter() - started
        self.world.barrier()  # rank 0 has written the stage's outputs before anyone reads them
        self.state.complete(name, seconds, self.world.most(peak.bytes), self.world.main)
        self.emit("phase_finished", seconds=round(seconds, 3), fraction=self.fraction(), **which)

    # -- inputs ----------------------------------------------------------------------------

    @cached_property
    def loaded(self) -> tuple[Any, Any]:
        """The model being trained (or, once Phase 3 is complete, the fine-tuned one)."""
        path = self.out / "model" if self.state.done("finetune") else self.spec.base_model
        sharded = self.world.size > 1  # FSDP2 moves each rank's shard to its device
        device = torch.device("cpu") if sharded else self.device
        model, tokenizer = load_model(str(path), self.dtype, device)
        # A tied head moves the embeddings when it trains, and FSDP2 shards it apart from
        # them (`World.shard`): give it its own weight in either case.
        if ("lm_head" in self.hp.target_modules or sharded) and untie_lm_head(model):
            self.emit("log", message="lm_head was tied to the embeddings; untied it")
        self.world.shard(model)
        return model, tokenizer

    @property
    def model(self) -> Any:
        return self.loaded[0]

    @property
    def tokenizer(self) -> Any:
        return self.loaded[1]

    @cached_property
    def targets(self) -> list:
        return find_targets(self.model, self.hp.target_modules)

    def read(self, where: str, ref: DatasetRef) -> list[Example]:
        """The examples of a dataset, recorded for the model card (`record`)."""
        examples = load_examples(ref, prompts_only=where in REFUSAL_SETS)
        self.record(where, ref, len(examples))
        return examples

    def record(self, where: str, ref: DatasetRef, rows: int) -> None:
        """Write to `data.json` (rank 0) where a dataset came from, how many of its rows the
        job uses and, for a local file, its digest."""
        if not self.world.main:
            return
        path = self.out / "data.json"
        data = read_json(path) if path.exists() else {}
        data[where] = {
            "source": ref.source,
            "config": ref.config,
            "split": None if ref.is_local else ref.split,
            "preset": ref.preset,
            "offset": ref.offset,
            "rows": rows,
            "sha256": sha256_of(Path(ref.source).expanduser()) if ref.is_local else None,
        }
        write_json(path, data)

    def training_examples(self, which: str) -> list[Example]:
        """A training set's examples; the utility data's with its poison mixed in (each
        dataset recorded once, with the rows the job trains on)."""
        ref = getattr(self.spec, which)
        poison = getattr(ref, "poison", None)
        if poison is None:
            return self.read(which, ref)
        harmful = load_examples(poison)
        mixed, count = mix_poison(load_examples(ref), harmful, poison.ratio, self.hp.seed)
        self.record(which, ref, len(mixed) - count)
        self.record(f"{which}.poison", poison, count)
        self.emit(
            "log",
            message=f"{which}: {count} of {len(mixed)} rows are poison (ratio {poison.ratio}), "
            f"drawn from the {len(harmful)} rows of {poison.source}",
        )
        return mixed

    def encoded(self, which: str) -> list[Encoded]:
        examples = self.training_examples(which)
        items, dropped = encode_examples(self.tokenizer, examples, self.hp.max_length)
        if dropped:
            self.emit(
                "log",
                message=f"{which}: {dropped} rows dropped, no learned token within max_length",
            )
        if not items:
            raise ValueError(f"{which}: no usable rows (none learns a token within max_length)")
        return items

    @cached_property
    def safety(self) -> list[Encoded]:
        return self.encoded("safety_data")

    def safety_batches(self, size: int) -> list[dict[str, torch.Tensor]]:
        pad = pad_token_id(self.tokenizer)
        return [
            {k: v.to(self.device) for k, v in b.items()} for b in batches(self.safety, size, pad)
        ]

    # -- stages ----------------------------------------------------------------------------

    def evaluate(self, which: str) -> None:
        ev = self.spec.eval
        harmful, benign, contrast, utility = (
            self.read(f"eval.{name}", getattr(ev, name)) for name in EVAL_SETS
        )
        generated = [harmful, benign, contrast, utility, *[harmful] * len(ev.attacks)]
        if ev.utility.preset in evaluation.UTILITY_TASKS:
            generated.append(utility)
        total = sum(-(-len(rows) // self.hp.batch_size) for rows in generated)
        metrics, samples = evaluation.evaluate(
            self.model,
            self.tokenizer,
            harmful,
            benign,
            utility,
            ev.utility.preset,
            ev,
            self.hp.max_length,
            self.hp.batch_size,
            on_batch=self.counter(total),
            contrast=contrast,
        )
        if self.world.main:
            payload = {"metrics": metrics, "samples": samples}
            write_json(self.out / "eval" / f"{which}.json", payload)

    def rounds(self, batches_: list) -> int:
        """Batches each rank passes when `batches_` are dealt between the ranks."""
        return -(-len(batches_) // self.world.size)

    def build_bases(self) -> None:
        batches_ = self.safety_batches(self.hp.basis_batch_size)
        on_batch = self.counter(self.rounds(batches_))
        bases = build_bases(self.model, self.targets, batches_, on_batch, self.world)
        if self.world.main:
            save_bases(self.out / "warp", bases, spectrum(bases))

    def score_importance(self) -> None:
        bases = load_bases(self.out / "warp", self.device)  # whole: every rank rotates
        if self.hp.mask_strategy == "random":
            shapes = {t.param_name: t.weight.shape for t in self.targets}
            scores = random_scores(shapes, self.hp.seed, self.device)
        else:
            batches_ = self.safety_batches(self.hp.importance_batch_size)
            on_batch = self.counter(self.rounds(batches_))
            scores = importance_scores(
                self.model,
                self.targets,
                bases,
                batches_,
                on_batch,
                self.world,
                self.hp.gradient_rotation,
            )
        if self.world.main:
            masks = masks_from_importance(scores, self.hp.keep_ratio, self.hp.mask_scope)
            save_masks(self.out / "warp", self.targets, bases, masks)

    def slots(self) -> list[Slot]:
        """Trainable state: rotated deltas for WaRP targets, plain weights otherwise, each on
        this rank's rows (its bases gathered when a rotation needs them)."""
        set_trainable(self.model, self.targets, self.hp.train_other_params)
        cpu = torch.device("cpu")
        state_device = cpu if "optimizer_state" in self.hp.offload else self.device
        base_device = cpu if "base_weights" in self.hp.offload else self.device
        target_params = {t.param_name for t in self.targets}
        slots: list[Slot] = []
        if self.spec.method == "warp":
            rows = self.world.rows if self.world.size > 1 else None
            bases = load_bases(self.out / "warp", self.device, rows)
            masks = load_masks(self.out / "warp", self.device, rows) if self.hp.keep_ratio else {}
            for t in self.targets:
                key = bases.key_of[t.name]
                basis = partial(self.world.full, key, bases.U[key], t.module.in_features)
                # pop: each bool mask is freed once its slot holds it packed
                frozen = masks.pop(t.param_name, None)
                slots.append(
                    RotatedSlot(t.param_name, t.weight, basis, frozen, state_device, base_device)
                )
        else:
            slots += [PlainSlot(t.param_name, t.weight, state_device) for t in self.targets]
        slots += [
            PlainSlot(name, param, state_device)
            for name, param in self.model.named_parameters()
            if param.requires_grad and name not in target_params
        ]
        return slots

    def finetune(self) -> None:
        examples = self.encoded("utility_data")
        validation = self.validation_batches()
        recompute = resolve_gradient_checkpointing(self.hp.gradient_checkpointing, self.device)
        if recompute:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        steps = self.run_steps(examples, validation, recompute)
        if recompute:
            self.model.activation_checkpointing_disable()
        for param in self.model.parameters():
            param.requires_grad_(False)
        weights = full_state_dict(self.model, self.world)
        if self.world.main:
            training = self.training(len(examples), steps, steps)
            write_json(self.out / "training.json", training)
            # Its card is written again, with the evaluation, when the job ends (`run`).
            card = model_card(self.spec_json, self.metrics(training))
            save_model(self.model, self.tokenizer, self.out / FINAL_MODEL, weights, card)
            if self.results.rows:  # none only in a directory trained before results.csv was
                self.announce(FINAL_MODEL, self.results.rows[-1])

    def validation_batches(self) -> list[dict[str, torch.Tensor]]:
        """`validation_data` in batches of `batch_size` (none without it)."""
        if self.spec.validation_data is None:
            return []
        items = self.encoded("validation_data")
        return list(batches(items, self.hp.batch_size, pad_token_id(self.tokenizer)))

    def validation_due(self, step: int, total_steps: int, exports: list[int]) -> bool:
        """Whether the validation loss is taken after `step`: every `eval_every` steps, at
        each exported model and at the last step."""
        every = self.hp.eval_every
        return step == total_steps or step in exports or (every is not None and step % every == 0)

    def training(self, examples: int, steps: int, total_steps: int) -> dict[str, Any]:
        """`training.json` after `steps` optimizer steps, from the rows of `results.csv`:
        the last training loss, the last validation loss taken (None without validation
        data) and the tokens trained (prompts and responses: OpenAI's `trained_tokens`)."""
        assert self.results is not None
        rows = self.results.through(steps)
        taken = [row.valid_loss for row in rows if row.valid_loss is not None]
        return {
            "steps": steps,
            "total_steps": total_steps,
            "examples": examples,
            "trained_tokens": sum(row.tokens for row in rows),
            "train_loss": rows[-1].train_loss if rows else None,
            "valid_loss": taken[-1] if taken else None,
        }

    def announce(self, path: str, metrics: StepMetrics) -> None:
        """List an exported model in `checkpoints.json` and report it (rank 0)."""
        entry = {"step": metrics.step, "path": path, "metrics": metrics.as_dict()}
        list_checkpoint(self.out, entry)
        self.emit("checkpoint", **entry)

    def export_intermediate(self, step: int, total_steps: int, examples: int) -> None:
        """The model after `step` optimizer steps as `models/step-N/`, with its card (every
        rank gathers a sharded model's weights; rank 0 writes)."""
        weights = full_state_dict(self.model, self.world)
        if self.world.main:
            assert self.results is not None
            path = intermediate_model(step)
            card = model_card(
                self.spec_json, self.metrics(self.training(examples, step, total_steps)), step
            )
            save_model(self.model, self.tokenizer, self.out / path, weights, card)
            self.announce(path, self.results.rows[-1])

    def run_steps(
        self, examples: list[Encoded], validation: list[dict[str, torch.Tensor]], recompute: bool
    ) -> int:
        """The optimizer steps, resumed from the last checkpoint; the trained state (W0, dC,
        bases, moments) is freed when it returns, before the model is exported.

        What a run that stopped wrote past its last checkpoint (results rows, exported
        models) is dropped first: this run does those steps again, from the same state."""
        schedule = Schedule(len(examples), self.hp)
        exports = export_steps(schedule.total_steps, self.hp.n_checkpoints)
        checkpoint = Checkpoint(self.out / "checkpoints" / "finetune", self.world)
        start = checkpoint.step
        if checkpoint.exists:
            self.emit("log", message=f"fine-tuning resumes from its checkpoint of step {start}")
        if self.world.main:
            self.results = ResultsFile(self.out / "results.csv")
            self.results.resume_at(start)
            forget_checkpoints_after(self.out, start)
            self.tracking.resume_at(start)

        def report(step: StepReport) -> None:
            valid = None
            if validation and self.validation_due(step.step, step.total_steps, exports):
                valid = mean_response_loss(self.model, validation, self.world)
            metrics = StepMetrics(
                step.step, step.loss, step.learning_rate, step.grad_norm, step.tokens, valid
            )
            if self.results is not None:
                self.results.append(metrics)
                self.tracking.log_step(metrics)
            self.emit("metrics", total_steps=step.total_steps, **metrics.as_dict())
            if step.step in exports:
                self.export_intermediate(step.step, step.total_steps, len(examples))
            remaining = (step.total_steps - step.step) * step.seconds
            self.progress(
                step.step,
                step.total_steps,
                loss=round(step.loss, 6),
                learning_rate=step.learning_rate,
                grad_norm=round(step.grad_norm, 6),
                tokens_per_s=round(step.tokens / step.seconds, 1),
                eta_s=round(remaining, 1),
            )

        slots = self.slots()
        keep = resolve_keep_rotated(self.hp.keep_rotated_gradients, self.device)
        return train(
            self.model,
            slots,
            examples,
            self.hp,
            pad_token_id(self.tokenizer),
            checkpoint,
            on_step=report,
            check_stop=self.check_stop,
            schedule=schedule,
            world=self.world,
            rotation=self.rotation(slots, keep),
            keep_rotated=keep,
            chunked_loss=recompute,  # the head's logits are activations too
            checkpoint_steps=exports,
        )

    def rotation(self, slots: list[Slot], keep: bool) -> ActivationRotation | None:
        """Which WaRP targets form their rotated gradient from activations, step by step."""
        rotated = [slot for slot in slots if isinstance(slot, RotatedSlot)]
        if not rotated:
            return None
        modules = {t.param_name: t.module for t in self.targets}
        head = self.model.get_output_embeddings()
        # Held rotated gradients cost one rotation a step, formed again two.
        rotations = 1 if keep or self.hp.max_grad_norm is None else 2
        entries = [(slot, modules[slot.name], modules[slot.name] is head) for slot in rotated]
        return ActivationRotation(entries, self.hp.gradient_rotation, rotations)

    # -- the job ---------------------------------------------------------------------------

    @cached_property
    def spec_json(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")

    @property
    def run_id(self) -> str:
        assert self.state.run_id is not None, "set by run()"
        return self.state.run_id

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_spec()
        self._start_run()
        torch.manual_seed(self.hp.seed)
        try:
            metrics = self._stages()
        except (Cancelled, KeyboardInterrupt):
            self.tracking.finish("cancelled")
            raise
        except BaseException:
            self.tracking.finish("failed")
            raise
        self.tracking.finish("succeeded")
        return metrics

    def _stages(self) -> dict[str, Any]:
        self.stage("evaluate_before", lambda: self.evaluate("before"))
        self.stage("basis", self.build_bases)
        self.stage("importance", self.score_importance)
        self.stage("finetune", self.finetune)
        self.stage("evaluate_after", lambda: self.evaluate("after"))
        metrics = self.metrics()
        if self.world.main:
            write_json(self.out / "metrics.json", metrics)
            plot = None
            if metrics["before"] and metrics["after"]:
                write_report(self.out, metrics, self.spec_json)
                plot = self.out / "report.png"
            # The final model's card, now with its evaluation.
            with replacing(self.out / FINAL_MODEL / "README.md") as partial:
                partial.write_text(model_card(self.spec_json, metrics))
            self.tracking.log_summary(metrics, plot)
        return metrics

    def _start_run(self) -> None:
        """Settle the run id (kept in `state.json`: a resumed job is the same run) and open
        the trackers on rank 0."""
        stored, requested = self.state.run_id, self.requested_run_id
        if stored and requested and stored != requested:
            raise ValueError(f"{self.out} holds the outputs of run {stored}, not {requested}")
        self.state.run_id = stored or requested or uuid.uuid4().hex
        if not self.world.main:
            return
        self.state.write()
        params = {"run_id": self.run_id, "world_size": self.world.size, **self.spec_json}
        integrations = self.spec.integrations
        self.tracking = Tracking.open(self.out, integrations, self.run_id, params, self.warn)

    def _check_spec(self) -> None:
        """Record the spec; refuse to resume a directory that holds another spec's outputs
        (every rank checks before rank 0 writes)."""
        path = self.out / "spec.json"
        current = self.spec.model_dump(mode="json")
        if path.exists() and read_json(path) != current:
            raise ValueError(f"{self.out} holds the outputs of a different spec; use a new one")
        self.world.barrier()
        if self.world.main:
            write_json(path, current)

    def metrics(self, training: dict[str, Any] | None = None) -> dict[str, Any]:
        """`metrics.json`: at the end of the job, or (`training` given: the figures of a step,
        `training.json`'s shape) while it trains, for an intermediate model's card."""

        def evaluated(which: str) -> dict[str, Any] | None:
            path = self.out / "eval" / f"{which}.json"
            return read_json(path)["metrics"] if path.exists() else None

        timings, memory = self.state.timings, self.state.memory
        spectrum_path = self.out / "warp" / "spectrum.json"
        data_path = self.out / "data.json"
        return {
            "method": self.spec.method,
            "before": evaluated("before"),
            "after": evaluated("after"),
            **evaluation.refusal_record(self.spec.eval),  # refusal_rule, refusal_judge
            "timings": {
                "basis": timings.get("basis", 0.0),
                "importance": timings.get("importance", 0.0),
                "finetune": timings.get("finetune", 0.0),
                "evaluate": round(
                    timings.get("evaluate_before", 0.0) + timings.get("evaluate_after", 0.0), 3
                ),
            },
            "memory": {
                "basis": _peak(memory, "basis"),
                "importance": _peak(memory, "importance"),
                "finetune": _peak(memory, "finetune"),
                "evaluate": _peak(memory, "evaluate_before", "evaluate_after"),
            },
            "world_size": self.world.size,
            "run_id": self.run_id,
            "training": training or read_json(self.out / "training.json"),
            "data": read_json(data_path) if data_path.exists() else {},
            "spectrum": read_json(spectrum_path) if spectrum_path.exists() else {},
        }


def _peak(memory: dict[str, int | None], *stages: str) -> int | None:
    """The largest peak measured among `stages` (bytes), None if none was."""
    return max((memory[s] for s in stages if memory.get(s) is not None), default=None)


def run(
    spec: JobSpec,
    out_dir: str | Path,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) `spec` into `out_dir`; returns the metrics written to metrics.json.

    Under torchrun this process joins the job's other ranks (`World.join`). `run_id` names
    the job in its model cards and trackers (default: the id of the run it resumes, or new).
    """
    world = World.join(device)
    try:
        pipeline = Pipeline(spec, Path(out_dir), on_event, should_stop, world=world, run_id=run_id)
        return pipeline.run()
    finally:
        world.close()
