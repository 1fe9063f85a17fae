"""Where a job's step metrics go: `results.csv`, TensorBoard, and the trackers it names.

Every optimizer step makes one `StepMetrics` (training loss, learning rate, gradient norm,
tokens, and the validation loss on the steps it is taken). Rank 0 appends it to
`results.csv`, reports it as a `metrics` event and logs it to TensorBoard (always) and to
the job's `integrations` (Weights & Biases, MLflow); the before/after metrics and the
trade-off plot follow at the end. Other ranks record nothing.

A tracker is an observer: `results.csv`, `tensorboard/` and `metrics.json` hold every figure
it receives. So a tracker that cannot be reached, or fails later, does not fail the job: it
is dropped for the rest of the run with a warning (a `log` event of level `warning`), and
the GPUs keep training. Its run id is kept in `tracking.json`, so a resumed job logs to the
same W&B and MLflow runs.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from warp_core.export import read_json, write_json
from warp_core.files import replacing
from warp_core.spec import Integration, MlflowIntegration, WandbIntegration

RESULTS_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "grad_norm", "tokens")
"""`results.csv`'s columns. OpenAI's results file starts `step,train_loss,...,valid_loss`;
these keep its names for the figures both have (valid_loss empty on steps without one) and
add what this trainer measures instead of token accuracy: the learning rate, the gradient
norm before clipping and the step's tokens (prompts and responses; their sum is the job's
trained tokens)."""


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step's record: a row of results.csv, a `metrics` event, a tracker point."""

    step: int
    train_loss: float
    learning_rate: float
    grad_norm: float
    tokens: int
    valid_loss: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        """The `metrics` event's data: `valid_loss` only on steps where it was taken."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    def scalars(self) -> dict[str, float]:
        """The step's figures under the names every tracker shows them by."""
        values = {
            "train/loss": self.train_loss,
            "train/learning_rate": self.learning_rate,
            "train/grad_norm": self.grad_norm,
            "train/tokens": float(self.tokens),
        }
        if self.valid_loss is not None:
            values["valid/loss"] = self.valid_loss
        return values

    @classmethod
    def from_row(cls, row: dict[str, str]) -> StepMetrics:
        return cls(
            step=int(row["step"]),
            train_loss=float(row["train_loss"]),
            learning_rate=float(row["learning_rate"]),
            grad_norm=float(row["grad_norm"]),
            tokens=int(row["tokens"]),
            valid_loss=float(row["valid_loss"]) if row["valid_loss"] else None,
        )


class ResultsFile:
    """`results.csv`: one row per optimizer step, appended as the steps run (floats written
    exactly, by `repr`).

    A row is appended before its step's training checkpoint is saved, so the rows always
    reach at least the step a resumed run starts from; `resume_at` drops the ones after it,
    which that run does again. The file thus never has a duplicate or a gap.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[StepMetrics] = self._read()

    def _read(self) -> list[StepMetrics]:
        if not self.path.exists():
            return []
        text = self.path.read_text()
        # A line cut short by a killed process lies past the last checkpoint: resume drops it.
        complete = text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(complete)))
        return [StepMetrics.from_row(row) for row in rows]

    def resume_at(self, step: int) -> None:
        """Keep the rows of steps up to `step` (0: none), the state a run resumes from."""
        self.rows = [row for row in self.rows if row.step <= step]
        with replacing(self.path) as partial:
            partial.write_text(_csv_lines([_header(), *map(_row, self.rows)]))

    def append(self, metrics: StepMetrics) -> None:
        self.rows.append(metrics)
        with self.path.open("a") as file:
            file.write(_csv_lines([_row(metrics)]))

    def through(self, step: int) -> list[StepMetrics]:
        """The rows of steps up to `step`."""
        return [row for row in self.rows if row.step <= step]


def _header() -> list[str]:
    return list(RESULTS_COLUMNS)


def _row(metrics: StepMetrics) -> list[str]:
    values = {key: "" if value is None else repr(value) for key, value in asdict(metrics).items()}
    return [values[column] for column in RESULTS_COLUMNS]


def _csv_lines(rows: Sequence[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def summary_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The before/after evaluation of `metrics.json` as `before/<name>`, `after/<name>`."""
    return {
        f"{which}/{name}": float(value)
        for which in ("before", "after")
        for name, value in (metrics.get(which) or {}).items()
        if value is not None
    }


class Tracker(Protocol):
    """One destination of a job's figures. Each call may raise: `Tracking` drops it then."""

    name: str

    def resume_at(self, step: int) -> None:
        """Fine-tuning (re)starts after `step`: steps past it will be logged again."""

    def log_step(self, metrics: StepMetrics) -> None: ...

    def log_summary(self, metrics: dict[str, Any], plot: Path | None) -> None:
        """The before/after evaluation (`metrics.json`) and the trade-off plot, if drawn."""

    def finish(self, status: str) -> None:
        """The run ended: `succeeded`, `failed` or `cancelled`."""


class TensorBoard:
    """Event files under `tensorboard/`, one per run of the job (`SummaryWriter`)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, params: dict[str, Any]) -> None:
        self.log_dir = log_dir
        self.params = params
        self._writer: Any = None
        self._purge_from: int | None = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_from)
            self._writer.add_text("job", f"```json\n{json.dumps(self.params, indent=2)}\n```")
        return self._writer

    def resume_at(self, step: int) -> None:
        """A new event file whose first step hides what an earlier run logged past `step`
        (TensorBoard's `purge_step`), so the curves show each step once."""
        self.finish("")
        self._purge_from = step + 1

    def log_step(self, metrics: StepMetrics) -> None:
        for tag, value in metrics.scalars().items():
            self.writer.add_scalar(tag, value, metrics.step)
        self.writer.flush()  # a killed run keeps the steps it logged

    def log_summary(self, metrics: dict[str, Any], plot: Path | None) -> None:
        steps = metrics["training"]["steps"]
        for tag, value in summary_scalars(metrics).items():
            self.writer.add_scalar(tag, value, 0 if tag.startswith("before/") else steps)
        self.writer.flush()

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Wandb:
    """A Weights & Biases run (offline too: `WANDB_MODE=offline` writes it under W&B's
    directory, `WANDB_DIR` or `./wandb`, for `wandb sync`)."""

    name = "wandb"

    def __init__(
        self, settings: WandbIntegration, run_id: str, params: dict[str, Any], resume: str | None
    ) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or run_id,
            tags=settings.tags,
            config=params,
            id=resume,
            resume="allow" if resume else None,
            reinit="create_new",  # one process may run several jobs (a library caller)
            # The job draws its own progress; W&B's console capture would log it as text.
            settings=wandb.Settings(console="off", silent=True),
        )
        self.id = self.run.id

    def resume_at(self, step: int) -> None:
        """Nothing to do: W&B ignores a step lower than the run's last (it keeps the first)."""

    def log_step(self, metrics: StepMetrics) -> None:
        self.run.log(metrics.scalars(), step=metrics.step)

    def log_summary(self, metrics: dict[str, Any], plot: Path | None) -> None:
        self.run.summary.update(summary_scalars(metrics))
        if plot is not None:
            self.run.log({"report/tradeoff": self.wandb.Image(str(plot))})

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "succeeded" else 1)


MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


class Mlflow:
    """An MLflow run in `experiment` (created if missing) on the tracking server, through
    `MlflowClient` (no process-wide active run, so a library caller's own runs are left
    alone). An unreachable server fails after MLflow's own retries
    (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `MLFLOW_HTTP_REQUEST_TIMEOUT`)."""

    name = "mlflow"

    def __init__(
        self, settings: MlflowIntegration, run_id: str, params: dict[str, Any], resume: str | None
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self.metric = Metric
        self.client = MlflowClient(settings.tracking_uri)
        if resume:
            self.id = resume
            self.client.update_run(resume, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(settings.experiment)
        experiment = (
            found.experiment_id if found else self.client.create_experiment(settings.experiment)
        )
        run = self.client.create_run(experiment, run_name=run_id, tags={"warp.run_id": run_id})
        self.id = run.info.run_id
        flat = [Param(key, str(value)[:6000]) for key, value in _flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes 100 params a batch
            self.client.log_batch(self.id, params=flat[start : start + 100])

    def resume_at(self, step: int) -> None:
        """Nothing to do: MLflow keeps every point; a step done again is logged again."""

    def _log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        points = [self.metric(key, value, now, step) for key, value in values.items()]
        self.client.log_batch(self.id, metrics=points)

    def log_step(self, metrics: StepMetrics) -> None:
        self._log(metrics.scalars(), metrics.step)

    def log_summary(self, metrics: dict[str, Any], plot: Path | None) -> None:
        scalars = summary_scalars(metrics)
        self._log({k: v for k, v in scalars.items() if k.startswith("before/")}, 0)
        steps = metrics["training"]["steps"]
        self._log({k: v for k, v in scalars.items() if k.startswith("after/")}, steps)
        if plot is not None:
            self.client.log_artifact(self.id, str(plot))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.id, MLFLOW_STATUS.get(status, "FAILED"))


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (MLflow params are flat strings)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


Warn = Callable[[str], None]


class Tracking:
    """The job's trackers, called together; one that raises is dropped with a warning."""

    def __init__(self, trackers: list[Tracker], warn: Warn) -> None:
        self.trackers = trackers
        self.warn = warn

    @classmethod
    def open(
        cls,
        out_dir: Path,
        integrations: Sequence[Integration],
        run_id: str,
        params: dict[str, Any],
        warn: Warn,
    ) -> Tracking:
        """TensorBoard under `out_dir/tensorboard`, and each integration's run: the one named
        in `tracking.json` when the job resumes, else a new one, recorded there."""
        ids_path = out_dir / "tracking.json"
        ids: dict[str, str] = read_json(ids_path) if ids_path.exists() else {}
        trackers: list[Tracker] = [TensorBoard(out_dir / "tensorboard", params)]
        for integration in integrations:
            kind = Wandb if integration.type == "wandb" else Mlflow
            try:
                tracker = kind(
                    getattr(integration, integration.type),
                    run_id,
                    params,
                    ids.get(integration.type),
                )
            except Exception as exc:  # any failure to start means the same: log without it
                warn(f"{integration.type}: not logging to it: {type(exc).__name__}: {exc}")
                continue
            trackers.append(tracker)
            ids[integration.type] = tracker.id
        if ids:
            write_json(ids_path, ids)
        return cls(trackers, warn)

    def _each(self, action: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker is an observer: the job goes on without it
                self.trackers.remove(tracker)
                self.warn(
                    f"{tracker.name}: {action} failed, no more logging to it in this run: "
                    f"{type(exc).__name__}: {exc}"
                )

    def resume_at(self, step: int) -> None:
        self._each("resume", lambda tracker: tracker.resume_at(step))

    def log_step(self, metrics: StepMetrics) -> None:
        self._each("logging a step", lambda tracker: tracker.log_step(metrics))

    def log_summary(self, metrics: dict[str, Any], plot: Path | None) -> None:
        self._each("logging the evaluation", lambda tracker: tracker.log_summary(metrics, plot))

    def finish(self, status: str) -> None:
        self._each("finishing", lambda tracker: tracker.finish(status))
        self.trackers = []
