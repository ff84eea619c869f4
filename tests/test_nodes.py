"""What a cluster's nodes must see before a sweep starts (orchestrator/nodes.py); the check run
on a simulated cluster's nodes is in test_cluster.py."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

from test_sweep import write_config
from unlearn_sweep.orchestrator.config import load_config
from unlearn_sweep.orchestrator.inputs import path_digests
from unlearn_sweep.orchestrator.nodes import difference, node_view, trials_held, trials_stay_on


def test_trials_stay_on_the_drivers_node_only_where_no_other_node_can_hold_one(
    toy_task_dir: Path, tmp_path: Path
) -> None:
    config = load_config(write_config(tmp_path, toy_task_dir, resources_per_trial={"cpu": 2, "gpu": 1}))

    def node(name: str, cpus: int, gpus: int = 0, alive: bool = True) -> dict:
        return {"NodeID": name, "Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}

    assert trials_stay_on("head", [node("head", 8, 1)], config)  # one machine: `ray start --head`
    assert trials_stay_on("head", [node("head", 8, 1), node("cpu", 64), node("gone", 8, 1, alive=False)], config)
    assert not trials_stay_on("head", [node("head", 8, 1), node("gpu", 8, 1)], config)
    assert not trials_stay_on("head", [node("head", 0)], config)  # cluster.yaml's head: the autoscaler adds workers
    # a node holds as many trials as its scarcest resource allows (a multi-worker trial's: workers)
    assert trials_held(node("gpu", 8, 2), config) == 2
    packed = dataclasses.replace(config, resources_per_trial=dataclasses.replace(config.resources_per_trial, gpu=0.5))
    assert trials_held(node("gpu", 8, 2), packed) == 4 and trials_held(node("cpu", 7, 2), packed) == 3


def test_a_node_whose_inputs_are_not_the_drivers_is_told_by_field(toy_task_dir: Path, tmp_path: Path) -> None:
    """The driver's inputs against a node's copies: the same files (hidden ones aside) pass; a
    file changed, missing, or a whole input missing is named with its field; so is a
    storage_path where the driver's marker is not."""
    config = load_config(write_config(tmp_path / "config", toy_task_dir))
    inputs = {field: path for field, path in config.trial_inputs.items() if field in ("model", "data", "mia")}
    assert inputs == {"model": toy_task_dir / "model", "data": toy_task_dir / "data", "mia": toy_task_dir / "mia"}
    driver = {field: path_digests(path) for field, path in inputs.items()}
    node = tmp_path / "node"
    copies = {field: shutil.copytree(path, node / field) for field, path in inputs.items()}
    marker = tmp_path / "marker"
    marker.touch()

    def found() -> tuple[str, str] | None:
        return difference(inputs, driver, node_view(copies, marker))

    (copies["model"] / ".cache").mkdir()
    (copies["model"] / ".cache" / "download.lock").write_text("another node's")
    (copies["data"] / "notes.txt").write_text("a file the driver has not")
    assert found() is None
    forget = copies["data"] / "forget_train-00000-of-00001.parquet"
    forget.write_bytes(forget.read_bytes()[::-1])  # last month's forget set at the same path
    assert found() == (
        "data",
        f"{inputs['data']}/{forget.name} there is not this machine's file (another copy or version)",
    )
    forget.unlink()
    assert found() == ("data", f"{inputs['data']}/{forget.name} is not there")
    shutil.rmtree(copies["data"])
    assert found() == ("data", f"{inputs['data']} is not there")
    shutil.copytree(inputs["data"], copies["data"])
    marker.unlink()
    assert found() == ("storage_path", "it is not the folder this machine writes (not shared storage)")


def test_the_node_check_loads_no_torch() -> None:
    """Its task starts a worker on every node at the sweep's start: ray and the fingerprints,
    not torch and transformers (5 s more a node, as it first was, through the storage plan)."""
    code = "import sys, unlearn_sweep.orchestrator.nodes; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
