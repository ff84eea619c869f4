"""Reading a finished sweep back from MLflow: the leaderboard of eligible trials and the
champion checkpoint, exported as a submission."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
from mlflow.exceptions import MlflowException

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.staging import staged_directory
from unlearn_sweep.orchestrator import tracking


class SelectionError(DataError):
    """Nothing to select: an unknown experiment, or no eligible trial."""


@dataclass
class Entry:
    run_id: str
    trial_id: str
    method: str
    params: dict[str, str]
    scores: dict[str, float]
    checkpoint: str | None


def leaderboard(experiment: str, tracking_uri: str, top: int | None = None) -> list[Entry]:
    """Eligible finished trials of the experiment's sweeps, best final score first."""
    client = tracking.client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SelectionError(tracking_uri, f"no MLflow experiment named {experiment!r}")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="tags.eligible = 'true' and tags.status = 'finished'",
        order_by=["metrics.best_final_score DESC"],
        max_results=top or 1000,
    )
    return [
        Entry(
            run.info.run_id, run.data.tags.get("trial_id", ""), run.data.tags.get("method", ""), dict(run.data.params),
            {name: run.data.metrics.get(f"best_{name}") for name in (*tracking.SCORE_METRICS, "epoch")},
            run.data.tags.get("checkpoint"),
        )
        for run in runs
        if "best_final_score" in run.data.metrics
    ]


def champion_run(experiment: str, tracking_uri: str) -> str:
    """The run of the registered model version with alias 'champion'."""
    client = tracking.client(tracking_uri)
    try:
        return client.get_model_version_by_alias(experiment, "champion").run_id
    except MlflowException:
        raise SelectionError(tracking_uri, f"experiment {experiment!r} has no champion (no sweep found an eligible trial)") from None


def export_champion(experiment: str, tracking_uri: str, out_dir: str | Path) -> Path:
    """The champion checkpoint (safetensors + tokenizer), its scores.json, records and
    trial_config.json, written to out_dir whole or not at all."""
    run_id = champion_run(experiment, tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with staged_directory(out_dir) as staging:
        downloaded = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(staging)))
        for path in downloaded.iterdir():
            path.rename(staging / path.name)
        downloaded.rmdir()
        config = json.loads((staging / "trial_config.json").read_text())
        (staging / "trial_config.json").write_text(json.dumps({**config, "experiment": experiment, "run_id": run_id}, indent=2) + "\n")
    return Path(out_dir)

