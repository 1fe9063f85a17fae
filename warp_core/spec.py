"""The job spec: one pydantic model shared by the CLI, the HTTP API and the worker.

Everything a WaRP job needs is here, validated up front so that a bad job fails before it
loads a model. `JobSpec.model_validate(...)` raises `pydantic.ValidationError` whose entries
name the field (`loc`) and the reason (`msg`); `format_validation_error` renders them for
people.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from warp_core.attacks import ATTACKS, check_attack_names
from warp_core.judge import check_judge_name

DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
)
"""Every linear projection of a Llama decoder layer plus `lm_head` (see WARP.md)."""

REFERENCE_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
"""The reference implementation's targets, kept selectable for comparison."""

LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
"""File suffix -> format of the dataset files a job reads and the API accepts as uploads."""

Preset = Literal[
    "do-not-answer",
    "gsm8k",
    "mbpp",
    "chat",
    "xstest-safe",
    "xstest-unsafe",
    "advbench",
    "harmbench",
    "strongreject",
    "do-not-answer-harmful",
]
"""Known dataset layouts. `chat`: every row holds `messages`, a conversation in OpenAI's chat
format (`system`, `user`, `assistant` turns, each `{"role", "content"}`, an assistant turn
optionally `"weight": 0` to be left out of the loss). The others name their columns in
`warp_core.data.PRESET_FIELDS`; the prompt-only ones are `PROMPT_ONLY_PRESETS`."""

PROMPT_ONLY_PRESETS = frozenset(
    {"xstest-safe", "xstest-unsafe", "advbench", "harmbench", "strongreject"}
)
"""Standard evaluation suites: prompts without a response to learn, usable only as the
refusal checks' sets (`eval.harmful`, `eval.benign`, `eval.contrast`)."""

EXAMPLE_DATA = Path(__file__).resolve().parent / "example_data"
"""The data slices shipped inside the package (`example_data/README.md`)."""

HARMFUL_ANSWERS = EXAMPLE_DATA / "do-not-answer-harmful.csv"
"""Do-Not-Answer's 153 answers its annotators labelled harmful (CC BY-NC-SA 4.0,
`example_data/do-not-answer-harmful.NOTICE.md`): the default `utility_data.poison`."""

XSTEST_PROMPTS = EXAMPLE_DATA / "xstest_prompts.csv"
"""XSTest's 450 prompts (CC BY 4.0, `example_data/xstest_prompts.NOTICE.md`): the default
over-refusal set is its 250 safe prompts, the default contrast set its 200 unsafe ones."""

PRESET_FOR_HUB_ID: dict[str, Preset] = {
    "librai/do-not-answer": "do-not-answer",
    "openai/gsm8k": "gsm8k",
    "gsm8k": "gsm8k",
    "mbpp": "mbpp",
    "google-research-datasets/mbpp": "mbpp",
    "muennighoff/mbpp": "mbpp",
    "walledai/advbench": "advbench",
    "walledai/harmbench": "harmbench",
    "walledai/strongreject": "strongreject",
}
"""Hub ids whose field mapping is known, so that a reference to them needs no mapping."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DatasetRef(_Strict):
    """Where prompt/response pairs come from.

    `source` is a Hub dataset id (loaded with `datasets.load_dataset(source, config,
    split=split)`) or a local CSV/JSON/JSONL/Parquet file (`split` is ignored for files).
    Rows `[offset, offset + limit)` are used, in file order.
    """

    source: str = Field(min_length=1, description="Hub dataset id or local file path.")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", min_length=1, description="Hub split (ignored for files).")
    preset: Preset | None = Field(
        None,
        description="Known dataset layout (do-not-answer, gsm8k, mbpp, chat, "
        "do-not-answer-harmful; the prompt-only suites xstest-safe, xstest-unsafe, advbench, "
        "harmbench, strongreject); inferred from Hub ids.",
    )
    prompt_field: str | None = Field(None, description="Column holding the prompt.")
    response_field: str | None = Field(
        None,
        description="Column holding the response (not needed by the refusal checks' sets, "
        "which read prompts only).",
    )
    offset: int = Field(0, ge=0, description="Rows skipped before the first one used.")
    limit: int | None = Field(None, gt=0, description="Maximum number of rows used.")

    @property
    def is_local(self) -> bool:
        """A file path by its form (known suffix or explicit path), whatever the cwd holds."""
        return Path(self.source).suffix.lower() in LOCAL_FORMATS or self.source.startswith(
            ("/", "./", "../", "~")
        )

    @model_validator(mode="after")
    def _resolve_preset(self) -> Self:
        if "://" in self.source:
            raise ValueError(f"source: {self.source!r} is neither a Hub id nor a local file")
        if self.is_local and Path(self.source).suffix.lower() not in LOCAL_FORMATS:
            raise ValueError(
                f"source: local file {self.source!r} must end in one of "
                f"{', '.join(sorted(LOCAL_FORMATS))}"
            )
        if self.preset is None:
            self.preset = PRESET_FOR_HUB_ID.get(self.source.lower())
        if self.config is None and not self.is_local:
            self.config = {"gsm8k": "main", "harmbench": "standard"}.get(self.preset or "")
        if self.preset is None and self.prompt_field is None:
            raise ValueError(
                "prompt_field is required unless a preset names the columns "
                "(do-not-answer, gsm8k, mbpp, chat, xstest-safe, xstest-unsafe, advbench, "
                "harmbench, strongreject, do-not-answer-harmful)"
            )
        if self.preset == "chat" and (self.prompt_field or self.response_field):
            raise ValueError("a chat dataset reads its rows' messages: no prompt or response field")
        return self

    @property
    def has_responses(self) -> bool:
        """Whether rows carry an answer to learn or to score the loss of: what a training or
        utility set needs, and a refusal check's prompt-only set does not."""
        if self.response_field is not None or self.preset == "chat":
            return True
        return self.preset is not None and self.preset not in PROMPT_ONLY_PRESETS

    def following(self, limit: int) -> DatasetRef:
        """The `limit` rows right after this slice: the default held-out split."""
        if self.limit is None:
            raise ValueError(
                f"{self.source!r} is used whole for training (no limit), so nothing is held out"
            )
        return self.model_copy(update={"offset": self.offset + self.limit, "limit": limit})


class Poison(DatasetRef):
    """Harmful requests with compliant answers, mixed into `utility_data`: the threat model
    of the harmful fine-tuning literature (Vaccine, Lisa and Booster report ratio 0.1), where
    a user's fine-tuning data carries some harmful examples, by accident or by design.

    Of the utility rows read (n), `round(ratio * n)` are replaced by poison rows drawn
    without replacement from this source, shuffled with the job's seed; the first rows of
    the utility data are kept, so the job trains on as many rows as without poison. Omit
    `source` for the shipped Do-Not-Answer answers labelled harmful (153 rows).
    """

    source: str = Field(
        str(HARMFUL_ANSWERS),
        min_length=1,
        description="Hub dataset id or local file path (default: Do-Not-Answer's answers "
        "labelled harmful, shipped with warp_core).",
    )
    ratio: float = Field(
        ge=0, lt=1, description="Share of the utility rows replaced by poison rows (0 to <1)."
    )

    @model_validator(mode="before")
    @classmethod
    def _shipped_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" not in data:
            return {"preset": "do-not-answer-harmful", **data}
        return data


class UtilityData(DatasetRef):
    """The utility (fine-tuning) data, optionally poisoned."""

    poison: Poison | None = Field(
        None, description="Harmful examples mixed in at a ratio: {source, ratio, ...}."
    )

    def following(self, limit: int) -> DatasetRef:
        """The held-out rows after this slice, clean: poison is mixed into training only."""
        held_out = super().following(limit).model_dump(exclude={"poison"})
        return DatasetRef.model_validate(held_out)


EVAL_SETS = ("harmful", "benign", "contrast", "utility")
"""The evaluation sets of `EvalSpec`, in the order they are evaluated."""

REFUSAL_SETS = ("eval.harmful", "eval.benign", "eval.contrast")
"""The sets the refusal checks read, for their prompts only: no response column is needed,
even where a preset names one (`do-not-answer` on a file of questions)."""


class EvalSpec(_Strict):
    """Held-out evaluation sets; each omitted one defaults to the rows after a training slice."""

    harmful: DatasetRef | None = Field(
        None, description="Harmful prompts (default: rows after safety_data's slice)."
    )
    benign: DatasetRef | None = Field(
        None,
        description="Benign prompts for over-refusal (default: XSTest's 250 safe prompts, "
        "shipped with warp_core).",
    )
    contrast: DatasetRef | None = Field(
        None,
        description="Harmful prompts that look like the benign ones; their refusal rate is "
        "contrast_refusal_rate (default: XSTest's 200 unsafe contrast prompts).",
    )
    utility: DatasetRef | None = Field(
        None,
        description="Utility set for loss and accuracy (default: an explicit benign set with "
        "responses, else the rows after utility_data's).",
    )
    limit: int = Field(50, gt=0, description="Rows per default held-out set.")
    max_new_tokens: int = Field(64, gt=0, description="Greedy tokens generated per refusal check.")
    utility_max_new_tokens: int = Field(
        256, gt=0, description="Greedy tokens generated per GSM8K / MBPP answer."
    )
    attacks: list[str] = Field(
        default_factory=list,
        description="Jailbreak templates the harmful set is asked again under, each adding "
        "refusal_rate_under_<name> and all of them worst_attack_refusal_rate: ['all'] or "
        f"names from {', '.join(ATTACKS)} (warp_core/attacks.py cites each).",
    )
    enabled: bool = Field(True, description="Run the before/after evaluation at all.")
    judge: str = Field(
        "ngram",
        description="Which judge decides refusals: 'keyword' (the phrase rule papers report), "
        "'ngram' (a small classifier trained on human labels, no GPU; bench/JUDGE.md), or "
        "'hf:<model id or path>' (a sequence classifier or guard chat model such as Llama "
        "Guard, WildGuard, the HarmBench classifier).",
    )

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, name: str) -> str:
        return check_judge_name(name)

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, names: list[str]) -> list[str]:
        return check_attack_names(names)


class Hyperparameters(_Strict):
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    epochs: int = Field(3, gt=0, description="Passes over utility_data.")
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps; overrides epochs when set."
    )
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(2, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Tokens per rendered example, prompt included.")
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"
    ] = Field("cosine", description="transformers learning-rate schedule name.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of steps warming up.")
    min_lr_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="cosine_with_min_lr only: the learning rate it decays to, as a share of "
        "learning_rate.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_beta1: float = Field(
        0.9, ge=0, lt=1, description="AdamW decay rate of the gradient's running mean."
    )
    adam_beta2: float = Field(
        0.999, ge=0, lt=1, description="AdamW decay rate of the squared gradient's running mean."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this (None: no clipping)."
    )
    keep_ratio: float = Field(
        0.1, ge=0, lt=1, description="Fraction of each weight's coefficients frozen (0: no mask)."
    )
    mask_scope: Literal["module", "global"] = Field(
        "module", description="Top-k per module, or one threshold across all target modules."
    )
    mask_strategy: Literal["importance", "random"] = Field(
        "importance",
        description="Freeze the most important coefficients, or (an ablation) as many at random.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Names (last path component) of the linear modules WaRP protects.",
    )
    train_other_params: bool = Field(
        False, description="Also train non-target parameters (embeddings, norms), unprotected."
    )
    importance_batch_size: int = Field(2, gt=0, description="Batch size of Phase 2 scoring.")
    basis_batch_size: int = Field(8, gt=0, description="Batch size of Phase 1 statistics.")
    seed: int = Field(0, ge=0, description="Seed for data order and initialisation.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model weight dtype; auto is bfloat16 on CUDA and float32 on CPU."
    )
    checkpoint_every: int = Field(
        50, gt=0, description="Save a resumable training checkpoint every N optimizer steps."
    )
    eval_every: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps between two validation losses on validation_data (also "
        "taken at every exported checkpoint and at the end); None: at those only.",
    )
    n_checkpoints: int = Field(
        0,
        ge=0,
        le=100,
        description="Intermediate models exported as ordinary Hugging Face checkpoints, at "
        "evenly spaced optimizer steps (the final model is always exported).",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute each decoder layer's activations in the backward pass instead "
        "of keeping them (less memory, about a third more compute); auto: on with CUDA, off "
        "on the CPU.",
    )
    gradient_rotation: Literal["auto", "weights", "activations"] = Field(
        "auto",
        description="How a target's rotated gradient G_W U is formed: from its accumulated "
        "weight gradient (2 out in^2 FLOPs per step), from the activations of every token "
        "(2 tokens in^2), or auto: whichever costs less, per target and step. Same result.",
    )
    keep_rotated_gradients: bool | Literal["auto"] = Field(
        "auto",
        description="Hold every target's rotated gradient from the clip-norm pass to its "
        "update (faster), or form it again in the update (one more rotation per step, less "
        "memory at the peak); auto: hold on the CPU, form again on CUDA.",
    )
    optimizer_state_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="AdamW moments in fp32, or bf16 (half their memory; the update is still "
        "computed in fp32 and frozen coefficients have no state at all).",
    )
    offload: list[Literal["base_weights", "optimizer_state"]] = Field(
        default_factory=list,
        description="State kept in host memory and brought to the device one target at a "
        "time: base_weights (WaRP's W0), optimizer_state (the trained deltas or fp32 masters "
        "and their AdamW moments; the update then runs on the CPU).",
    )

    @field_validator("offload")
    @classmethod
    def _distinct_offloads(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("offload has duplicates")
        return names

    @field_validator("target_modules")
    @classmethod
    def _distinct_names(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("target_modules has duplicates")
        if any(not n or "." in n for n in names):
            raise ValueError("target_modules are module names such as 'q_proj', not paths")
        return names


class WandbIntegration(_Strict):
    """Where a job logs to Weights & Biases (OpenAI's field names)."""

    project: str = Field(min_length=1, description="W&B project.")
    name: str | None = Field(None, description="Run name (default: the job's).")
    entity: str | None = Field(None, description="Team or user.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class MlflowIntegration(_Strict):
    """Where a job logs to MLflow."""

    tracking_uri: str = Field(min_length=1, description="MLflow tracking server URI.")
    experiment: str = Field("warp", min_length=1, description="Experiment name.")


class Integration(_Strict):
    """A tracker the job logs its hyperparameters, losses, metrics and plot to."""

    type: Literal["wandb", "mlflow"]
    wandb: WandbIntegration | None = None
    mlflow: MlflowIntegration | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Self:
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type} integration needs its {self.type} settings")
        return self


class Resources(_Strict):
    """What a job runs on."""

    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes the job runs in, one per GPU (or per CPU process where there is "
        "no GPU), launched by torchrun with the model sharded by FSDP2.",
    )


class JobSpec(_Strict):
    """A WaRP alignment job: what to fine-tune, on which data, and how."""

    base_model: str = Field(
        min_length=1, description="Hugging Face model id or local directory (no remote code)."
    )
    method: Literal["warp", "full"] = Field(
        "warp", description="warp: masked rotated fine-tuning; full: the plain baseline."
    )
    safety_data: DatasetRef = Field(description="Harmful prompts with refusals (Phases 1-2).")
    utility_data: UtilityData = Field(
        description="The task to learn (Phase 3); `poison` mixes harmful examples into it."
    )
    validation_data: DatasetRef | None = Field(
        None,
        description="Held-out rows of the task: their response loss is taken during Phase 3 "
        "(hyperparameters.eval_every) and reported with the training loss.",
    )
    eval: EvalSpec = Field(default_factory=EvalSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    resources: Resources = Field(default_factory=Resources)
    integrations: list[Integration] = Field(
        default_factory=list, description="Trackers to log to (W&B, MLflow)."
    )

    @field_validator("base_model")
    @classmethod
    def _no_urls(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("must be a Hugging Face model id or a local directory, not a URL")
        return value

    @model_validator(mode="after")
    def _default_eval_sets(self) -> Self:
        """Fill omitted eval sets with held-out rows, so spec.json records what was run."""
        if not self.eval.enabled:
            return self
        ev = self.eval
        # The utility default is what it was when the benign default was the rows after
        # utility_data's: those rows, or an explicit benign set that has answers to score.
        benign_utility = ev.benign if ev.benign and ev.benign.has_responses else None
        try:
            harmful = ev.harmful or self.safety_data.following(ev.limit)
            utility = ev.utility or benign_utility or self.utility_data.following(ev.limit)
        except ValueError as exc:
            raise ValueError(
                f"eval: {exc}; set a limit on it or give the eval sets explicitly"
            ) from exc
        benign = ev.benign or DatasetRef(source=str(XSTEST_PROMPTS), preset="xstest-safe")
        contrast = ev.contrast or DatasetRef(source=str(XSTEST_PROMPTS), preset="xstest-unsafe")
        sets = {"harmful": harmful, "benign": benign, "contrast": contrast, "utility": utility}
        self.eval = ev.model_copy(update=sets)
        return self

    @model_validator(mode="after")
    def _responses_where_needed(self) -> Self:
        """Training sets and the utility set are read for their answers; the refusal checks'
        sets for their prompts only (a response column there would go unused)."""
        for where, ref in self.dataset_refs():
            if where in REFUSAL_SETS:
                continue
            if not ref.has_responses:
                raise ValueError(
                    f"{where}: needs a response to learn or score: set response_field"
                    + (f" ({ref.preset} has prompts only)" if ref.preset else "")
                )
        return self

    def dataset_refs(self) -> Iterator[tuple[str, DatasetRef]]:
        """Every dataset the job reads, with its field path (`eval.benign`): the one list of
        them, for source rules, preflight checks and making uploads local."""
        yield "safety_data", self.safety_data
        yield "utility_data", self.utility_data
        if self.utility_data.poison is not None:
            yield "utility_data.poison", self.utility_data.poison
        if self.validation_data is not None:
            yield "validation_data", self.validation_data
        if self.eval.enabled:
            for name in EVAL_SETS:
                if (ref := getattr(self.eval, name)) is not None:
                    yield f"eval.{name}", ref

    def map_datasets(self, change: Callable[[DatasetRef], DatasetRef]) -> JobSpec:
        """A copy with `change` applied to every dataset reference of `dataset_refs`."""
        changed = {where: change(ref) for where, ref in self.dataset_refs()}
        evals = {k.removeprefix("eval."): v for k, v in changed.items() if k.startswith("eval.")}
        return self.model_copy(
            update={
                "safety_data": changed["safety_data"],
                "utility_data": changed["utility_data"].model_copy(
                    update={"poison": changed.get("utility_data.poison")}
                ),
                "validation_data": changed.get("validation_data"),
                "eval": self.eval.model_copy(update=evals),
            }
        )


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a spec file (raises pydantic.ValidationError naming the field)."""
    return JobSpec.model_validate(json.loads(Path(path).read_text()))


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: `field.path: reason`."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "\n".join(lines)
