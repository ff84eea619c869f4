"""What the orchestration (Ray, Optuna, MLflow, checkpoint I/O) adds to a sweep.

One run: a sweep of N trials on the toy task (one trial at a time, each with both cores),
then the same trials' training and per-epoch evaluation run directly, one after another,
with the same threads, in a fresh Python process. Both clocks start before torch and co are
imported, so each side pays its start-up. Overhead = 1 - direct / sweep wall time.

    python benchmarks/sweep_overhead.py [--task DIR] [--trials 24] [--dir /tmp/sweep_overhead]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_directly(setups: list[dict], task_dir: Path, threads: int) -> None:
    """Each setup trained for as many epochs as its trial ran (ASHA may have stopped it),
    evaluated after every epoch."""
    import torch
    from unlearn_sweep.corpus.semeval import load_task
    from unlearn_sweep.evaluation.evaluator import EvalSets, run_inference, score_records
    from unlearn_sweep.evaluation.inference import load_model
    from unlearn_sweep.methods.registry import build_params, get_method

    torch.set_num_threads(threads)
    task = load_task(task_dir / "data")
    sets = EvalSets.load(task_dir / "data", mia=task_dir / "mia", mmlu=task_dir / "mmlu")
    for setup in setups:
        method = get_method(setup["method"])

        def on_epoch(epoch, checkpoint, last, epochs=setup["epochs"]):
            score_records(run_inference(*load_model(checkpoint), sets), None)
            return epoch < epochs

        method.run(task_dir / "model", task, None, build_params(method, setup["params"]), on_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sweep_overhead"))
    parser.add_argument("--direct", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        return run_directly(json.loads(args.direct.read_text()), args.task, threads=2)
    from unlearn_sweep.corpus.toy_task import sweep_paths, toy_task_for_benchmark

    task = toy_task_for_benchmark(args.task)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    raw = {
        "name": "overhead",
        **sweep_paths(task),
        "methods": ["grad_diff", "npo"],
        "trials": args.trials,
        "seed": 0,
        "max_concurrent_trials": 1,
        "resources_per_trial": {"cpu": 2},
        "search_space_overrides": {
            "grad_diff": {"epochs": 3, "adapter": "full", "learning_rate": {"log_uniform": [1e-5, 5e-4]}},
            "npo": {"epochs": 3, "adapter": "full", "learning_rate": {"log_uniform": [1e-5, 5e-4]}},
        },
        "confirm": None,
        "mlflow": {"tracking_uri": f"sqlite:///{args.dir}/mlflow.db"},
        "storage_path": str(args.dir / "runs"),
    }
    start = time.perf_counter()
    import ray
    from unlearn_sweep.orchestrator.config import config_from_dict
    from unlearn_sweep.orchestrator.sweep import run_sweep

    config = config_from_dict(raw, args.dir / "overhead.yaml", args.dir)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    summary = run_sweep(config)
    ray.shutdown()
    sweep_seconds = time.perf_counter() - start

    setups = [{"method": row["method"], "params": row["params"], "epochs": row["epochs"]} for row in summary.rows]
    (args.dir / "setups.json").write_text(json.dumps(setups))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--direct", str(args.dir / "setups.json"), "--task", str(task)], check=True
    )
    direct_seconds = time.perf_counter() - start
    overhead = 1 - direct_seconds / sweep_seconds
    print(
        f"{args.trials} trials (grad_diff / npo, 3 epochs each, full evaluation per epoch), one at a time on 2 threads"
    )
    print(f"  sweep (Ray start, Tune, Optuna, MLflow, checkpoints): {sweep_seconds:7.1f} s")
    print(f"  same training and evaluation run directly:           {direct_seconds:7.1f} s")
    print(f"  orchestration overhead: {overhead:.1%} of the sweep's wall time")


if __name__ == "__main__":
    main()
