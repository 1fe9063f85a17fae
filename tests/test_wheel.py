"""The installed package works without the checkout: a wheel built from this tree, installed
into a fresh virtual environment and run from an empty directory, builds the toy model, runs
a short job on the spec it writes, and migrates an embedded database.

The new environment gets the project from the wheel only; its third-party dependencies are
this environment's, reached through a plain path entry (a `.pth` line adds the directory but
processes none of the `.pth` files in it, so the checkout's editable install stays out)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import sqlite3
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from client.embedded import free_port, wait_ready
from tests.helpers import REPO
from tests.test_migrations import HEAD

pytestmark = pytest.mark.slow
NOT_SOURCES = (".git", ".venv", ".warp", "build", "dist", "*.egg-info", "__pycache__", "runs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `bin/` of a fresh venv holding the wheel of this tree."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(*NOT_SOURCES))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("warp_service-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    (purelib,) = (env_dir / "lib").glob("python3*/site-packages")
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env_dir / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir / "bin"


def environment(installed: Path, **extra: str) -> dict[str, str]:
    """This environment without the checkout on the path or service settings, with the fresh
    venv's commands first on PATH."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("WARP_")}
    return {**clean, "HF_HUB_OFFLINE": "1", "PATH": f"{installed}:{clean['PATH']}", **extra}


def run(installed: Path, cwd: Path, *argv: str, env: dict[str, str] | None = None) -> str:
    """A command of the installed package, run from `cwd` with the checkout off the path."""
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=environment(installed, **(env or {})),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{argv}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_holds_no_checkout_paths(installed, tmp_path):
    code = "import api, client, service, warp_core, worker; print(warp_core.__file__)"
    where = run(installed, tmp_path, "python", "-c", code).strip()
    assert not Path(where).is_relative_to(REPO), where
    assert "warp demo" in run(installed, tmp_path, "warp", "demo", "--help").replace("\n", " ")


def test_make_toy_model_and_a_short_run_from_an_empty_directory(installed, tmp_path):
    small = ("--steps", "8", "--hidden", "32", "--vocab", "400", "--no-cache")
    run(installed, tmp_path, "warp", "make-toy-model", "--out", "toy", *small)
    spec = json.loads((tmp_path / "toy" / "spec.json").read_text())
    spec["hyperparameters"] |= {"max_steps": 2, "checkpoint_every": 1}
    spec["eval"] |= {"max_new_tokens": 4, "utility_max_new_tokens": 4}
    for name in ("harmful", "benign", "contrast", "utility"):
        spec["eval"][name]["limit"] = 4
    (tmp_path / "short.json").write_text(json.dumps(spec))
    out = json.loads(
        run(installed, tmp_path, "warp", "run", "short.json", "--out", "run", "--json")
    )
    assert out["training"]["steps"] == 2 and out["after"]["refusal_rate"] is not None
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_embedded_mode_migrates_its_database_from_the_package(installed, tmp_path):
    run(installed, tmp_path, "warp", "admin", "migrate", env={"WARP_HOME": str(tmp_path / "home")})
    db = sqlite3.connect(tmp_path / "home" / "warp.db")
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]


def test_warp_serve_starts_the_embedded_service_from_an_empty_directory(installed, tmp_path):
    port = free_port()
    serve = subprocess.Popen(
        ["warp", "serve", "--home", "home", "--port", str(port)],
        cwd=tmp_path,
        env=environment(installed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", [serve], tmp_path / "home" / "logs", timeout_s=120)
        jobs = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=10)
        assert jobs.status_code == 200 and jobs.json()["data"] == []
        # the dashboard and the API docs come from the installed package, not a checkout
        for page in ("/ui", "/ui/static/app.js", "/docs", "/static-offline-docs/swagger-ui.css"):
            assert httpx.get(f"http://127.0.0.1:{port}{page}", timeout=10).status_code == 200
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) in (0, 143)
