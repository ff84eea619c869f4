"""Writing an output folder whole or not at all: a staging folder beside it that becomes
the output only when everything in it is written."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.scratch import left_by_an_ended_process, this_process


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def as_if_created_plainly(path: Path) -> Path:
    """The permissions an ordinary mkdir/open would have given, to the path and what it holds
    (mkdtemp, mkstemp and libraries that write through temporary files make 0700 folders and
    0600 files: unreadable to teammates on shared storage)."""
    mask = ~umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & mask)
    return path


def check_output_folder(out_dir: str | Path, may_exist: bool = False) -> None:
    """A DataError now, before any work, if out_dir could not be written as a folder later: it
    is a file, lies under a file, or its nearest existing folder cannot be written; unless
    `may_exist`, a folder with something in it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "is a file, not a folder")
    if not may_exist and out_dir.is_dir() and any(out_dir.iterdir()):
        raise DataError(out_dir, "output directory exists and is not empty")
    existing = next(parent for parent in (out_dir, *out_dir.parents) if parent.exists())
    if not existing.is_dir():
        raise DataError(out_dir, f"cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(out_dir, f"cannot be created: {existing} is not writable")


@contextmanager
def staged_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty folder next to out_dir; on success it is renamed to out_dir, on any
    error removed. A non-empty out_dir is refused before anything is written. The staging
    folder is named by its process (corpus/scratch.py): one that a process killed outright left
    beside out_dir (a whole model at 7B) is removed by the next run into out_dir."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    prefix = f".{out_dir.name}."
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for left in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
            if left_by_an_ended_process(left.name, prefix):
                shutil.rmtree(left, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{this_process()}.", dir=out_dir.parent))
        as_if_created_plainly(staging)
    except OSError as error:
        raise DataError(out_dir, f"cannot be written ({error.strerror})") from None
    try:
        yield staging
        as_if_created_plainly(staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
