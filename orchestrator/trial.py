"""One sweep trial, as a Ray Tune function: apply the sampled method, score every epoch
with the full evaluator, report to Tune and MLflow, keep the best eligible epoch's checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from corpus.semeval import load_task
from evaluation.evaluator import EvalSets, run_inference, score_records, write_results
from methods.registry import build_params, get_method
from methods.training import save_checkpoint
from orchestrator import tracking


def _metrics(scores: dict[str, Any], epoch: int, threshold: float | None) -> dict[str, Any]:
    values = {name: scores[name] for name in tracking.SCORE_METRICS}
    if any(value is None or not math.isfinite(value) for value in values.values()):
        raise FloatingPointError(f"epoch {epoch} scored a missing or non-finite value: {values}")
    return {
        **values,
        "epoch": epoch,
        "eligible": bool(scores["eligible"]),
        # threshold - MMLU: <= 0 is feasible; measured on every report, so every report is final.
        "mmlu_slack": (threshold or 0.0) - scores["mmlu_accuracy"],
        "final_measurement": True,
    }


def run_trial(config: dict[str, Any], settings: dict[str, Any]) -> None:
    """Tune's function trainable; `settings` are the sweep's fixed paths and options."""
    torch.set_num_threads(settings["threads"])  # one per CPU the trial holds: shared cores swing otherwise
    setup = config["setup"]
    context = tune.get_context()
    trial_id, trial_dir = context.get_trial_id(), Path(context.get_trial_dir())
    mlflow = tracking.client(settings["tracking_uri"])
    run_id = tracking.trial_run(mlflow, settings["experiment_id"], settings["parent_run_id"], trial_id, setup,
                                node=ray.get_runtime_context().get_node_id())
    threshold = settings["mmlu_threshold"]
    best = {"score": -math.inf, "eligible": False}
    try:
        task = load_task(settings["data"], settings["split"])
        sets = EvalSets.load(settings["data"], settings["split"], settings["mia"], settings["mmlu"], settings["mmlu_shots"])

        def on_epoch(epoch: int, model, tokenizer) -> None:
            records = run_inference(model, tokenizer, sets, settings["batch_size"], settings["max_new_tokens"])
            scores = score_records(records, threshold)
            metrics = _metrics(scores, epoch, threshold)
            tracking.log_scores(mlflow, run_id, epoch, scores)
            best["eligible"] = best["eligible"] or metrics["eligible"]
            if not (metrics["eligible"] and metrics["final_score"] > best["score"]):
                tune.report(metrics)
                return
            best["score"] = metrics["final_score"]
            tracking.log_best(mlflow, run_id, epoch, metrics)
            with tempfile.TemporaryDirectory(dir=trial_dir) as staging:
                save_checkpoint(model, tokenizer, Path(staging), base_dir=Path(settings["model"]))  # LoRA merged in
                write_results(staging, records, scores)
                (Path(staging) / "trial_config.json").write_text(json.dumps({**setup, "epoch": epoch}, indent=2) + "\n")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))

        method = get_method(setup["method"])
        if "sources" in setup:
            _run_merge(method, setup, settings, task, trial_dir, on_epoch)
        else:
            method.run(Path(settings["model"]), task, None, build_params(method, setup["params"]), on_epoch)
    except BaseException:
        tracking.finish_trial(mlflow, run_id, "failed", best["eligible"])
        raise
    tracking.finish_trial(mlflow, run_id, "finished", best["eligible"])


def _run_merge(method, setup: dict[str, Any], settings: dict[str, Any], task, trial_dir: Path, on_epoch) -> None:
    """Train each source model with its own sampled settings, then merge them; one report."""
    source = get_method(setup["source_method"])
    work = trial_dir / "sources"
    try:
        paths = []
        for name, params in setup["sources"].items():
            paths.append(source.run(Path(settings["model"]), task, work / name, build_params(source, params)))
        params = build_params(method, {**setup["params"], "models": ",".join(map(str, paths))})
        method.run(Path(settings["model"]), task, work / "merged", params, on_epoch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
