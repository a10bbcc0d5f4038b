"""A benchmark's work folder: made fresh, removed afterwards unless ``--keep``."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def work_folder(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A new folder under the system's temporary folder; kept (and named) with ``keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
