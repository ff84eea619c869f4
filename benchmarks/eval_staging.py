"""How much of a toy sweep's trial time goes to evaluation, with staged evaluation (each
epoch screened on a 20% subset first) and without it, at the same seed and budget.

Two sweeps of the same trials (Optuna's random sampler, seed 0, no early stopping: TPE would
sample differently once the two sweeps' scores differ, and the toy's evaluation time depends
on the trial, so only the same configurations compare): per sweep, the share of trial wall time
spent scoring epochs (the `eval_seconds` each epoch logs against the trial runs' durations), how many epochs were fully
evaluated, and the champion's final score.

    python benchmarks/eval_staging.py [--task toy_task] [--trials 12] [--dir /tmp/eval_staging]

`--measure TRACKING_URI EXPERIMENT` prints the same figures for sweeps already run (the demo's:
`--measure sqlite:///mlflow.db unlearn-sweep-demo`) and runs nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search_efficiency import METHODS, prepared


def evaluation_share(tracking_uri: str, experiment: str) -> tuple[float, int, int]:
    """(evaluation seconds / trial seconds, fully evaluated epochs, epochs) over the sweep's trial runs."""
    from unlearn_sweep.orchestrator import tracking

    client = tracking.client(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    evaluation = trial = 0.0
    full = epochs = 0
    for run in client.search_runs([experiment_id], filter_string="tags.trial_id != ''"):
        trial += (run.info.end_time - run.info.start_time) / 1000
        evaluation += sum(metric.value for metric in client.get_metric_history(run.info.run_id, "eval_seconds"))
        stages = client.get_metric_history(run.info.run_id, "full_evaluation")
        full += sum(int(metric.value) for metric in stages)
        epochs += len(stages)
    return evaluation / trial, full, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/eval_staging"))
    parser.add_argument(
        "--measure", nargs=2, metavar=("TRACKING_URI", "EXPERIMENT"), help="an experiment already run: measure only"
    )
    args = parser.parse_args()
    if args.measure:
        share, full, epochs = evaluation_share(*args.measure)
        print(f"{args.measure[1]}: {share:.1%} of trial time in evaluation, {full} of {epochs} epochs fully evaluated")
        return

    from unlearn_sweep.corpus.toy_task import sweep_paths
    from unlearn_sweep.orchestrator.cli import TOY_TASK_SPACES
    from unlearn_sweep.orchestrator.config import config_from_dict
    from unlearn_sweep.orchestrator.sweep import run_sweep

    task = prepared(args.task, args.dir)
    print("| evaluation | share of trial time in evaluation | fully evaluated epochs | champion final score |")
    print("| --- | --- | --- | --- |")
    for screen in (False, True):
        name = "staged" if screen else "full-every-epoch"
        raw = {
            "name": name,
            **sweep_paths(task),
            "mmlu_threshold": "0.75x",
            "methods": METHODS,
            "search_space_overrides": {
                method: TOY_TASK_SPACES[method] for method in METHODS if method in TOY_TASK_SPACES
            },
            "confirm": None,  # measured without the confirmation stage, as before it existed
            "trials": args.trials,
            "seed": 0,
            "searcher": "random",
            "asha": None,
            "eval": {"screen": screen, "dtype": "float32"},
            "mlflow": {"tracking_uri": f"sqlite:///{args.dir}/mlflow.db", "experiment": name},
            "storage_path": str(args.dir / "sweeps"),
        }
        config = config_from_dict(raw, args.dir / f"{name}.yaml", args.dir)
        summary = run_sweep(config)
        share, full, epochs = evaluation_share(config.tracking_uri, config.experiment)
        champion = summary.champion["final_score"] if summary.champion else None
        print(
            f"| {name} | {share:.1%} | {full} of {epochs} | {'-' if champion is None else f'{champion:.4f}'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
