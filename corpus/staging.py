"""Writing an output folder whole or not at all: a staging folder beside it that becomes
the output only when everything in it is written."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unlearn_sweep.corpus.errors import DataError


@contextmanager
def staged_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty folder next to out_dir; on success it is renamed to out_dir, on any
    error removed. A non-empty out_dir is refused before anything is written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(out_dir, "output directory exists and is not empty")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as error:
        raise DataError(out_dir, f"cannot be written ({error.strerror})") from None
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
