"""The one selection rule, and reading sweeps back from MLflow through it.

Every answer to "which trial is best" comes from `select`: the sweep's own leaderboard and
champion, `unlearn-sweep best`, `export` (the champion alias) and the alias itself. A trial
counts when it finished (an early stop by the scheduler is a finish; failed, killed and
interrupted runs never count), has a saved best eligible checkpoint, and is eligible under the
MMLU threshold of the sweep that produced it and, where given, under a stricter one.

Trials rank by one of two scores (the sweep's `select_by`, recorded with the champion):
- held_out: the final score of the trial's confirmation run, its configuration re-run from the
  base model on the held-out fold; only trials whose confirmation is eligible count;
- tuned: the trial's own best eligible final score, on the fold it was searched on (optimistic:
  the best of many noisy trials, measured where it was picked)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.staging import staged_directory
from unlearn_sweep.evaluation.eligibility import meets_all
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.submission import write_submission

T = TypeVar("T")
CONFIRMATION_SCORES = "confirmation_scores.json"  # an export's: the held-out scores its champion was chosen by


class SelectionError(DataError):
    """Nothing to select: an unknown experiment, or no eligible trial."""


@dataclass(frozen=True)
class Entry:
    """A trial run as selection sees it: its best eligible epoch's scores (best_* metrics)."""

    run_id: str
    trial_id: str
    method: str
    status: str  # the run's status tag: running | finished | failed | interrupted
    params: dict[str, str]
    scores: dict[str, float]  # final_score, ..., epoch; empty when no epoch was eligible
    checkpoint: str | None
    threshold: float | None  # the absolute MMLU threshold of the trial's sweep
    confirms: str | None = None  # a confirmation run: the run of the trial it re-ran on the held-out fold
    held_out: dict[str, float] | None = None  # a trial's: its eligible confirmation's scores (select fills it)
    checkpoint_removed: str | None = None  # why the checkpoint is gone from storage (keep_checkpoints)

    @classmethod
    def from_run(cls, run) -> Entry:
        tags, metrics = run.data.tags, run.data.metrics
        scores = {
            name: metrics[f"best_{name}"] for name in (*tracking.SCORE_METRICS, "epoch") if f"best_{name}" in metrics
        }
        return cls(
            run.info.run_id,
            tags.get("trial_id", ""),
            tags.get("method", ""),
            tags.get("status", ""),
            dict(run.data.params),
            scores,
            tags.get("checkpoint"),
            tracking.recorded_threshold(run),
            tags.get(tracking.CONFIRMS),
            checkpoint_removed=tags.get(tracking.CHECKPOINT_REMOVED),
        )


def eligible(entry: Entry, threshold: float | None = None) -> bool:
    """Whether the entry can be selected, under its own sweep's threshold and `threshold`."""
    if entry.status != "finished" or "final_score" not in entry.scores or not entry.checkpoint:
        return False
    return meets_all(entry.scores["mmlu_accuracy"], entry.threshold, threshold)


def select(entries: list[Entry], threshold: float | None = None, by: str = "tuned") -> list[Entry]:
    """The selectable trials, best first by the rule `by` (ties: the earlier trial id); under
    held_out each carries its confirmation's scores."""
    trials = [e for e in entries if e.confirms is None and eligible(e, threshold)]
    if by == "tuned":
        return sorted(trials, key=lambda e: (-e.scores["final_score"], e.trial_id))
    confirmations = {e.confirms: e for e in entries if e.confirms is not None and eligible(e, threshold)}
    confirmed = [
        dataclasses.replace(e, held_out=confirmations[e.run_id].scores) for e in trials if e.run_id in confirmations
    ]
    return sorted(confirmed, key=lambda e: (-e.held_out["final_score"], -e.scores["final_score"], e.trial_id))


def merge_source_picks(eligible: list[T], forget_mean: Callable[[T], float]) -> dict[str, T | None]:
    """What each of the merge stage's selectors (config.STAGE_SELECTORS) picks among eligible
    trials, best first: the lowest forget mean (most forgetting) and the highest, the first on a tie."""
    return {
        "most_forgetting": min(eligible, key=forget_mean, default=None),
        "least_forgetting": max(eligible, key=forget_mean, default=None),
    }


def _experiment_id(client: MlflowClient, experiment: str, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SelectionError(tracking_uri, f"no MLflow experiment named {experiment!r}")
    return found.experiment_id


def trial_entries(client: MlflowClient, experiment_id: str, parent_run_id: str | None = None) -> list[Entry]:
    """Every trial run of the experiment (or of one sweep)."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else "tags.trial_id != ''"
    return [Entry.from_run(run) for run in client.search_runs([experiment_id], filter_string=query, max_results=50000)]


def champion_version(client: MlflowClient, name: str):
    """The model version the alias 'champion' points to, or None."""
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def crown(
    client: MlflowClient,
    tracking_uri: str,
    name: str,
    experiment_id: str,
    threshold: float | None,
    by: str = "tuned",
) -> tuple[Entry, str] | None:
    """Point the alias 'champion' of registered model `name` at the experiment's best trial by
    the rule (`threshold` and `by`, the current sweep's): the alias never moves to a checkpoint
    that is ineligible under it, and a checkpoint is registered once however often this runs.
    Returns the champion and its model version, or None when no trial qualifies."""
    for entry in select(trial_entries(client, experiment_id), threshold, by):
        version = tracking.model_version(
            client, tracking_uri, name, entry.run_id, int(entry.scores["epoch"]), Path(entry.checkpoint)
        )
        if version is None:
            continue  # an earlier sweep's checkpoint, never registered, that is gone from its storage
        tracking.tag_version_rule(client, name, version, threshold, by)
        client.set_registered_model_alias(name, "champion", version)
        return entry, version
    return None


def leaderboard(experiment: str, tracking_uri: str, top: int | None = None) -> list[Entry]:
    """The experiment's selectable trials, best first, by the rule of the sweep that last chose
    the champion (so that the first entry is the champion), else each under its own threshold
    by its tuned score."""
    client = tracking.client(tracking_uri)
    entries = trial_entries(client, _experiment_id(client, experiment, tracking_uri))
    version = champion_version(client, experiment)
    ranked = select(entries, *(tracking.version_rule(version) if version else (None, "tuned")))
    return ranked[:top] if top else ranked


def champion_run(experiment: str, tracking_uri: str) -> str:
    """The run of the registered model version with alias 'champion'."""
    client = tracking.client(tracking_uri)
    _experiment_id(client, experiment, tracking_uri)
    version = champion_version(client, experiment)
    if version is None:
        raise SelectionError(
            tracking_uri, f"experiment {experiment!r} has no champion (no sweep found an eligible trial)"
        )
    return version.run_id


def export_champion(experiment: str, tracking_uri: str, out_dir: str | Path) -> Path:
    """The champion checkpoint (safetensors + tokenizer, from the registered MLflow model), its
    scores.json, records and trial_config.json, the scores it was chosen by where its sweep
    confirmed on the held-out fold (confirmation_scores.json), and the runnable submission (its
    configuration and unlearn.py, submission.py), written to out_dir whole or not at all."""
    run_id = champion_run(experiment, tracking_uri)
    held_out = next((e.held_out for e in leaderboard(experiment, tracking_uri) if e.run_id == run_id), None)
    mlflow.set_tracking_uri(tracking_uri)
    with staged_directory(out_dir) as staging:
        model = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{experiment}@champion", dst_path=str(staging / ".model")
            )
        )
        files = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="checkpoint", dst_path=str(staging / ".files")
            )
        )
        for folder in (model / "model", model / "components" / "tokenizer", files):
            for path in folder.iterdir():
                path.rename(staging / path.name)
        shutil.rmtree(staging / ".model")
        shutil.rmtree(staging / ".files")
        config = json.loads((staging / "trial_config.json").read_text())
        (staging / "trial_config.json").write_text(
            json.dumps({**config, "experiment": experiment, "run_id": run_id}, indent=2) + "\n"
        )
        if held_out:
            (staging / CONFIRMATION_SCORES).write_text(json.dumps(held_out, indent=2) + "\n")
        write_submission(staging, config)
    return Path(out_dir)
