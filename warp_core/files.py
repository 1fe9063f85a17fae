"""Writing files and directories so that a reader never sees half of one, and naming what a
file holds by its digest."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield the partial path to write `path` to; when the block succeeds, rename it over
    `path` (a directory is replaced whole).

    A reader sees the old version or the new one, and a crash mid-write leaves the old one
    intact. The partial name ends in `.partial`, which the artifact uploader skips.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    yield partial
    if partial.is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(partial, path)


def sha256_of(path: Path) -> str:
    """The file's SHA-256, hex: what a model card names a local dataset by."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
