"""MLflow bookkeeping: a parent run per sweep, a child run per trial (found again by its
trial id on resume, never duplicated), the champion as a registered model version."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from unlearn_sweep.corpus import compat
from unlearn_sweep.corpus.errors import DataError

# Metrics logged per epoch, from scores.json.
SCORE_METRICS = (
    "final_score",
    "task_aggregate",
    "mia_auc",
    "mia_score",
    "mmlu_accuracy",
    "forget_mean",
    "retain_mean",
    "train_seconds",  # the trial's unlearning wall time up to the epoch, evaluation excluded
)
MMLU_THRESHOLD = "mmlu_threshold"  # the metric holding a run's absolute MMLU threshold
TIME_LIMIT = "time_limit_s"  # the metric holding a run's time limit
SELECTED_BY = "selected_by"  # a champion version's tag: held_out or tuned (selection.py)
CHECKPOINT_REMOVED = "checkpoint_removed"  # a trial run's tag: why its checkpoint is gone (retention.py)
CONFIRMS = "confirms_run"  # a confirmation run's tag (and setup key): the run of the trial it confirms


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def check_store(tracking_uri: str, existing: bool) -> None:
    """A local store (SQLite file or file: folder) that is usable: its folder exists (MLflow
    would otherwise create a store wherever the URI points), and with `existing` the store
    itself (reading a sweep back must not create an empty mlflow.db). Servers are not checked."""
    scheme = tracking_uri.partition("://")[0].partition("+")[0]
    if scheme in DATABASE_DRIVERS:
        drivers = DATABASE_DRIVERS[scheme]
        if not any(importlib.util.find_spec(module) for module in drivers):
            raise DataError(tracking_uri, f"a {scheme} store needs a driver MLflow can use: pip install {drivers[0]}")
    store = local_store(tracking_uri)
    if store is None:
        return
    if tracking_uri.startswith("sqlite:///"):
        if store.is_dir():
            raise DataError(store, f"is a folder, not an SQLite file (tracking URI {tracking_uri})")
        if store.is_file() and store.stat().st_size and not _is_sqlite(store):
            raise DataError(store, f"not an SQLite database (tracking URI {tracking_uri})")
    elif store.exists() and not store.is_dir():
        raise DataError(store, f"is a file, not an MLflow folder store (tracking URI {tracking_uri})")
    if existing and not store.exists():
        raise DataError(store, f"no MLflow store here (tracking URI {tracking_uri}); pass the sweep's --tracking-uri")
    if not store.parent.is_dir():
        raise DataError(store.parent, f"folder of the MLflow store does not exist (tracking URI {tracking_uri})")


def local_store(tracking_uri: str) -> Path | None:
    """Where a store that is a file of this machine lives (an SQLite file, a file: folder); None
    for a server or a database server."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :])
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
    return None


# SQLAlchemy's driver modules for the database stores MLflow takes, the one to install first.
DATABASE_DRIVERS = {"postgresql": ("psycopg2", "psycopg"), "mysql": ("pymysql", "MySQLdb"), "mssql": ("pyodbc",)}


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(16) == b"SQLite format 3\x00"


def experiment_id(mlflow: MlflowClient, name: str) -> str:
    """Created on the driver before trials start: parallel trials would race to create it."""
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else mlflow.create_experiment(name)


def flat_params(setup: dict[str, Any]) -> dict[str, str]:
    """{'method': 'npo', 'params': {'beta': 0.1}} -> {'method': 'npo', 'beta': '0.1'}; merge
    sources as 'over.learning_rate'."""
    flat = {"method": setup["method"], **{k: str(v) for k, v in setup["params"].items()}}
    if "sources" in setup:
        flat["source_method"] = setup["source_method"]
        for name, params in setup["sources"].items():
            flat.update({f"{name}.{k}": str(v) for k, v in params.items()})
    return flat


def trial_runs(mlflow: MlflowClient, experiment: str, parent_run_id: str, trial_id: str | None = None) -> list:
    """The child runs of a sweep (or the one of a trial)."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" + (
        f" and tags.trial_id = '{trial_id}'" if trial_id else ""
    )
    return mlflow.search_runs([experiment], filter_string=query, max_results=50000)


def trial_run(
    mlflow: MlflowClient,
    experiment: str,
    parent_run_id: str,
    trial_id: str,
    setup: dict[str, Any],
    threshold: float | None,
    node: str = "",
    time_limit_s: float | None = None,
) -> str:
    """A new child run for this attempt of the trial, with its sweep's MMLU threshold
    and the Ray node it runs on. A trial started again (on resume, or after its worker died)
    cannot continue its training mid-way: its earlier runs are closed as interrupted and the
    new attempt gets a run of its own, so that no run holds an epoch's step twice."""
    earlier = trial_runs(mlflow, experiment, parent_run_id, trial_id)
    for run in earlier:
        mark_interrupted(mlflow, run.info.run_id)
    attempt = 1 + max((int(run.data.tags.get("attempt", "1")) for run in earlier), default=0)
    run = mlflow.create_run(
        experiment,
        run_name=f"{setup['method']}-{trial_id}" + (f"-{attempt}" if attempt > 1 else ""),
        tags={
            "mlflow.parentRunId": parent_run_id,
            "trial_id": trial_id,
            "method": setup["method"],
            "status": "running",
            "ray_node": node,
            "attempt": str(attempt),
            "pid": str(os.getpid()),
            **({"source_runs": ",".join(setup["source_runs"])} if setup.get("source_runs") else {}),  # merge stage
            **({CONFIRMS: setup[CONFIRMS]} if setup.get(CONFIRMS) else {}),  # a confirmation run
        },
    )
    mlflow.log_batch(
        run.info.run_id,
        params=[Param(key, value) for key, value in flat_params(setup).items()],
        metrics=limit_metrics(threshold, time_limit_s),
    )
    return run.info.run_id


def limit_metrics(threshold: float | None, time_limit_s: float | None = None) -> list[Metric]:
    """The absolute MMLU threshold and the time limit as numbers on their run (metrics, not
    string tags); none for a limit the sweep does not set."""
    limits = {MMLU_THRESHOLD: threshold, TIME_LIMIT: time_limit_s}
    return _metrics({name: value for name, value in limits.items() if value is not None}, 0)


def recorded_threshold(run) -> float | None:
    """The absolute MMLU threshold a run was recorded with (limit_metrics)."""
    return run.data.metrics.get(MMLU_THRESHOLD)


def record_sweep_settings(
    mlflow: MlflowClient, run_id: str, settings: dict[str, Any], threshold: float | None, time_limit_s: float | None
) -> None:
    """A sweep's settings (params) and limits (metrics) on its run, in one request."""
    mlflow.log_batch(
        run_id,
        metrics=limit_metrics(threshold, time_limit_s),
        params=[Param(key, str(value)) for key, value in settings.items()],
    )


def tag_version_rule(mlflow: MlflowClient, name: str, version: str, threshold: float | None, by: str) -> None:
    """The rule a champion was crowned under, on its model version: the threshold (versions
    hold only string tags, so the number's exact decimal text, no tag for no threshold) and
    the score it was selected by."""
    if threshold is None:
        if MMLU_THRESHOLD in mlflow.get_model_version(name, version).tags:
            mlflow.delete_model_version_tag(name, version, MMLU_THRESHOLD)
    else:
        mlflow.set_model_version_tag(name, version, MMLU_THRESHOLD, repr(float(threshold)))
    mlflow.set_model_version_tag(name, version, SELECTED_BY, by)


def version_rule(version) -> tuple[float | None, str]:
    """The (threshold, selected by) tag_version_rule wrote on a model version."""
    text = version.tags.get(MMLU_THRESHOLD)
    return None if text is None else float(text), version.tags.get(SELECTED_BY, "tuned")


def _metrics(values: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(name, float(value), now, step) for name, value in values.items()]


def log_scores(mlflow: MlflowClient, run_id: str, epoch: int, scores: dict[str, Any]) -> None:
    """One epoch's scores in one batch (one SQLite transaction, not one per metric)."""
    values = {name: scores[name] for name in SCORE_METRICS if scores.get(name) is not None}
    values["full_evaluation"] = float(scores.get("stage", "full") == "full")  # 0: screened on the subset only
    for split, tasks in scores["per_task"].items():
        for task, metrics in tasks.items():
            values.update({f"{split}.{task}.{metric}": value for metric, value in metrics.items()})
    mlflow.log_batch(run_id, metrics=_metrics(values, epoch))


def log_best(mlflow: MlflowClient, run_id: str, epoch: int, metrics: dict[str, Any], step: int | None = None) -> None:
    """The trial's best eligible epoch so far, as best_* metrics (their latest value is the
    trial's best): what selection ranks by. Logged at the epoch's step unless told another."""
    values = {f"best_{name}": metrics[name] for name in SCORE_METRICS}
    mlflow.log_batch(run_id, metrics=_metrics({**values, "best_epoch": epoch}, epoch if step is None else step))


def finish_trial(
    mlflow: MlflowClient, run_id: str, status: str, stopped_early: bool = False, end_time: int | None = None
) -> None:
    """Tags: status (finished | failed), eligible (some epoch reached the MMLU threshold, i.e.
    the run has best_* metrics) and stopped_early (by the scheduler); end_time (ms) if not now.
    The run is ended before
    it is tagged: Tune may kill a stopped trial's worker between the two writes, and a run
    left tagged 'running' is one the sweep closes itself, where one tagged finished would stay
    open in MLflow for good."""
    eligible = "best_final_score" in mlflow.get_run(run_id).data.metrics
    mlflow.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED", end_time=end_time)
    mlflow.log_batch(
        run_id,
        tags=[
            RunTag("status", status),
            RunTag("eligible", str(eligible).lower()),
            RunTag("stopped_early", str(stopped_early).lower()),
        ],
    )


def last_report_time(mlflow: MlflowClient, run_id: str) -> int | None:
    """When the run logged its last epoch's scores (ms), None before its first."""
    history = mlflow.get_metric_history(run_id, "full_evaluation")  # logged with every epoch's scores
    return max((metric.timestamp for metric in history), default=None)


INTERRUPTED_AT = "interrupted_at_ms"  # the parent's tag: when Ctrl-C or SIGTERM reached the driver


def record_interrupt(mlflow: MlflowClient, parent_run_id: str, at_ms: int) -> None:
    """Say on the sweep's run when it was interrupted, for its trials to read before they close."""
    mlflow.set_tag(parent_run_id, INTERRUPTED_AT, str(at_ms))


def open_at(info: Any, at_ms: int) -> bool:
    """Whether the run (its RunInfo) was open at that time (ms since the epoch)."""
    return info.start_time <= at_ms <= (info.end_time or math.inf)


def close_stopped_trial(mlflow: MlflowClient, run_id: str, parent_run_id: str) -> None:
    """A trial run Tune stopped at a report: interrupted if it was open when the sweep was
    interrupted (Tune's graceful stop looks, from inside a trial, like a scheduler's), else
    finished early. An interrupt of a resumed sweep's earlier driver came before the run."""
    at_ms = mlflow.get_run(parent_run_id).data.tags.get(INTERRUPTED_AT)
    if at_ms is not None and open_at(mlflow.get_run(run_id).info, int(at_ms)):
        mark_interrupted(mlflow, run_id)
    else:
        finish_trial(mlflow, run_id, "finished", stopped_early=True)


def reopen_sweep(mlflow: MlflowClient, run: Any) -> None:
    """A resumed sweep's run runs again: RUNNING, without the end its last attempt recorded
    (interrupted or failed: it said so while the sweep ran again; end_parent records the new one)."""
    mlflow.update_run(run.info.run_id, status="RUNNING")
    if "status" in run.data.tags:
        mlflow.delete_tag(run.info.run_id, "status")


def mark_interrupted(mlflow: MlflowClient, run_id: str) -> None:
    """A trial run stopped before its end (Ctrl-C, or a sweep that lost track of it): KILLED and
    tagged interrupted, whatever it recorded itself (Tune's graceful stop looks like a
    scheduler's early stop from inside a trial); excluded from leaderboards. Ended first, as
    in finish_trial."""
    if mlflow.get_run(run_id).info.status != "KILLED":
        mlflow.set_terminated(run_id, "KILLED")
    mlflow.set_tag(run_id, "status", "interrupted")


WEIGHT_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


def model_version(
    mlflow: MlflowClient, tracking_uri: str, name: str, run_id: str, epoch: int, checkpoint_dir: Path
) -> str | None:
    """The registered model version of a trial's checkpoint (run and epoch): the existing one
    if it was registered before (a re-run or resumed sweep), None if it was not and the
    checkpoint is no longer on disk, else logged and registered now:
    the checkpoint as a Transformers-flavour MLflow model (a LoggedModel of the trial's run,
    with its best metrics; `models:/<name>@champion` loads and generates), its records,
    scores and trial config as the run's `checkpoint` artifacts."""
    import mlflow as fluent
    import torch
    import transformers

    for version in mlflow.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.tags.get("epoch") == str(epoch):
            return str(version.version)
    if not (checkpoint_dir / "scores.json").is_file():
        return None
    try:
        mlflow.get_registered_model(name)
    except MlflowException:
        mlflow.create_registered_model(name)
    weights = {path for pattern in WEIGHT_FILES for path in checkpoint_dir.glob(pattern)}
    for path in sorted(set(checkpoint_dir.iterdir()) - weights):
        mlflow.log_artifact(run_id, str(path), "checkpoint")
    scores = json.loads((checkpoint_dir / "scores.json").read_text())
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
    ]  # nothing else, no torchvision
    fluent.set_tracking_uri(tracking_uri)
    finished = mlflow.get_run(run_id).info
    # Logged from the folder: its files are copied, the model is never loaded (a 7B float32
    # checkpoint would take 28 GB of the driver's memory and a second serialisation).
    with fluent.start_run(run_id=run_id), compat.pipeline_classes_for_mlflow():
        logged = fluent.transformers.log_model(
            transformers_model=str(checkpoint_dir.resolve()),
            name="champion",
            task="text-generation",
            pip_requirements=requirements,
        )
        # Its scores, linked to the model under names of their own (the run's best_* already hold this step).
        fluent.log_metrics(
            {f"champion_{key}": scores[key] for key in SCORE_METRICS if key in scores},
            step=epoch,
            model_id=logged.model_id,
        )
    mlflow.set_terminated(
        run_id, finished.status, end_time=finished.end_time
    )  # reopening moved its end: the trial's own stays
    tags = {
        "final_score": str(scores["final_score"]),
        "mmlu_accuracy": str(scores["mmlu_accuracy"]),
        "epoch": str(epoch),
    }
    return str(
        mlflow.create_model_version(name, logged.model_uri, run_id=run_id, model_id=logged.model_id, tags=tags).version
    )


def end_parent(mlflow: MlflowClient, run_id: str, failed: bool = False) -> None:
    mlflow.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))
    mlflow.set_tag(
        run_id, "status", "failed" if failed else "finished"
    )  # a resumed sweep's parent was tagged interrupted
