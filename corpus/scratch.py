"""Temporary and staging folders that a killed process does not leave behind for good.

Runs write whole models to temporary folders (an epoch's export, the epochs a staged evaluation
holds, a merge's sources: 14 GB each for a 7B model in bf16). Python removes them as a run
unwinds, Ctrl-C and SIGTERM included, but nothing runs in a process killed outright: SIGKILL of
a sweep's driver (Ray then ends its trials' workers), the OOM killer, a worker Ray kills. Their
folders stayed in TMPDIR, and a node's disk filled with each trial killed. So each process keeps
its temporary folders in one folder of its own, named by its machine, process id and start
time, and the first time a process asks for one it removes the folders of this machine's
processes that are gone (another machine's or container's folders, on a TMPDIR they share,
are left to them). An output's staging folder (corpus/staging.py) is named the same way, so
the next run into that output removes one a killed run left beside it. Also: the free space of
the file system a folder is (or will be) on, as the storage plan checks it."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import psutil

_own: Path | None = None


def temporary_folder(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder (removed as the `with` block ends) in this process's own folder under
    TMPDIR."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=_own_folder())


def _own_folder() -> Path:
    global _own
    if _own is None or not _own.is_dir():
        root = Path(tempfile.gettempdir()) / f"unlearn-sweep-{os.getuid()}"
        root.mkdir(mode=0o700, exist_ok=True)
        for folder in root.iterdir():
            if left_by_an_ended_process(folder.name):
                shutil.rmtree(folder, ignore_errors=True)
        _own = root / this_process()
        _own.mkdir(exist_ok=True)
        atexit.register(_remove, _own, os.getpid())
    return _own


def this_process() -> str:
    """This process as a name: its machine, id and start time (an id alone may be reused)."""
    return f"{_machine()}-{_process_key(psutil.Process())}"


def left_by_an_ended_process(name: str, prefix: str = "") -> bool:
    """Whether a file or folder name is `prefix`, then `this_process()` of a process of this
    machine that has ended, then nothing or a dot and anything: what such a process wrote
    there is left over. Any other name is not ours to judge: False."""
    owner = re.fullmatch(rf"{re.escape(prefix)}{re.escape(_machine())}-(\d+-\d+)(\..*)?", name)
    return owner is not None and not _alive(owner[1])


def _machine() -> str:
    """What names the processes whose ids this process can check: its host, and on Linux its
    PID namespace (containers sharing a host name, as under `--net=host`, and a TMPDIR do not
    share process ids)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        return socket.gethostname()
    return f"{socket.gethostname()}-{namespace}"


def _process_key(process: psutil.Process) -> str:
    return f"{process.pid}-{process.create_time():.0f}"


def _alive(key: str) -> bool:
    try:
        return _process_key(psutil.Process(int(key.split("-")[0]))) == key
    except psutil.Error:  # no such process
        return False


def _remove(folder: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a child forked with this handler
        shutil.rmtree(folder, ignore_errors=True)


def nearest_folder(folder: Path) -> Path:
    """The folder, or the nearest existing folder above it."""
    return next(parent for parent in (folder, *folder.parents) if parent.exists())


def free_bytes(folder: Path) -> int:
    """Free space of the file system the folder is (or will be) on."""
    return shutil.disk_usage(nearest_folder(folder)).free
