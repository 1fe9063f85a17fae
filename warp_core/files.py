"""Writing files and directories so that a reader never sees half of one."""

from __future__ import annotations

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
