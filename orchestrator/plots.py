"""The sweep's plots, logged as artifacts of its parent MLflow run."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402


def score_vs_mmlu(rows: list[dict], threshold: float | None, path: Path) -> Path:
    """Final score against MMLU per finished trial, the threshold as a vertical line."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for eligible, color in ((True, "tab:blue"), (False, "tab:gray")):
        points = [r for r in rows if r["eligible"] == eligible]
        axes.scatter(
            [r["mmlu_accuracy"] for r in points],
            [r["final_score"] for r in points],
            c=color,
            label="eligible" if eligible else "below threshold",
        )
    if threshold is not None:
        axes.axvline(threshold, color="tab:red", linestyle="--", label=f"MMLU threshold {threshold:.3f}")
    axes.set_xlabel("MMLU accuracy")
    axes.set_ylabel("final score")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def aggregate_terms(scores: dict, path: Path) -> Path:
    """The 12 terms of a checkpoint's task aggregate (forget means inverted, as the harmonic
    mean takes them): the term near 0 that sinks the harmonic mean is the one to look at."""
    labels, values = [], []
    for split in ("forget", "retain"):
        for task, means in sorted(scores["per_task"].get(split, {}).items()):
            for kind, value in sorted(means.items()):
                labels.append(f"{split} {task} {kind}")
                values.append(1 - value if split == "forget" else value)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.barh(labels, values, color=["tab:orange" if label.startswith("forget") else "tab:blue" for label in labels])
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("term of the harmonic mean (forget: 1 - mean)")
    axes.set_title(f"task aggregate {scores['task_aggregate']:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def optuna_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimisation history, parallel coordinates of the searched parameters, and parameter
    importances (the last two need two finished trials and a parameter that varied)."""
    from optuna.visualization import matplotlib as optuna_plt

    paths = []
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = [("optimization_history.png", optuna_plt.plot_optimization_history)]
    if len(completed) >= 2 and any(t.params for t in completed):
        plots += [
            ("parallel_coordinates.png", optuna_plt.plot_parallel_coordinate),
            ("param_importances.png", optuna_plt.plot_param_importances),
        ]
    for name, plot in plots:
        try:
            with warnings.catch_warnings():  # experimental-API and few-trials notices
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError):  # e.g. importances when no parameter varied
            continue
        axes.figure.tight_layout()
        axes.figure.savefig(out_dir / name, dpi=110)
        plt.close(axes.figure)
        paths.append(out_dir / name)
    return paths
