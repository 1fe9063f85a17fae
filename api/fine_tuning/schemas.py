"""OpenAI's fine-tuning objects, as the `openai` SDK reads them (its `types/fine_tuning`), with
this API's own fields beside them.

Requests take OpenAI's hyperparameter names (`n_epochs`, `batch_size`,
`learning_rate_multiplier`, each a number or "auto") and every name of
`JobSpec.hyperparameters` (copied from it here, descriptions and limits included, so the
schema documents them); `api.fine_tuning.service` turns a request into a `JobSpec`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator

from api.jobs.schemas import ArtifactOut, Progress
from service.status import JobStatus
from warp_core.spec import EVAL_SETS, EvalSpec, Hyperparameters, Integration

Auto = Literal["auto"]
MethodType = Literal["supervised", "warp"]
FineTuningStatus = Literal[
    "validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"
]


def unix(moment: datetime | None) -> int | None:
    """OpenAI's timestamps: Unix seconds."""
    return None if moment is None else int(moment.timestamp())


def _optional_copies(model: type[BaseModel], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """`model`'s fields with their types, limits and descriptions, each optional: a request
    names only what it changes (`model_fields_set`), and the spec's own defaults fill the rest.
    The default None is never validated, so the schema keeps each field's real type."""
    return {
        name: (
            Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation,
            Field(None, description=field.description),
        )
        for name, field in model.model_fields.items()
        if name not in skip
    }


class _OpenAIHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[int, Field(gt=0)] | Auto = Field(
        "auto", description="Passes over the training file (our `epochs`); auto: the spec's 3"
    )
    batch_size: Annotated[int, Field(gt=0, le=4096)] | Auto = Field(
        "auto",
        description="Examples per optimizer step (OpenAI's meaning): split into our micro-batch "
        "(`batch_size`, at most 8) times `grad_accum_steps`; auto: 8 x 2 = 16",
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto",
        description="Scales `learning_rate` (default 5e-5, the spec's); auto: 1",
    )


FineTuneHyperparameters = create_model(
    "FineTuneHyperparameters",
    __base__=_OpenAIHyperparameters,
    __doc__="OpenAI's three hyperparameters and every one of `JobSpec.hyperparameters` but "
    "`batch_size` (OpenAI's `batch_size` counts examples per optimizer step).",
    **_optional_copies(Hyperparameters, skip=("batch_size",)),
)

EvalSettings = create_model(
    "EvalSettings",
    __config__=ConfigDict(extra="forbid"),
    __doc__="The before/after evaluation's sizes and judge (`JobSpec.eval`); its sets come "
    "from the files (held-out rows of the safety file, the validation file) and, for "
    "over-refusal, XSTest's prompts.",
    **_optional_copies(EvalSpec, skip=EVAL_SETS),
)


class SupervisedMethod(BaseModel):
    """Plain fine-tuning (our `method: full`)."""

    model_config = ConfigDict(extra="forbid")

    hyperparameters: FineTuneHyperparameters = Field(default_factory=FineTuneHyperparameters)
    safety_file: str | None = Field(
        None,
        description="Ours: refusals (harmful prompts, refusing answers) to measure the refusal "
        "rate before and after on held-out rows of (with a validation_file); not trained on",
    )
    eval: EvalSettings = Field(default_factory=EvalSettings)


class WarpMethod(SupervisedMethod):
    """WaRP: Phases 1-2 learn from the safety file which weight directions carry refusals,
    Phase 3 fine-tunes with those frozen."""

    safety_file: str = Field(
        description="Refusals: harmful prompts with the aligned model's refusing answers "
        "(chat `messages`, or prompt/completion columns)"
    )


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: MethodType = Field(description="supervised (plain fine-tuning) or warp")
    supervised: SupervisedMethod | None = None
    warp: WarpMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        other = "warp" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"a {self.type} method takes no {other} settings")
        if self.type == "warp" and self.warp is None:
            raise ValueError("a warp method needs its warp settings: {safety_file, ...}")
        return self

    @property
    def settings(self) -> SupervisedMethod:
        return getattr(self, self.type) or SupervisedMethod()


Suffix = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\w.-]+$")]
Metadata = dict[
    Annotated[str, StringConstraints(max_length=64)],
    Annotated[str, StringConstraints(max_length=512)],
]


class FineTuningJobCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs`, as `client.fine_tuning.jobs.create(...)` sends it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        description="The base model: a Hub id, a directory under WARP_DATA_ROOTS, or a model "
        "of one of your succeeded jobs (`fine_tuned_model`, or a checkpoint's "
        "`fine_tuned_model_checkpoint`)",
    )
    training_file: str = Field(description="An uploaded file's id: the task to learn")
    validation_file: str | None = Field(
        None, description="An uploaded file's id: its loss is reported as valid_loss"
    )
    method: Method | None = Field(None, description="Default: supervised")
    hyperparameters: FineTuneHyperparameters | None = Field(
        None, description="Deprecated by OpenAI in favour of method.<type>.hyperparameters"
    )
    seed: Annotated[int, Field(ge=0)] | None = Field(
        None, description="hyperparameters.seed (default 0: the same request, the same weights)"
    )
    suffix: Suffix | None = Field(
        None,
        description="A label kept with the job (OpenAI puts it in the model's name; this "
        "service names a job's model job:<job id>/model)",
    )
    metadata: Annotated[Metadata, Field(max_length=16)] | None = Field(
        None, description="Up to 16 pairs: keys of up to 64 characters, values of up to 512"
    )
    integrations: list[Integration] | None = Field(
        None, description="Trackers: wandb ({project, name, entity, tags}) or mlflow"
    )


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class OpenAIHyperparametersOut(BaseModel):
    """What the job runs with, in OpenAI's terms."""

    n_epochs: int
    batch_size: int = Field(description="Examples per optimizer step")
    learning_rate_multiplier: float = Field(description="learning_rate / 5e-5")


class MethodSettingsOut(BaseModel):
    hyperparameters: dict[str, Any] = Field(
        description="OpenAI's three and all of the spec's, as the job runs them"
    )
    safety_file: str | None


class MethodOut(BaseModel):
    type: MethodType
    supervised: MethodSettingsOut | None = None
    warp: MethodSettingsOut | None = None


class FineTuningJobOut(BaseModel):
    """The `fine_tuning.job` object, and this API's own view of the same job."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    status: FineTuningStatus = Field(
        description="OpenAI's statuses and paused; a job pausing or being cancelled is running "
        "until its worker stops it at its next step"
    )
    service_status: JobStatus = Field(
        description="Ours: the status /v1/jobs reports (pausing and cancelling included)"
    )
    model: str = Field(description="The base model the spec names")
    fine_tuned_model: str | None = Field(description="Once succeeded: usable as `model`")
    organization_id: str = Field(description="The API key that owns the job")
    training_file: str
    validation_file: str | None
    result_files: list[str] = Field(description="File ids: the step-metrics CSV")
    hyperparameters: OpenAIHyperparametersOut
    method: MethodOut
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]]
    trained_tokens: int | None
    estimated_finish: int | None = Field(
        description="Unix time the job should finish by, from its progress so far"
    )
    error: FineTuningError | None
    metrics: dict[str, Any] | None = Field(description="Ours: before/after metrics.json")
    attempt: int = Field(description="Ours: 1 on the first run, +1 on each redelivery or resume")
    phase: str | None
    progress: Progress
    artifacts: list[ArtifactOut] = Field(description="Ours: every output file, once succeeded")


class FineTuningEventOut(BaseModel):
    """A `fine_tuning.job.event`: every event of the job but progress ticks and uploaded
    files (those are on /v1/jobs/{id}/events)."""

    id: str = Field(description="Usable as `after` to page to older events")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class CheckpointMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None


class FineTuningCheckpointOut(BaseModel):
    """A `fine_tuning.job.checkpoint`: an intermediate model the job exported."""

    id: str = Field(description="Usable as `after` to page to earlier checkpoints")
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics
    fine_tuned_model_checkpoint: str = Field(
        description="Usable as `model` once the job has succeeded"
    )
    path: str = Field(description="Ours: its directory among the job's artifacts")
