"""A sweep's inputs as files, fingerprinted: the same everywhere (each cluster node's copy
against the driver's: nodes.py, and again in each trial, on whatever node it runs) and every
time (a resumed sweep against what it started with).

A sweep resumed on other inputs or settings (a forget set replaced at the same path, a search
space edited) would run its remaining trials on them beside trials that ran on the first, and
rank them together; the champion would answer neither. So a new sweep records what it started
with in its folder, and a resume that differs is refused, naming the field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.orchestrator.config import INPUT_FIELDS, ConfigError, SweepConfig

log = logging.getLogger(__name__)

# Files up to this size are hashed whole; a larger one (a 7B model's weight shards) by its size
# and SAMPLES blocks spread over it: another checkpoint of the same shape differs in every block.
WHOLE_FILE_BYTES = 64 * 2**20
SAMPLES, SAMPLE_BYTES = 16, 2**16
START_RECORD = "started_with.json"  # in the sweep's Tune folder: a whole JSON file (see sweep.cut_state_file)
# Settings a resume may change: where things run and are kept, not what a trial does or how one is chosen.
# The inputs' paths may change too (a copy moved): their files are compared instead.
RESUMABLE_SETTINGS = (
    "max_concurrent_trials",
    "gpu_memory_gb",
    "resources_per_trial",
    "ray_address",
    "mlflow",
    "storage_path",
    "optuna_storage",
    "keep_checkpoints",
    "source",
)

Digests = dict[str, str]  # a path's files (relative names; a file: its own name) to their digests


def file_digest(path: Path) -> str:
    """sha256 of the file's size and its bytes (whole up to WHOLE_FILE_BYTES, else SAMPLES blocks)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
        else:
            for index in range(SAMPLES):
                handle.seek(index * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def path_digests(path: Path) -> Digests | None:
    """A file's digest, or a folder's files' (hidden ones left out: a download's cache, an
    editor's files); None where the path is not there."""
    if path.is_file():
        return {path.name: file_digest(path)}
    if not path.is_dir():
        return None
    files = sorted(
        found
        for found in path.rglob("*")
        if found.is_file() and not any(part.startswith(".") for part in found.relative_to(path).parts)
    )
    return {str(found.relative_to(path)): file_digest(found) for found in files}


def input_digests(inputs: dict[str, Path]) -> dict[str, Digests | None]:
    """By field, the digests of what its path holds (SweepConfig.trial_inputs)."""
    return {field: path_digests(path) for field, path in inputs.items()}


def first_difference(
    inputs: dict[str, Path], expected: dict[str, Digests | None], found: dict[str, Digests | None]
) -> tuple[str, Path, bool] | None:
    """(field, path, whether it is there) of the first file of `expected` that `found` lacks
    or holds otherwise (a file `found` has besides is no difference); None where all match."""
    for field, files in expected.items():
        there = found.get(field)
        if there is None:
            return field, inputs[field], False
        for name, digest in (files or {}).items():
            path = inputs[field] if inputs[field].is_file() else inputs[field] / name
            if there.get(name) != digest:
                return field, path, name in there
    return None


def fingerprints(inputs: dict[str, Path], digests: dict[str, Digests | None]) -> dict[str, tuple[str, Digests | None]]:
    """By field, each input's path and its digests: what check_unchanged takes."""
    return {field: (str(path), digests[field]) for field, path in inputs.items()}


def check_unchanged(inputs: dict[str, tuple[str, Digests | None]], node: str) -> None:
    """In a trial, on whatever node it runs (also one that joined the cluster after the sweep
    started, which the start's check never saw): the inputs (by field, path and digests at the
    sweep's start) as they were; a DataError naming the file otherwise."""
    paths = {field: Path(path) for field, (path, _) in inputs.items()}
    changed = first_difference(paths, {field: digests for field, (_, digests) in inputs.items()}, input_digests(paths))
    if changed is None:
        return
    field, path, there = changed
    found = "is not the file the sweep started with (another copy, or changed since)" if there else "is not there"
    raise DataError(
        path,
        f"on node {node}, it {found}; every node that runs trials must see the sweep's inputs, unchanged while it "
        "runs (shared storage, mounted at the same path)",
        field=field,
    )


def settings(config: SweepConfig) -> dict[str, Any]:
    """The config's settings a resume must keep, as JSON holds them: all but RESUMABLE_SETTINGS
    and the inputs' paths."""
    kept = {name: value for name, value in dataclasses.asdict(config).items() if name not in RESUMABLE_SETTINGS}
    for field in INPUT_FIELDS:
        section, _, name = field.rpartition(".")
        ((kept.get(section) or {}) if section else kept).pop(name, None)
    return json.loads(json.dumps(kept, default=str))


def record_start(config: SweepConfig, digests: dict[str, Digests | None]) -> None:
    """What a new sweep starts with, in its folder, written whole."""
    folder = Path(config.storage_path, config.name)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{START_RECORD}.")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump({"settings": settings(config), "inputs": digests}, file, indent=1, sort_keys=True)
    os.replace(temporary, folder / START_RECORD)


def check_resume(config: SweepConfig, digests: dict[str, Digests | None]) -> None:
    """A resume whose settings or inputs differ from those its sweep started with is refused,
    naming the first field that differs."""
    path = Path(config.storage_path, config.name, START_RECORD)
    if not path.is_file():
        log.warning("sweep %r recorded no inputs at its start (an earlier version): they are not compared", config.name)
        return
    try:
        started = json.loads(path.read_text(encoding="utf-8"))
        then, inputs_then = started["settings"], started["inputs"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(config.source, f"{path} is unreadable ({error})", field="name") from None
    advice = "a resumed sweep runs its remaining trials as it started them: put it back, or start a new sweep"
    now = settings(config)
    for name in sorted(then.keys() | now.keys()):
        if then.get(name) != now.get(name):
            was, is_now = (_shown(value) for value in (then.get(name), now.get(name)))
            raise ConfigError(config.source, f"{was} at the sweep's start, {is_now} now; {advice}", field=name)
    inputs = config.trial_inputs
    for field in sorted(inputs_then.keys() ^ inputs.keys()):
        given = "given now, not" if field in inputs else "not given now, but"
        raise ConfigError(config.source, f"{given} at the sweep's start; {advice}", field=field)
    changed = first_difference(inputs, inputs_then, digests)
    if changed is not None:
        field, changed_path, there = changed
        what = "changed since the sweep started" if there else "is not there, and the sweep started with it"
        raise ConfigError(config.source, f"{changed_path} {what}; {advice}", field=field)


def _shown(value: Any) -> str:
    """A setting's value as JSON, cut to 80 characters."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
