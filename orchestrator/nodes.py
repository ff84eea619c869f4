"""What each node of a cluster that may run a trial must see as the driver sees it: the sweep's
inputs (the model, the data, the MIA and MMLU sets) and its storage_path, each read from the
node's own file system. A node without them fails every trial it is given, a search learning
from those failures; a node with another copy at the same path (last month's forget set) trains
and scores on it, and nothing tells its trials from the others. So before a sweep starts, a task
on each such node fingerprints the inputs' files there, and the sweep is refused, naming the
node and the field, where one is missing or differs from the driver's."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.config import ConfigError, SweepConfig

# Files up to this size are hashed whole; a larger one (a 7B model's weight shards) by its size
# and SAMPLES blocks spread over it: another checkpoint of the same shape differs in every block.
WHOLE_FILE_BYTES = 64 * 2**20
SAMPLES, SAMPLE_BYTES = 16, 2**16
ANSWER_TIMEOUT_S = 300  # a node's first task starts a worker process; a node silent longer is broken

Digests = dict[str, str]  # a path's files (relative names; a file: its own name) to their digests


def able_nodes(nodes: list[dict[str, Any]], config: SweepConfig) -> list[dict[str, Any]]:
    """The live nodes of `nodes` (ray.nodes()) that can hold a trial (each of its workers)."""
    need = {"CPU": config.resources_per_trial.cpu, "GPU": config.resources_per_trial.gpu}
    return [
        node
        for node in nodes
        if node["Alive"] and all(node["Resources"].get(name, 0) >= amount for name, amount in need.items() if amount)
    ]


def trials_stay_on(node_id: str, nodes: list[dict[str, Any]], config: SweepConfig) -> bool:
    """Whether the only live node of `nodes` that can hold a trial is `node_id`'s."""
    return [node["NodeID"] for node in able_nodes(nodes, config)] == [node_id]


def check_store_reachable(config: SweepConfig, node_id: str, nodes: list[dict[str, Any]]) -> None:
    """A tracking store that is a file of this machine serves the trials this machine runs: on
    a cluster whose trials run on other nodes (this one cannot hold one, or another can, or
    will when the autoscaler adds it), each of those would fail at its first record."""
    if config.ray_address == "local" or tracking.local_store(config.tracking_uri) is None:
        return
    if trials_stay_on(node_id, nodes, config):
        return
    raise ConfigError(
        config.source,
        f"{config.tracking_uri} is a store on this machine, and this cluster's trials run on other nodes, "
        "which cannot write to it (an SQLite file on shared storage neither: its locks do not hold over "
        "NFS); run an MLflow server every node reaches and set it here, tracking_uri: "
        "http://<head private IP>:5000 (docs/cluster.md)",
        field="mlflow.tracking_uri",
    )


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


def node_view(inputs: dict[str, Path], marker: Path) -> tuple[dict[str, Digests | None], bool]:
    """What a node sees: each input's digests, and whether the driver's marker file is in its storage_path."""
    return {field: path_digests(path) for field, path in inputs.items()}, marker.is_file()


def difference(
    inputs: dict[str, Path], driver: dict[str, Digests | None], node: tuple[dict[str, Digests | None], bool]
) -> tuple[str, str] | None:
    """(field, what differs) of the first input a node sees otherwise than the driver ("storage_path"
    where it does not see the driver's marker there), or None."""
    seen, marker_seen = node
    for field, files in driver.items():
        there = seen[field]
        if there is None:
            return field, f"{inputs[field]} is not there"
        for name, digest in (files or {}).items():
            where = inputs[field] if inputs[field].is_file() else inputs[field] / name
            if name not in there:
                return field, f"{where} is not there"
            if there[name] != digest:
                return field, f"{where} there is not this machine's file (another copy or version)"
    if not marker_seen:
        return "storage_path", "it is not the folder this machine writes (not shared storage)"
    return None


def check_nodes(config: SweepConfig, node_id: str, nodes: list[dict[str, Any]]) -> None:
    """Refuses the sweep where a node other than the driver's that can hold a trial does not see
    the driver's inputs and storage_path (nodes the autoscaler adds later are not checked)."""
    others = [node for node in able_nodes(nodes, config) if node["NodeID"] != node_id]
    if config.ray_address == "local" or not others:
        return
    inputs = config.trial_inputs
    driver = {field: path_digests(path) for field, path in inputs.items()}
    view = ray.remote(num_cpus=0)(node_view)
    storage = Path(config.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=storage, prefix=".node-check-") as marker:
        answers = {
            node["NodeManagerAddress"]: view.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(inputs, Path(marker.name))
            for node in others
        }
        for address, answer in answers.items():
            try:
                found = difference(inputs, driver, ray.get(answer, timeout=ANSWER_TIMEOUT_S))
            except GetTimeoutError:
                raise ConfigError(
                    config.source,
                    f"node {address} did not run the sweep's input check within {ANSWER_TIMEOUT_S} s",
                    field="ray_address",
                ) from None
            if found is not None:
                field, what = found
                where = config.storage_path if field == "storage_path" else ""
                raise ConfigError(
                    config.source,
                    f"on node {address}, which can run trials, {where + ': ' if where else ''}{what}; every "
                    "node reads the sweep's inputs and writes storage_path on its own file system: give each "
                    "the same files (shared storage, mounted at the same path)",
                    field=field,
                )
