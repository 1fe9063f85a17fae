"""`warp`: run WaRP jobs from the command line (`warp run SPEC.json --out DIR`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from warp_core.events import Cancelled, Event
from warp_core.spec import JobSpec, format_validation_error, load_spec

if TYPE_CHECKING:
    from warp_core.finetune import StepReport
    from warp_core.plan import ModelShape, Plan
    from warp_core.spec import JobSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
PROGRESS_COLUMNS = (
    TextColumn("{task.description:<20}"),
    BarColumn(),
    TextColumn("{task.completed}/{task.total}"),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
    TextColumn("{task.fields[info]}"),
)
"""One progress bar layout for every command (phases, toy training, downloads)."""


class ProgressView:
    """One rich progress bar per phase, fed by pipeline events."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, event: Event) -> None:
        data = event.data
        label = event.phase + (f" ({data['stage']})" if "stage" in data else "")
        if event.kind == "phase_started":
            self.tasks[event.phase] = self.progress.add_task(label, total=None, info="")
        elif event.kind == "progress" and event.phase in self.tasks:
            info = (
                f"loss {data['loss']:.4f}  lr {data['learning_rate']:.2e}" if "loss" in data else ""
            )
            self.progress.update(
                self.tasks[event.phase],
                completed=data["step"],
                total=data["total_steps"],
                info=info,
            )
        elif event.kind == "phase_finished" and event.phase in self.tasks:
            task = self.tasks.pop(event.phase)
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total, total=total)
        elif event.kind == "log":
            self.progress.console.print(f"[dim]{event.phase or ''}: {data['message']}[/dim]")
        elif event.kind == "checkpoint":
            self.progress.console.print(f"[dim]model of step {data['step']}: {data['path']}[/dim]")


@app.command("run")
def run_command(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.json", help="The job spec.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (resumes if it exists).")],
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: auto)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node",
            min=1,
            help="Processes (one per GPU) to run the job in, through torchrun with the model "
            "sharded by FSDP2 (default: the spec's resources.gpus).",
        ),
    ] = None,
    events: Annotated[
        Path | None,
        typer.Option(help="Append every event, and each process's exit, as JSON lines."),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help="The job's id in its model cards and trackers (the service passes its job "
            "id; default: the id of the run --out holds, or a new one).",
        ),
    ] = None,
) -> None:
    """Run a WaRP (or plain fine-tuning) job and write its artifacts to --out.

    SIGTERM or Ctrl-C stops it at its next step; the same command then resumes it.
    """
    from warp_core import launch
    from warp_core.pipeline import run  # torch loads only when a job runs

    spec = read_spec(spec_path)
    processes = nproc_per_node or spec.resources.gpus
    if launch.under_torchrun():
        launch.die_with(os.getppid())  # torchrun
    elif processes > 1:
        raise typer.Exit(launch.run_torchrun(processes, sys.argv[1:]))
    stop = launch.StopSignal().install()
    log = launch.EventLog(events) if events else None
    main = launch.rank() == 0
    _quiet_libraries()
    try:
        with Progress(*PROGRESS_COLUMNS, console=console, disable=not main) as progress:
            view = ProgressView(progress)

            def on_event(event: Event) -> None:
                view(event)
                if log:
                    log.event(event)

            metrics = run(
                spec,
                out,
                on_event=on_event,
                should_stop=stop.requested,
                device=device,
                run_id=run_id,
            )
    except (KeyboardInterrupt, Cancelled):
        if log:
            log.exit(processes, "cancelled")
        if main:
            resume = f"stopped; run the same command again to resume from {out}"
            console.print(f"[yellow]{resume}[/yellow]")
        launch.leave(launch.EXIT_STOPPED)
    except Exception as exc:  # the CLI's job is to turn any failure into a message and a code
        message = f"{type(exc).__name__}: {exc}"
        if log:
            log.exit(processes, "failed", message)
        console.print(f"[red]job failed:[/red] {message}")
        launch.leave(1)
    if log:
        log.exit(processes, "succeeded")
    if main and as_json:
        print(json.dumps({"out": str(out), **metrics}))
    elif main:
        show_summary(metrics, out)
    launch.leave(0)


def read_spec(spec_path: Path) -> JobSpec:
    """The spec at `spec_path`, or exit 2 with one line per problem."""
    try:
        return load_spec(spec_path)
    except ValidationError as exc:
        console.print(f"[red]invalid spec {spec_path}:[/red]\n{format_validation_error(exc)}")
        raise typer.Exit(2) from None
    except (OSError, json.JSONDecodeError) as exc:
        console.print(f"[red]cannot read spec {spec_path}:[/red] {exc}")
        raise typer.Exit(2) from None


def show_summary(metrics: dict, out: Path) -> None:
    """Before/after metrics as a table, and where the artifacts are."""
    table = Table(title=f"{metrics['method']} job: before -> after")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = metrics["before"] or {}, metrics["after"] or {}
    for name in dict.fromkeys([*before, *after]):
        table.add_row(name, _number(before.get(name)), _number(after.get(name)))
    out_console = Console()
    if before or after:
        out_console.print(table)
    out_console.print(
        f"artifacts: {out}/ (model/, metrics.json, results.csv, checkpoints.json, warp/, eval/)"
    )


@app.command(
    "make-toy-model",
    help=(
        "Build a tiny safety-aligned chat model from the example data, and WaRP jobs for it."
        "\n\nThe model learns to refuse Do-Not-Answer questions and to answer GSM8K ones "
        "(about a minute on one CPU core; cached by its settings). "
        "`warp run OUT/spec.json --out DIR` then shows whether WaRP keeps its refusals while "
        "it learns GSM8K; OUT/spec-full.json is the same job with plain fine-tuning."
    ),
)
def make_toy_model_command(
    out: Annotated[Path, typer.Option("--out", help="Output directory (model/, data/, specs).")],
    seed: Annotated[int, typer.Option(help="Initialisation and data order.")] = 0,
    steps: Annotated[int, typer.Option(help="Alignment training steps.")] = 300,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
    vocab: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 2048,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Built models by settings (default: $WARP_TOY_CACHE or ~/.cache/...)."),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Train even if cached.")] = False,
) -> None:
    """Build a tiny safety-aligned chat model from the example data, and WaRP jobs for it."""
    from warp_core.toy import ToyConfig, default_cache_dir, make_toy_model

    try:
        config = ToyConfig(
            seed=seed, steps=steps, hidden_size=hidden, num_layers=layers, vocab_size=vocab
        )
    except ValidationError as exc:
        console.print(f"[red]invalid settings:[/red]\n{format_validation_error(exc)}")
        raise typer.Exit(2) from None
    _quiet_libraries()
    trained = [False]
    try:
        with Progress(*PROGRESS_COLUMNS, console=console, transient=True) as progress:
            task = progress.add_task("aligning toy model", total=config.steps, info="")

            def on_step(step: StepReport) -> None:
                trained[0] = True
                info = f"loss {step.loss:.4f}  lr {step.learning_rate:.2e}"
                progress.update(task, completed=step.step, info=info)

            spec_path = make_toy_model(
                out, config, cache_dir or default_cache_dir(), on_step, use_cache=not no_cache
            )
    except KeyboardInterrupt:
        console.print("[yellow]stopped[/yellow]")
        raise typer.Exit(130) from None
    except Exception as exc:  # turn any failure into a message and a code
        console.print(f"[red]build failed:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    toy = json.loads((spec_path.parent / "toy.json").read_text(encoding="utf-8"))
    aligned = toy["aligned"]
    # Plain echo: rich would wrap long paths and read brackets in them as markup.
    typer.echo(f"{'trained' if trained[0] else 'from cache'} (key {toy['cache_key']})")
    typer.echo(
        f"held-out refusal rate {aligned['refusal_rate']:.2f}, "
        f"over-refusal rate {aligned['over_refusal_rate']:.2f}, "
        f"utility loss {aligned['utility_loss']:.3f}"
    )
    typer.echo(f"model:  {spec_path.parent / 'model'}")
    typer.echo(f"spec:   {spec_path} (WaRP)")
    typer.echo(f"        {spec_path.parent / 'spec-full.json'} (plain fine-tuning)")
    typer.echo(f"run it: warp run {spec_path} --out runs/toy-warp")


@app.command(
    "plan",
    help=(
        "Predict a job's peak memory per process, phase by phase, from its model's "
        "config.json alone: no weights are loaded (a directory holding only config.json "
        "will do).\n\nPrints per phase the model resident at its start, what the phase adds "
        "and their sum (what a GPU holds), the GPU sizes the job fits and, for the others, "
        "the options that would make it fit, cheapest first."
    ),
)
def plan_command(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.json", help="The job spec.")],
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node", min=1, help="Processes (default: the spec's resources.gpus)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    device: Annotated[
        str, typer.Option(help="cuda (what a GPU holds) or cpu (what metrics.json reports there).")
    ] = "cuda",
) -> None:
    """Predict a job's peak memory per process and phase from its model's config.json alone."""
    from warp_core import plan as planning

    if device not in ("cuda", "cpu"):
        console.print(f"[red]--device must be cuda or cpu, not {device!r}[/red]")
        raise typer.Exit(2)
    spec = read_spec(spec_path)
    _quiet_libraries()
    try:
        shape = planning.read_shape(spec.base_model, spec.hyperparameters.target_modules)
    except Exception as exc:  # any loader failure means the same thing to the user
        console.print(f"[red]cannot plan {spec.base_model!r}:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    processes = nproc_per_node or spec.resources.gpus
    spec = planning.apply(spec, [planning.Change("", {"resources.gpus": processes})])
    predicted = planning.plan(spec, shape, device=device)
    gpus = _gpu_fits(spec, shape, predicted) if device == "cuda" else []
    if as_json:
        print(json.dumps({**predicted.as_dict(), "kept_free": planning.KEPT_FREE, "gpus": gpus}))
    else:
        _show_plan(predicted, gpus)


def _gpu_fits(spec: JobSpec, shape: ModelShape, predicted: Plan) -> list[dict[str, Any]]:
    """Per common GPU size: whether the plan fits and, if not, the options that would make
    it fit (`plan.ways_to_fit`; more processes are tried up to 64) and the peak with them, or
    (`options` None) the lowest peak any reaches."""
    from warp_core import plan as planning

    more = [n for n in (2, 4, 8, 16, 32, 64) if n > predicted.processes]
    found = []
    for gib in planning.GPU_SIZES_GIB:
        usable = planning.usable_bytes(gib)
        entry: dict[str, Any] = {"gib": gib, "usable": usable, "fits": predicted.peak <= usable}
        if not entry["fits"]:
            way = planning.ways_to_fit(spec, shape, lambda _n, u=usable: u, more)
            best = way[1] if way else planning.lowest(spec, shape, more)
            entry["options"] = [c.label for c in way[0]] if way else None
            entry["peak_with_options"] = best.peak
        found.append(entry)
    return found


def _show_plan(predicted: Plan, gpus: list[dict[str, Any]]) -> None:
    """The plan as a table of GiB per process, then the GPU sizes."""
    from warp_core.plan import GIB, KEPT_FREE

    out = Console()
    processes = f"{predicted.processes} process" + ("es" if predicted.processes > 1 else "")
    table = Table(
        title=f"{predicted.method} job, {processes}, {predicted.device}, {predicted.dtype}: "
        "GiB per process"
    )
    for column in ("phase", "resident", "added", "peak", "peak moment"):
        table.add_column(column, justify="left" if column.startswith("p") else "right")
    for phase in predicted.phases:
        table.add_row(
            phase.name,
            f"{phase.resident / GIB:.1f}",
            f"{phase.added / GIB:.1f}",
            f"{phase.peak / GIB:.1f}",
            phase.peak_moment.name,
        )
    out.print(table)
    if not gpus:
        out.print("on the CPU metrics.json reports `added`: the rise over the loaded model")
        return
    fits = [str(gpu["gib"]) for gpu in gpus if gpu["fits"]]
    out.print(
        f"peak {predicted.peak / GIB:.1f} GiB ({predicted.largest.name}); fits GPUs of "
        f"{', '.join(fits) or 'none of'} GiB ({KEPT_FREE:.0%} of each kept free for the CUDA "
        "context, library workspaces and allocator fragmentation)",
        highlight=False,
    )
    for gpu in gpus:
        if gpu["fits"]:
            continue
        peak = gpu["peak_with_options"] / GIB
        if gpu["options"] is None:
            line = f"no option makes it fit (at best {peak:.1f} GiB, with all of them)"
        else:
            line = f"{', '.join(gpu['options'])} -> {peak:.1f} GiB"
        out.print(f"  {gpu['gib']} GiB: {line}", highlight=False)


@app.command("judge")
def judge_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The responses to label.")],
    prompt_field: Annotated[str, typer.Option("--prompt-field", help="Column of the prompts.")],
    response_field: Annotated[
        str, typer.Option("--response-field", help="Column of the responses.")
    ],
    judge_name: Annotated[
        str, typer.Option("--judge", help="keyword, ngram or hf:<model id or path>.")
    ] = "ngram",
    device: Annotated[str | None, typer.Option(help="A model judge's device.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the labels as JSON.")] = False,
) -> None:
    """Label existing responses as refusals or not with a refusal judge.

    Judges: keyword (the phrase rule), ngram (default: a small classifier, no GPU) or
    hf:<model id or path> (a classifier or guard model). FILE is a CSV, JSON, JSONL or
    Parquet file. Prints the rows in input order, the refusal rate and the judge's
    description."""
    from warp_core.data import load_rows
    from warp_core.judge import check_judge_name, judge_record, load_judge
    from warp_core.spec import DatasetRef

    try:
        check_judge_name(judge_name)
        ref = DatasetRef(source=str(file), prompt_field=prompt_field, response_field=response_field)
        rows = load_rows(ref)
        for field in (prompt_field, response_field):
            if field not in rows[0]:
                raise ValueError(f"{file} has no column {field!r} (it has {', '.join(rows[0])})")
        judge = load_judge(judge_name, device=device)
        prompts = [str(row[prompt_field] or "") for row in rows]
        responses = [str(row[response_field] or "") for row in rows]
        verdicts = judge.refusals(prompts, responses)
    except (ValueError, OSError, KeyError, ValidationError) as exc:
        console.print(f"[red]cannot judge {file}:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    labelled = [
        {"refusal": bool(v), "prompt": p, "response": r}
        for v, p, r in zip(verdicts, prompts, responses, strict=True)
    ]
    rate = sum(verdicts) / len(verdicts)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "rows": labelled,
                    "refusal_rate": rate,
                    "judge": judge.name,
                    "judge_description": judge_record(judge)["description"],
                },
                ensure_ascii=False,
            )
        )
        return
    for index, row in enumerate(labelled):
        head = " ".join(row["response"].split()[:12])
        typer.echo(f"{index}\t{'refusal' if row['refusal'] else 'answer'}\t{head}")
    typer.echo(f"refusal rate {rate:.3f} ({sum(verdicts)}/{len(verdicts)}), judge {judge.name}")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.callback()
def main() -> None:
    """WaRP: fine-tune safety-aligned LLMs without losing their refusals."""


def _quiet_libraries() -> None:
    """The CLI draws its own progress; library bars and info logs would garble it."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
