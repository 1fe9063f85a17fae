"""The artifact store: job outputs and uploaded files under one fsspec URL.

Layout: `{url}/jobs/{job_id}/{name}` for artifacts (name = path inside the job's output
directory) and `{url}/files/{file_id}/data.{ext}` for uploads. A local directory by
default, a shared volume in compose, object storage (s3://, gs://) in production.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec

CHUNK = 1 << 20
SKIPPED = ("checkpoints/", "state.json")
"""Resume bookkeeping in a job's output directory: not an artifact."""


@dataclass(frozen=True)
class StoredFile:
    name: str
    size: int
    sha256: str


class ArtifactStore:
    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def job_path(self, job_id: str, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"artifact name {name!r} leaves the job's directory")
        return self._path("jobs", job_id, name)

    def file_path(self, file_id: str, ext: str) -> str:
        return self._path("files", file_id, f"data.{ext}")

    def put(self, source: IO[bytes], path: str) -> StoredFile:
        """Copy a stream into the store, hashing it on the way."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with self.fs.open(path, "wb") as target:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                target.write(chunk)
        return StoredFile(path, size, digest.hexdigest())

    def upload_outputs(self, out_dir: Path, job_id: str) -> Iterator[StoredFile]:
        """Every file of a finished job's output directory, named by its relative path."""
        for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
            name = path.relative_to(out_dir).as_posix()
            if name.startswith(SKIPPED) or name.endswith(".partial"):
                continue
            with path.open("rb") as source:
                stored = self.put(source, self.job_path(job_id, name))
            yield StoredFile(name, stored.size, stored.sha256)

    def open(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb")

    def download(self, path: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(path, str(target))

    def download_job_dir(self, job_id: str, name: str, target: Path) -> int:
        """Every artifact of a job under the directory `name` (a model it exported), copied
        into `target` with their relative paths; returns how many files there were."""
        prefix = self.job_path(job_id, name).rstrip("/") + "/"
        paths = self.fs.find(prefix)
        for path in paths:
            self.download(path, target / path.removeprefix(prefix))
        return len(paths)

    def delete(self, path: str) -> None:
        """Remove a stored file; one already gone is no error (a delete is retried)."""
        if self.fs.exists(path):
            self.fs.rm(path)
