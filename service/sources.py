"""Where a job may read its model and data from, on a server that runs other people's jobs.

A source is an upload (`file:<id>`, datasets only), a model another job exported
(`job:<job_id>/<dir>`, base models only), a Hub id (`name` or `owner/name`), or
an absolute path whose real location (symlinks resolved) lies under one of
`WARP_DATA_ROOTS`. Anything else is refused: URLs of any scheme, `~`, relative paths and
`..` tricks. The data shipped inside `warp_core` (`warp_core/example_data`, among it XSTest,
the default over-refusal and contrast sets a job's spec names by their installed path) is
readable whatever the roots: it is public, read-only, and part of the service itself. The
API checks this at submission (422 naming the field) and the worker again before it loads
anything, and the worker runs each job from its own empty work directory,
so a Hub-id-looking name cannot resolve to a local folder by accident.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from service.protocol import JOB_MODEL_PREFIX, UPLOAD_PREFIX
from warp_core.spec import EXAMPLE_DATA, JobSpec

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
JOB_MODEL = re.compile(
    re.escape(JOB_MODEL_PREFIX) + r"(?P<job_id>[0-9a-f]{32})/(?P<dir>[\w.-]+(/[\w.-]+)*)"
)
"""`job:<job_id>/<dir>`: a directory of another job's artifacts (the API checks that the
caller owns the job and that a model is there)."""


def job_model(source: str) -> re.Match[str] | None:
    """The job id and directory a `job:` base model names, None for any other source."""
    match = JOB_MODEL.fullmatch(source)
    return match if match and ".." not in match["dir"].split("/") else None


def problem(source: str, roots: Sequence[Path], local_file: bool = False) -> str | None:
    """Why `source` may not be read here, or None if it may."""
    if "://" in source:
        return "URLs are not accepted: use a Hub id, an upload (file:<id>) or a server path"
    if os.path.isabs(source):
        if Path(os.path.realpath(source)).is_relative_to(os.path.realpath(EXAMPLE_DATA)):
            return None
        if not roots:
            return f"this server accepts no local paths ({_allowed(roots)})"
        real = Path(os.path.realpath(source))
        if any(real.is_relative_to(os.path.realpath(root)) for root in roots):
            return None
        return f"{source} is outside the allowed roots ({_allowed(roots)})"
    if local_file or not HUB_ID.fullmatch(source) or ".." in source:
        return (
            "neither a Hub id (owner/name) nor an absolute path under the allowed roots "
            f"({_allowed(roots)})"
        )
    return None


def _allowed(roots: Sequence[Path]) -> str:
    """The configured roots, for messages that tell a user where local files may be."""
    if not roots:
        return "WARP_DATA_ROOTS is empty"
    return "WARP_DATA_ROOTS: " + ", ".join(str(root) for root in roots)


def source_problems(spec: JobSpec, roots: Sequence[Path]) -> list[dict[str, str]]:
    """`{"field", "reason"}` for every source of the spec this server may not read."""
    found = []
    if spec.base_model.startswith(JOB_MODEL_PREFIX):
        if not job_model(spec.base_model):
            reason = "a job's model is named job:<job id>/<directory>, e.g. job:<id>/model"
            found.append({"field": "base_model", "reason": reason})
    elif reason := problem(spec.base_model, roots):
        found.append({"field": "base_model", "reason": reason})
    for where, ref in spec.dataset_refs():
        if ref.source.startswith(UPLOAD_PREFIX):
            continue
        if reason := problem(ref.source, roots, local_file=ref.is_local):
            found.append({"field": f"{where}.source", "reason": reason})
    return found
