"""What each node of a cluster that may run a trial must see as the driver sees it: the sweep's
inputs (the model, the data, the MIA and MMLU sets) and its storage_path, each read from the
node's own file system (its TMPDIR is its own too: storage.py checks its free space). A node
without them fails every trial it is given, a search learning from those failures; a node with
another copy at the same path (last month's forget set) trains and scores on it, and nothing
tells its trials from the others. So before a sweep starts, a task on each such node
fingerprints the inputs' files there, and the sweep is refused, naming the node and the field,
where one is missing or differs from the driver's."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from unlearn_sweep.corpus.scratch import free_bytes, nearest_folder
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.config import ConfigError, SweepConfig
from unlearn_sweep.orchestrator.inputs import Digests, first_difference, input_digests

ANSWER_TIMEOUT_S = 300  # a node's first task starts a worker process; a node silent longer is broken


def worker_slots(resources: dict[str, float], config: SweepConfig) -> int:
    """How many trial workers (a one-worker trial's, or one worker of a multi-worker trial's)
    `resources` (a node's, or the cluster's) hold at once: the scarcest one decides (fractional
    GPUs pack)."""
    need = {"CPU": config.resources_per_trial.cpu, "GPU": config.resources_per_trial.gpu}
    return min(math.floor(resources.get(name, 0) / amount + 1e-9) for name, amount in need.items() if amount)


def able_nodes(nodes: list[dict[str, Any]], config: SweepConfig) -> list[dict[str, Any]]:
    """The live nodes of `nodes` (ray.nodes()) that can hold a trial (each of its workers)."""
    return [node for node in nodes if node["Alive"] and trials_held(node, config) >= 1]


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


@dataclass(frozen=True)
class Scratch:
    """A node's TMPDIR, as a task there found it (storage.check_scratch checks it)."""

    node: str  # its address
    folder: str  # TMPDIR, or the nearest existing folder above it
    free: int  # bytes
    trials: int  # trials (or trial workers) the node holds at once


@dataclass(frozen=True)
class NodeView:
    """What a node sees (node_view, run there)."""

    digests: dict[str, Digests | None]  # each input's
    marker_seen: bool  # whether the driver's marker file is in its storage_path
    scratch: str  # its TMPDIR (the nearest existing folder)
    scratch_free: int  # bytes


def node_view(inputs: dict[str, Path], marker: Path) -> NodeView:
    scratch = nearest_folder(Path(tempfile.gettempdir()))
    return NodeView(input_digests(inputs), marker.is_file(), str(scratch), free_bytes(scratch))


def trials_held(node: dict[str, Any], config: SweepConfig) -> int:
    """How many trial workers the node (of ray.nodes()) holds at once."""
    return worker_slots(node["Resources"], config)


def difference(inputs: dict[str, Path], driver: dict[str, Digests | None], node: NodeView) -> tuple[str, str] | None:
    """(field, what differs) of the first input a node sees otherwise than the driver
    ("storage_path" where it does not see the driver's marker there), or None."""
    changed = first_difference(inputs, driver, node.digests)
    if changed is not None:
        field, path, there = changed
        return (
            field,
            f"{path} there is not this machine's file (another copy or version)" if there else f"{path} is not there",
        )
    if not node.marker_seen:
        return "storage_path", "it is not the folder this machine writes (not shared storage)"
    return None


def check_nodes(config: SweepConfig, nodes: list[dict[str, Any]], driver: dict[str, Digests | None]) -> list[Scratch]:
    """Refuses the sweep where a node that can hold a trial does not see the driver's inputs
    (`driver`: their digests here) and storage_path; each such node's TMPDIR (storage.py checks
    it). Nodes the autoscaler adds later are not checked; a local Ray's only node is this one."""
    able = able_nodes(nodes, config)
    if config.ray_address == "local" or not able:
        return []
    inputs = config.trial_inputs
    view = ray.remote(num_cpus=0)(node_view)
    shared = nearest_folder(Path(config.storage_path))  # storage_path once it is made
    scratches = []
    with tempfile.NamedTemporaryFile(dir=shared, prefix=".node-check-") as marker:
        answers = [
            (
                node,
                view.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                    inputs, Path(marker.name)
                ),
            )
            for node in able
        ]
        for node, answer in answers:
            address = node["NodeManagerAddress"]
            try:
                seen = ray.get(answer, timeout=ANSWER_TIMEOUT_S)
            except GetTimeoutError:
                raise ConfigError(
                    config.source,
                    f"node {address} did not run the sweep's input check within {ANSWER_TIMEOUT_S} s",
                    field="ray_address",
                ) from None
            found = difference(inputs, driver, seen)
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
            scratches.append(Scratch(address, seen.scratch, seen.scratch_free, trials_held(node, config)))
    return scratches
