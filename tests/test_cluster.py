"""Cluster scale on this CPU machine: the cluster launcher config, and a sweep across the nodes
of a simulated multi-node Ray cluster (logical GPUs, fractional shares, an HTTP tracking server)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import ray
import torch
import yaml
from conftest import REPO_ROOT
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, remove_placement_group
from safetensors.torch import load_file
from test_methods import assert_whole_trained_checkpoint
from test_sweep import LIGHT_EVAL, mlflow_server, trial_context, write_config
from unlearn_sweep.corpus import mia
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.methods.registry import get_method, run_method
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.cli import main
from unlearn_sweep.orchestrator.config import ConfigError, load_config
from unlearn_sweep.orchestrator.inputs import input_digests
from unlearn_sweep.orchestrator.nodes import check_nodes
from unlearn_sweep.orchestrator.selection import export_champion
from unlearn_sweep.orchestrator.sweep import run_sweep, trial_resources
from unlearn_sweep.orchestrator.trial import released_gpu_cache, trial_task


def test_cluster_yaml_validates_against_rays_schema() -> None:
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-py311")
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    job = yaml.safe_load((REPO_ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("unlearn-sweep sweep ")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == config["docker"]["image"].split(":")[1].split("-")[0]
    # Safe defaults: the dashboard on the head's loopback; MLflow on PostgreSQL, never exposed outside the cluster.
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--backend-store-uri postgresql+psycopg://" in start
    tracking = list(yaml.safe_load_all((REPO_ROOT / "k8s" / "mlflow.yaml").read_text()))
    assert {doc["kind"] for doc in tracking} == {"Secret", "StatefulSet", "ConfigMap", "Service", "Deployment"}
    assert all(doc["spec"]["type"] == "ClusterIP" for doc in tracking if doc["kind"] == "Service")
    server = next(doc for doc in tracking if doc["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ][0]
    assert "postgresql+psycopg://" in server and "psycopg" in server


def child_runs(config, summary):
    mlflow = tracking.client(config.tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.experiment).experiment_id
    return mlflow.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")


def max_overlap(runs) -> int:
    """Most runs alive at one moment, from MLflow start and end times."""
    events = sorted(
        [(run.info.start_time, 1) for run in runs] + [(run.info.end_time, -1) for run in runs],
        key=lambda e: (e[0], e[1]),
    )
    alive = most = 0
    for _, change in events:
        alive += change
        most = max(most, alive)
    return most


def test_a_trial_gives_its_cached_gpu_memory_back_however_it_ends(
    toy_task_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Actors are reused across trials: on a GPU shared by fractional trials, a reused actor
    kept the peak reservation of its finished trial (review). And a trial loads the held-out
    documents only where its method reads them."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    with released_gpu_cache():
        pass
    with pytest.raises(SystemExit), released_gpu_cache():
        raise SystemExit  # Tune stopping the trial at a report
    assert emptied == [True, True]
    context = trial_context(toy_task_dir, held_out=str(toy_task_dir / "mia" / "held_out.jsonl"))
    assert trial_task(context, get_method("grad_diff")).held_out == ()
    # The scored MIA set is not read again to check them: the config's reading did (review).
    monkeypatch.setattr(mia, "load_mia", lambda *args: pytest.fail("the scored MIA set was read in a trial"))
    assert len(trial_task(context, get_method("mia_target")).held_out) == 24


@pytest.mark.e2e
def test_a_cluster_sweep_packs_gpus_on_every_worker_node_and_logs_to_a_tracking_server(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sweep, three things of a cluster as cluster.yaml lays it out: trials spread over the
    worker nodes (none on the CPU-less head), fractional GPUs pack two trials on each GPU, and
    everything goes to an HTTP tracking server; first, a node that does not see the driver's
    inputs or storage_path is refused."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # The worker nodes' processes work in a folder of their own: through /proc/self/cwd one path
    # names other files on them than on the driver, as on machines that do not share a disk.
    node, driver = tmp_path / "node", tmp_path / "driver"
    for folder in (node, driver):
        shutil.copytree(toy_task_dir / "data", folder / "data")
    forget = node / "data" / "forget_train-00000-of-00001.parquet"
    forget.write_bytes(forget.read_bytes()[::-1])  # last month's forget set, on the nodes
    monkeypatch.chdir(node)
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    monkeypatch.chdir(driver)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        here = load_config(write_config(tmp_path / "here", toy_task_dir, ray_address=cluster.address))
        served = {"mlflow": dataclasses.replace(here.mlflow, tracking_uri="http://127.0.0.1:5000")}  # never reached
        for elsewhere, field in (
            ({"data": Path("/proc/self/cwd/data")}, "data"),
            ({"storage_path": "/proc/self/cwd"}, "storage_path"),
        ):
            with pytest.raises(ConfigError, match=rf"field '{field}': on node [\d.]+, which can run trials"):
                run_sweep(dataclasses.replace(here, **served, **elsewhere))
        assert [path.name for path in driver.iterdir()] == ["data"]  # the marker gone, nothing written
        # Each worker node reports its TMPDIR and the trials it holds at once (2 CPUs, 1 each); the head none.
        scratches = check_nodes(here, ray.nodes(), input_digests(here.trial_inputs))
        assert [(scratch.trials, scratch.free > 0) for scratch in scratches] == [(2, True), (2, True)]
        # A SQLite file of the driver's machine: the workers' trials could not record into it.
        local = load_config(
            write_config(tmp_path / "local", toy_task_dir, name="local", ray_address=cluster.address, **LIGHT_EVAL)
        )
        with pytest.raises(ConfigError, match=r"field 'mlflow.tracking_uri': sqlite:///.* is a store on this machine"):
            run_sweep(local)
        assert not (tmp_path / "local" / "mlflow.db").exists()
        with mlflow_server(tmp_path / "server") as uri:
            config = load_config(
                write_config(
                    tmp_path,
                    toy_task_dir,
                    name="cluster",
                    trials=4,
                    ray_address=cluster.address,
                    **LIGHT_EVAL,
                    mmlu_threshold="0.75x",
                    mlflow={"tracking_uri": uri},
                    resources_per_trial={"cpu": 1, "gpu": 0.5},
                    search_space_overrides={"grad_diff": {"epochs": 1}},
                )
            )
            summary = run_sweep(config)
            runs = child_runs(config, summary)
            assert len(runs) == 4 and all(row["status"] == "finished" for row in summary.rows)
            assert {run.data.tags["ray_node"] for run in runs} == {worker.node_id for worker in workers}
            assert max_overlap(runs) == 4  # 2 GPUs / 0.5 per trial, 4 CPUs / 1 per trial
            # The relative threshold's base evaluation ran on a worker, as a trial would, not on the head.
            parent = tracking.client(uri).get_run(summary.parent_run_id)
            assert parent.data.tags["base_evaluation_node"] in {worker.node_id for worker in workers}
            # best and export read the champion back from the server.
            assert summary.champion and summary.champion["model_version"] == "1"
            assert main(["best", config.experiment, "--tracking-uri", uri]) == 0
            assert summary.champion["trial_id"] in capsys.readouterr().out
            exported = export_champion(config.experiment, uri, tmp_path / "submission")
            assert json.loads((exported / "scores.json").read_text())["final_score"] == pytest.approx(
                summary.champion["final_score"]
            )
            assert (exported / "model.safetensors").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server


@pytest.fixture(scope="module")
def one_process_run(toy_task_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same method and settings trained in one process."""
    task = load_task(toy_task_dir / "data")
    return run_method(
        "grad_diff", toy_task_dir / "model", task, tmp_path_factory.mktemp("single") / "out", DISTRIBUTED_PARAMS
    )


def relative_difference(model: Path, reference: Path, base: Path) -> float:
    """|model - reference| over |reference - base|, all weights as one vector."""
    trained, expected, original = (load_file(folder / "model.safetensors") for folder in (model, reference, base))

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[key].float() - b[key].float()).pow(2).sum()) for key in expected) ** 0.5

    return distance(trained, expected) / distance(expected, original)


DISTRIBUTED_PARAMS = {"epochs": 1, "learning_rate": 1.0e-4, "retain_weight": 1.0}
SHARDED_EVAL_TOKENS = 32  # short generations, zero-shot MMLU: the sharding is what is tested, at a fraction of the cost


@pytest.fixture(scope="module")
def ray_for_two_workers():
    # Two Ray Train workers of 1 CPU each take every CPU (the trial launching them holds none);
    # Train needs the dashboard. One instance for all: a Ray start is a fifth of a test.
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.e2e
def test_workers_that_take_every_cpu_of_a_node_can_start(ray_for_two_workers, toy_task_dir: Path, tmp_path) -> None:
    """A multi-worker trial's own process held a token 0.01 CPU: with workers asking for all of a
    node's CPUs (8 x 12 on a 96-core, 8-GPU node), Ray Train waited for them forever. Here the
    trial and its workers' bundles are placed as Ray places them, on 2 CPUs."""
    config = load_config(write_config(tmp_path, toy_task_dir, resources_per_trial={"cpu": 1, "workers": 2}))
    names = {"cpu": "CPU", "gpu": "GPU"}
    trial = {names.get(key, key): value for key, value in trial_resources(config).items() if value}
    group = placement_group([trial, {"CPU": 1}, {"CPU": 1}], strategy="PACK")
    try:
        assert group.wait(timeout_seconds=10), f"{trial} beside 2 workers of 1 CPU cannot be placed on 2 CPUs"
    finally:
        remove_placement_group(group)


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [2, 3])
def test_two_worker_deepspeed_trial_matches_one_process(
    stage: int, ray_for_two_workers, toy_task_dir: Path, tmp_path: Path, one_process_run
) -> None:
    config = load_config(
        write_config(
            tmp_path,
            toy_task_dir,
            name=f"zero{stage}",
            trials=1,
            resources_per_trial={"cpu": 1, "workers": 2},
            mmlu_shots=0,
            eval={"dtype": "float32", "max_new_tokens": SHARDED_EVAL_TOKENS},
            # stage 2 is a multi-worker trial's default: its checkpoint records it for the export
            search_space_overrides={"grad_diff": {**DISTRIBUTED_PARAMS, **({"zero_stage": 3} if stage == 3 else {})}},
        )
    )
    summary = run_sweep(config)
    row = summary.rows[0]
    assert row["status"] == "finished" and row["checkpoint"] and "/train/" in row["checkpoint"]
    checkpoint = Path(row["checkpoint"])
    assert_whole_trained_checkpoint(checkpoint, toy_task_dir / "model")
    assert json.loads((checkpoint / "trial_config.json").read_text())["params"]["zero_stage"] == stage
    # ZeRO shards the state, not the arithmetic: the same update as one process, up to the
    # order of float sums.
    difference = relative_difference(checkpoint, one_process_run, toy_task_dir / "model")
    assert difference < 1e-4, difference  # 6e-6; 0.25 when each rank divided by its own share's counts
    assert summary.champion and summary.champion["checkpoint"] == row["checkpoint"]
    # Both ranks evaluated their share; the gathered records score as one process scores the checkpoint.
    assert tracking.client(config.tracking_uri).get_run(summary.champion["run_id"]).data.tags["eval_ranks"] == "2"
    logged = json.loads((checkpoint / "scores.json").read_text())
    sets = EvalSets.load(config.data, mia=config.mia, mmlu=config.mmlu, mmlu_shots=0)
    alone = evaluate_checkpoint(
        checkpoint, sets, EvalOptions(max_new_tokens=SHARDED_EVAL_TOKENS, dtype="float32"), tmp_path / "alone"
    )
    assert logged["per_task"] == alone["per_task"]
    for name in ("final_score", "task_aggregate", "mia_auc", "mmlu_accuracy"):
        assert logged[name] == pytest.approx(alone[name], abs=1e-9), name
    generations = [json.loads(line) for line in (checkpoint / "generations.jsonl").read_text().splitlines()]
    assert generations == [
        json.loads(line) for line in (tmp_path / "alone" / "generations.jsonl").read_text().splitlines()
    ]
