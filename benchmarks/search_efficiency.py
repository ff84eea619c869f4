"""Search efficiency on the toy task: the default searcher (constrained TPE over parameter
groups) with and without ASHA against random search, at equal budgets (trials) over several seeds.

For each strategy and seed one sweep runs (the same methods, budget and absolute MMLU
threshold: 75% of the base model's, measured once). Printed per run: the best eligible final
score at the budget, and the trials and wall time it took to reach 95% of the best eligible
score found by any run; then the mean per strategy.

    python benchmarks/search_efficiency.py [--task toy_task] [--trials 12] [--seeds 3] [--dir /tmp/search_efficiency]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

STRATEGIES = {  # name -> (its sweeps' name, config keys)
    "grouped TPE + ASHA": ("tpe-asha", {"searcher": "tpe_grouped", "asha": {"grace_period": 1, "reduction_factor": 2}}),
    "grouped TPE, no ASHA (the default)": ("tpe", {"searcher": "tpe_grouped", "asha": None}),
    "random, no ASHA": ("random", {"searcher": "random", "asha": None}),
}
METHODS = ["grad_diff", "npo", "sugd", "task_vector"]


def trial_history(tracking_uri: str, experiment: str) -> tuple[float, list[tuple[float, float | None]]]:
    """The sweep's start and, per trial in the order they ended, (seconds since the start,
    best eligible final score or None)."""
    from unlearn_sweep.orchestrator import tracking
    from unlearn_sweep.orchestrator.selection import eligible, trial_entries

    client = tracking.client(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parent = client.search_runs([experiment_id], filter_string="tags.role = 'sweep'")[0]
    start = parent.info.start_time / 1000
    runs = {run.info.run_id: run for run in client.search_runs([experiment_id], filter_string="tags.trial_id != ''")}
    history = []
    for entry in trial_entries(client, experiment_id):
        ended = runs[entry.run_id].info.end_time
        if ended is not None and entry.status in ("finished", "failed"):
            history.append((ended / 1000 - start, entry.scores["final_score"] if eligible(entry) else None))
    return start, sorted(history, key=lambda item: item[0])


def prepared(task: Path, out: Path) -> Path:
    """The toy task (built if missing), resolved, and an empty output folder."""
    from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark

    task = toy_task_for_benchmark(task)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/search_efficiency"))
    args = parser.parse_args()

    from unlearn_sweep.corpus.toy_task import sweep_paths
    from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
    from unlearn_sweep.evaluation.options import EvalOptions
    from unlearn_sweep.orchestrator.cli import TOY_TASK_SPACES
    from unlearn_sweep.orchestrator.config import config_from_dict
    from unlearn_sweep.orchestrator.sweep import run_sweep

    task = prepared(args.task, args.dir)
    sets = EvalSets.load(task / "data", mia=task / "mia", mmlu=task / "mmlu")
    threshold = round(
        0.75 * evaluate_checkpoint(task / "model", sets, EvalOptions(dtype="float32"))["mmlu_accuracy"], 6
    )
    print(
        f"toy task, methods {', '.join(METHODS)}, {args.trials} trials per run, MMLU threshold {threshold} "
        "(0.75x base)",
        flush=True,
    )
    runs = {}
    for strategy, (sweep_name, keys) in STRATEGIES.items():
        for seed in range(args.seeds):
            name = f"{sweep_name}-{seed}"
            raw = {
                "name": name,
                **sweep_paths(task),
                "mmlu_threshold": threshold,
                "methods": METHODS,
                "search_space_overrides": {
                    method: TOY_TASK_SPACES[method] for method in METHODS if method in TOY_TASK_SPACES
                },
                "confirm": None,  # measured without the confirmation stage, as before it existed
                "trials": args.trials,
                "seed": seed,
                "mlflow": {"tracking_uri": f"sqlite:///{args.dir}/mlflow.db", "experiment": name},
                "storage_path": str(args.dir / "sweeps"),
                "eval": {"dtype": "float32"},
                **keys,
            }
            config = config_from_dict(raw, args.dir / f"{name}.yaml", args.dir)
            began = time.perf_counter()
            run_sweep(config)
            runs[strategy, seed] = trial_history(config.tracking_uri, config.experiment)[1]
            print(f"  {strategy} seed {seed}: {time.perf_counter() - began:.0f} s", flush=True)

    best = max(score for history in runs.values() for _, score in history if score is not None)
    target = 0.95 * best
    print(f"\nbest eligible final score of any run: {best:.4f}; target (95%): {target:.4f}\n")
    print("| strategy | seed | best eligible at budget | trials to 95% | wall time to 95% (s) |")
    print("| --- | --- | --- | --- | --- |")
    summary = {}
    for (strategy, seed), history in runs.items():
        scores = [score for _, score in history if score is not None]
        reached = next(
            (index for index, (_, score) in enumerate(history, start=1) if score is not None and score >= target), None
        )
        row = (max(scores) if scores else None, reached, history[reached - 1][0] if reached else None)
        summary.setdefault(strategy, []).append(row)
        print(
            f"| {strategy} | {seed} | {'-' if row[0] is None else f'{row[0]:.4f}'} | {reached or 'not reached'} | "
            f"{'-' if row[2] is None else f'{row[2]:.0f}'} |"
        )
    print("\n| strategy | mean best at budget | runs reaching 95% | mean trials to 95% | mean wall time to 95% (s) |")
    print("| --- | --- | --- | --- | --- |")
    for strategy, rows in summary.items():
        reached = [row for row in rows if row[1] is not None]
        mean_best = statistics.mean(row[0] if row[0] is not None else 0.0 for row in rows)
        print(
            f"| {strategy} | {mean_best:.4f} | {len(reached)}/{len(rows)} | "
            + (
                f"{statistics.mean(row[1] for row in reached):.1f} | {statistics.mean(row[2] for row in reached):.0f} |"
                if reached
                else "- | - |"
            )
        )


if __name__ == "__main__":
    main()
