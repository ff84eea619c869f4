"""A tabular benchmark of the demo's search (HPOBench, LCBench and Syne Tune's blackbox
repository do this for hyperparameter optimisation): a grid over the demo's methods, every
configuration trained once on the toy task for the most epochs its space allows, every epoch
fully evaluated, each epoch's scores recorded. `search_replay.py` then replays search
strategies against the table hundreds of times in seconds.

    python benchmarks/search_table.py [--task DIR] [--out DIR] [--jobs 2]

Written once to OUT/table.jsonl (one line per configuration, appended as each finishes, so an
interrupted build continues where it stopped) with OUT/table.json describing it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

DTYPE = "float32"  # as the demo scores
MMLU_THRESHOLD = "0.75x"  # as the demo
LEARNING_RATES = {  # five points across each method's toy range (cli.TOY_TASK_SPACES), log-spaced
    "grad_diff": [1e-5, 2.7e-5, 7e-5, 1.9e-4, 5e-4],
    "npo": [1e-5, 2.7e-5, 7e-5, 1.9e-4, 5e-4],
    "simnpo": [2e-5, 4.5e-5, 1e-4, 2.2e-4, 5e-4],
    "sugd": [1e-5, 2.7e-5, 7e-5, 1.9e-4, 5e-4],
    "mia_target": [1e-4, 1.6e-4, 2.4e-4, 3.8e-4, 6e-4],
}
# Each method's grid: its searched parameters at a few values, the others at their defaults;
# `epochs` at the top of the method's toy range (a trial of fewer epochs is the curve cut short:
# learning rates are constant).
GRID: dict[str, dict[str, list[Any]]] = {
    "grad_diff": {"learning_rate": LEARNING_RATES["grad_diff"], "retain_weight": [0.5, 1.5, 4.5], "epochs": [4]},
    "npo": {
        "learning_rate": LEARNING_RATES["npo"],
        "beta": [0.1, 0.3],
        "adapter": ["full", "lora"],
        "epochs": [4],
    },
    "simnpo": {"learning_rate": LEARNING_RATES["simnpo"], "beta": [1.0, 4.0], "epochs": [6]},
    "sugd": {"learning_rate": LEARNING_RATES["sugd"], "adapter": ["full", "last_k"], "epochs": [8]},
    "mia_target": {
        "learning_rate": LEARNING_RATES["mia_target"],
        "forget_weight": [1.5, 5.0],
        "retain_weight": [3.0, 7.0, 16.0],
        "epochs": [14],
    },
    "merge": {
        "over.learning_rate": [1.5e-4, 4e-4],
        "under.learning_rate": [3e-5, 8e-5],
        "combination": ["ties", "linear", "task_arithmetic"],
    },
}
BATCH_SIZE = 16  # every space's constant


def configurations() -> list[dict[str, Any]]:
    """Every grid point as {method, params} (a merge's sources' settings as `over.` / `under.`)."""
    points = []
    for method, grid in GRID.items():
        for values in itertools.product(*grid.values()):
            points.append({"method": method, "params": dict(zip(grid, values, strict=True))})
    return points


def key_of(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


@dataclasses.dataclass
class Build:
    task: Path
    threshold: float
    sources: Path  # merge sources, trained once each


def _evaluate(folder: Path, task: Path) -> tuple[dict[str, Any], float]:
    from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
    from unlearn_sweep.evaluation.options import EvalOptions

    started = time.perf_counter()
    sets = EvalSets.load(task / "data", mia=task / "mia", mmlu=task / "mmlu")
    scores = evaluate_checkpoint(folder, sets, EvalOptions(dtype=DTYPE))
    return scores, time.perf_counter() - started


def _run(point: dict[str, Any], build: Build) -> dict[str, Any]:
    """One configuration, every epoch fully evaluated; runs in a worker process of one thread."""
    import torch
    from unlearn_sweep.corpus.mia import default_held_out, load_held_out
    from unlearn_sweep.corpus.semeval import load_task
    from unlearn_sweep.evaluation.eligibility import Limits, epoch_objective
    from unlearn_sweep.methods.registry import build_params, get_method

    torch.set_num_threads(1)  # as a sweep trial holding one CPU
    task = load_task(build.task / "data")
    task = dataclasses.replace(task, held_out=load_held_out(default_held_out(build.task / "mia"), build.task / "mia"))
    limits, epochs, clock = Limits(build.threshold), [], {"start": time.perf_counter(), "hooks": 0.0}
    source_seconds = 0.0  # a merge's: its sources' training

    def record(epoch: int, checkpoint: Path | None, last: bool) -> None:
        started = time.perf_counter()
        train_seconds = started - clock["start"] - clock["hooks"] + source_seconds
        scores, eval_seconds = _evaluate(checkpoint, build.task)
        slack = limits.slack(scores)
        epochs.append(
            {
                "epoch": epoch,
                **{name: scores[name] for name in ("final_score", "task_aggregate", "mia_score", "mmlu_accuracy")},
                "eligible": slack <= 0,
                "objective": epoch_objective(scores["final_score"], slack),
                "mmlu_slack": limits.slacks(scores)["mmlu_slack"],
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
            }
        )
        clock["hooks"] += time.perf_counter() - started

    method = get_method(point["method"])
    params = {**point["params"], "batch_size": BATCH_SIZE} if point["method"] != "merge" else dict(point["params"])
    if point["method"] == "merge":  # its sources, trained before the pool started (train_sources)
        folders = [source_folder(build, params.pop(f"{name}.learning_rate")) for name in ("over", "under")]
        source_seconds = sum(json.loads((folder / SOURCE_SECONDS).read_text()) for folder in folders)
        params["models"] = ",".join(map(str, folders))
    method.run(build.task / "model", task, None, build_params(method, params), record)
    return {**point, "epochs": epochs}


SOURCE_SECONDS = "train_seconds.json"


def source_folder(build: Build, learning_rate: float) -> Path:
    """A merge source: NPO at the learning rate, its other settings at their defaults."""
    settings = {"learning_rate": learning_rate, "batch_size": BATCH_SIZE}
    return build.sources / hashlib.sha256(key_of(settings).encode()).hexdigest()[:12]


def train_sources(build: Build) -> None:
    """Every merge source once, in this process at one thread (as a trial trains it), with
    its training seconds: a merge's unlearning time includes its sources'."""
    import torch
    from unlearn_sweep.corpus.semeval import load_task
    from unlearn_sweep.methods.registry import run_method

    torch.set_num_threads(1)
    task = load_task(build.task / "data")
    rates = {rate for name in ("over", "under") for rate in GRID["merge"][f"{name}.learning_rate"]}
    for rate in sorted(rates):
        folder = source_folder(build, rate)
        if not (folder / SOURCE_SECONDS).exists():
            started = time.perf_counter()
            run_method("npo", build.task / "model", task, folder, {"learning_rate": rate, "batch_size": BATCH_SIZE})
            (folder / SOURCE_SECONDS).write_text(json.dumps(time.perf_counter() - started))


def _run_safely(job: tuple[dict[str, Any], Build]) -> dict[str, Any]:
    point, build = job
    try:
        return _run(point, build)
    except Exception as error:  # a diverged configuration is a row too: it never becomes eligible
        return {**point, "epochs": [], "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/search_table"))
    parser.add_argument("--jobs", type=int, default=2, help="configurations trained at once (one thread each)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N configurations (a smoke run)")
    args = parser.parse_args()
    from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark
    from unlearn_sweep.evaluation.eligibility import MmluThreshold

    task = toy_task_for_benchmark(args.task)
    args.out.mkdir(parents=True, exist_ok=True)
    table, meta = args.out / "table.jsonl", args.out / "table.json"
    if meta.exists():
        threshold = json.loads(meta.read_text())["mmlu_threshold"]
    else:
        base, _ = _evaluate(task / "model", task)
        threshold = MmluThreshold.parse(MMLU_THRESHOLD).absolute(base["mmlu_accuracy"])
        fingerprint = json.loads((task / "toy_task.json").read_text())["weights_sha256"]
        meta.write_text(
            json.dumps(
                {
                    "grid": GRID,
                    "mmlu_threshold": threshold,
                    "base": base,
                    "weights_sha256": fingerprint,
                    "dtype": DTYPE,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    done = {key_of({"method": row["method"], "params": row["params"]}) for row in _rows(table)}
    points = [point for point in configurations()[: args.limit] if key_of(point) not in done]
    print(f"{len(done)} configurations recorded, {len(points)} to train ({args.jobs} at a time)", flush=True)
    build = Build(task, threshold, args.out / "sources")
    if any(point["method"] == "merge" for point in points):
        train_sources(build)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, maxtasksperchild=8) as pool, table.open("a") as out:
        for number, row in enumerate(pool.imap_unordered(_run_safely, [(p, build) for p in points]), start=1):
            out.write(json.dumps(row) + "\n")
            out.flush()
            best = max((epoch["objective"] for epoch in row["epochs"]), default=float("nan"))
            print(
                f"[{number}/{len(points)}] {row['method']} {row['params']}: best objective {best:.4f}"
                f"{' (' + row['error'] + ')' if row.get('error') else ''}, {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    rows = _rows(table)
    print(f"table: {len(rows)} configurations, {sum(len(row['epochs']) for row in rows)} epochs, {table}")


def _rows(table: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []


if __name__ == "__main__":
    main()
