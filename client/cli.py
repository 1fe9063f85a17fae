"""The `warp` command: WaRP jobs on this machine (`run`, `demo`, `serve`) or on a server
(`submit`, `status`, ...), and a server's administration (`admin`)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import Progress

from client.admin import admin
from client.embedded import EmbeddedService, free_port
from client.http import ServiceError, WarpClient
from client.output import JsonOption, console, emit
from warp_core.cli import (
    PROGRESS_COLUMNS,
    ProgressView,
    judge_command,
    make_toy_model_command,
    plan_command,
    run_command,
)
from warp_core.comparison import comparison_specs, labels, variant
from warp_core.events import Event

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="WaRP: fine-tune safety-aligned LLMs without losing their refusals.\n\n"
    "Commands that talk to a server read WARP_API_URL and WARP_API_KEY.",
)
app.command("run")(run_command)
app.command("plan")(plan_command)
app.command("make-toy-model")(make_toy_model_command)
app.command("judge")(judge_command)
app.add_typer(admin, name="admin")

HomeOption = Annotated[Path, typer.Option(help="Embedded state: database, artifacts, logs.")]


def exit_on_sigterm() -> None:
    """`kill` (SIGTERM) exits through the `with` blocks, so the service's processes stop too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@app.command()
def serve(
    home: HomeOption = Path(".warp"),
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
) -> None:
    """Start the API and one worker; embedded defaults where no server is configured."""
    exit_on_sigterm()
    with EmbeddedService(home, port) as service:
        console.print(
            f"API on {service.url} (dashboard: {service.url}/ui, docs: {service.url}/docs); "
            f"logs in {service.log_dir}"
        )
        console.print("Ctrl-C stops it.")
        try:
            while all(p.poll() is None for p in service.processes):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    console.print("stopped")


@app.command()
def demo(
    home: HomeOption = Path(".warp"),
    seed: Annotated[int, typer.Option(help="The toy model's seed (its jobs use it too).")] = 0,
    ablations: Annotated[
        bool, typer.Option(help="Also run WaRP with no mask and with a random mask.")
    ] = False,
) -> None:
    """See WaRP keep refusals that plain fine-tuning erases, on a tiny model (minutes).

    Builds a tiny safety-aligned model, fine-tunes it with WaRP and plainly through the
    embedded service, and shows what each kept of its refusals and gained in utility.
    """
    exit_on_sigterm()
    home = home.resolve()
    toy_dir = home / "demo" / "toy"
    command = [sys.executable, "-m", "warp_core", "make-toy-model", "--out", str(toy_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([*command, "--seed", str(seed)], check=True, env=env, stdout=subprocess.DEVNULL)
    aligned = json.loads((toy_dir / "toy.json").read_text())["aligned"]
    console.print(
        f"toy aligned model in {toy_dir}: held-out refusal rate {aligned['refusal_rate']:.2f}, "
        f"over-refusal {aligned['over_refusal_rate']:.2f}"
    )
    spec = json.loads((toy_dir / "spec.json").read_text())
    with EmbeddedService(home, free_port()) as service:
        console.print(
            f"service up on {service.url} (dashboard: {service.url}/ui, docs: {service.url}/docs)"
        )
        plot = home / "demo" / "tradeoff.png"
        result = run_comparison(WarpClient(service.url), spec, ablations, plot)
    console.print(f"artifacts (model, metrics, report.md) in {home / 'artifacts' / 'jobs'}/<id>/")
    if any(job["status"] != "succeeded" for job in result["jobs"]):
        raise typer.Exit(1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def follow(client: WarpClient, job_id: str) -> dict:
    """Progress bars from the job's event stream; returns the finished job."""
    try:
        with Progress(*PROGRESS_COLUMNS, console=console) as progress:
            view = ProgressView(progress)
            for event in client.follow(job_id):
                if event["kind"] in ("phase_started", "phase_finished", "progress", "log"):
                    view(Event(event["kind"], event["phase"], event["data"]))
    except ServiceError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    return client.job(job_id)


# -- the service's client: WARP_API_URL, WARP_API_KEY ---------------------------------------


def client() -> WarpClient:
    url = os.environ.get("WARP_API_URL", "http://127.0.0.1:8000")
    return WarpClient(url, os.environ.get("WARP_API_KEY"))


def call(action, *args, **kwargs):
    """Run a client call; a refusal or an unreachable server is a message and exit 1."""
    try:
        return action(*args, **kwargs)
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


def describe(job: dict) -> None:
    progress = job["progress"]
    line = f"{job['id']}  {job['status']:<10} {job['spec']['method']:<5}"
    if job["status"] in ("running", "pausing", "paused", "cancelling"):
        line += f" {job['phase'] or '':<10} {progress['fraction']:5.0%}"
    if job.get("error"):
        line += f"  {job['error']['code']}: {job['error']['message'][:80]}"
    Console().print(line, highlight=False)


@app.command()
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.json")],
    method: Annotated[str | None, typer.Option(help="Override the spec's method.")] = None,
    follow_job: Annotated[bool, typer.Option("--follow", help="Show progress to the end.")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe submission key.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job to the service."""
    spec = json.loads(spec_path.read_text())
    if method:
        spec["method"] = method
    job = call(client().submit, spec, idempotency_key)
    if follow_job:
        job = follow(client(), job["id"])
    emit(job, as_json, describe)


@app.command()
def status(job_id: str, as_json: JsonOption = False) -> None:
    """A job's status, phase and progress."""
    emit(call(client().job, job_id), as_json, describe)


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent jobs, newest first."""
    page = call(client().list_jobs, status, limit)
    emit(page, as_json, lambda p: [describe(job) for job in p["data"]])


@app.command()
def events(
    job_id: str,
    follow_job: Annotated[bool, typer.Option("--follow", help="Live progress bars.")] = False,
    as_json: JsonOption = False,
) -> None:
    """A job's events; --follow streams them live until the job ends."""
    if follow_job and not as_json:
        describe(follow(client(), job_id))
        return
    if follow_job:
        for event in call(lambda: list(client().follow(job_id))):
            print(json.dumps(event))
        return
    page = call(client().events, job_id)
    emit(page, as_json, lambda p: [print_event(event) for event in p["data"]])


def print_event(event: dict) -> None:
    data = json.dumps(event["data"])[:100]
    line = f"{event['seq']:>5} {event['kind']:<15} {event['phase'] or '':<10} {data}"
    Console().print(line, highlight=False)


@app.command()
def cancel(job_id: str, as_json: JsonOption = False) -> None:
    """Cancel a job (queued: at once; running: at its next step)."""
    emit(call(client().cancel, job_id), as_json, describe)


@app.command()
def pause(job_id: str, as_json: JsonOption = False) -> None:
    """Pause a job: a running one stops at its next step keeping its checkpoint (pausing,
    then paused); a queued one is paused at once."""
    emit(call(client().pause, job_id), as_json, describe)


@app.command()
def resume(job_id: str, as_json: JsonOption = False) -> None:
    """Resume a paused job: queued again, it continues from its checkpoint."""
    emit(call(client().resume, job_id), as_json, describe)


@app.command()
def download(
    job_id: str,
    target: Annotated[Path, typer.Argument(metavar="DIR")],
    only: Annotated[str | None, typer.Option(help="Only artifacts under this prefix.")] = None,
) -> None:
    """Download a job's artifacts into DIR, checking each file's sha256."""
    service = client()
    artifacts = [a for a in call(service.artifacts, job_id) if a["name"].startswith(only or "")]
    if not artifacts:
        console.print("[yellow]no artifacts[/yellow] (the job has not succeeded?)")
        raise typer.Exit(1)
    with Progress(*PROGRESS_COLUMNS, console=console) as progress:
        task = progress.add_task("download", total=sum(a["size"] for a in artifacts), info="")
        for artifact in artifacts:
            path = call(service.download, job_id, artifact["name"], target / artifact["name"])
            if sha256_of(path) != artifact["sha256"]:
                console.print(f"[red]checksum mismatch:[/red] {artifact['name']}")
                raise typer.Exit(1)
            progress.advance(task, artifact["size"])
    console.print(f"{len(artifacts)} files in {target}")


@app.command()
def compare(
    targets: Annotated[
        list[str], typer.Argument(help="Job ids, or one SPEC.json to run both ways.")
    ],
    ablations: Annotated[
        bool, typer.Option(help="With a SPEC.json: also WaRP with no mask and a random mask.")
    ] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the trade-off plot here.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Jobs side by side; with a SPEC.json, submit it as `warp` and as `full` first."""
    service = client()
    if len(targets) == 1 and targets[0].endswith(".json"):
        spec = json.loads(Path(targets[0]).read_text())
        result = run_comparison(service, spec, ablations, plot, as_json)
    else:
        result = call(service.compare, targets)
        if plot:
            draw(result, plot)
        emit(result, as_json, lambda r: show_comparison(r, plot))
    if any(job["status"] != "succeeded" for job in result["jobs"]):
        raise typer.Exit(1)


def run_comparison(
    service: WarpClient,
    spec: dict,
    ablations: bool,
    plot: Path | None,
    as_json: bool = False,
) -> dict:
    """Submit the spec's comparison jobs at once, follow each, then show them side by side."""
    jobs = [call(service.submit, job) for job in comparison_specs(spec, ablations)]
    for job in jobs:
        console.print(f"job {job['id']} ({variant(job['spec'])})")
        follow(service, job["id"])
    result = call(service.compare, [job["id"] for job in jobs])
    if plot:
        draw(result, plot)
    emit(result, as_json, lambda r: show_comparison(r, plot))
    return result


def draw(result: dict, plot: Path) -> None:
    from warp_core.report import plot_tradeoff  # matplotlib only when a plot is asked for

    names = labels([(job["id"], job["spec"]) for job in result["jobs"]])
    metrics = [job["metrics"] or {} for job in result["jobs"]]
    plot_tradeoff(list(zip(names, metrics, strict=True)), plot)


def show_comparison(result: dict, plot: Path | None) -> None:
    out = Console()
    for job in result["jobs"]:
        describe(job)
    out.print(Markdown(result["markdown"]))
    if result["refusal_rule"]:
        out.print(f"[dim]refusal rule: {result['refusal_rule'][:160]}...[/dim]")
    if plot:
        out.print(f"plot: {plot}")


if __name__ == "__main__":
    app(prog_name="warp")
