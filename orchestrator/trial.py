"""One sweep trial, as a Ray Tune function: apply the sampled method, score every epoch
with the full evaluator, report to Tune and MLflow, keep the best eligible epoch's checkpoint.

A trial with one worker trains in the Tune trial's own process. With several workers
(`resources_per_trial.workers`), the trial builds and fits its own Ray Train TorchTrainer
(the Ray >= 2.51 pattern): every worker trains its share of each batch under DeepSpeed
ZeRO; rank 0 scores each epoch on its device and saves the consolidated checkpoint; every
rank reports, and TuneReportCallback passes rank 0's metrics on to Tune."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from unlearn_sweep.corpus.compat import TUNE_STOPPED_TRIAL, local_storage_copies, without_hf_deepspeed_config
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.mia import load_held_out
from unlearn_sweep.corpus.semeval import TaskData, load_task
from unlearn_sweep.evaluation.eligibility import Limits, TrialObjective
from unlearn_sweep.evaluation.evaluator import (
    MMLU,
    EvalSets,
    eval_settings,
    gathered_inference,
    load,
    release,
    score_records,
    write_results,
)
from unlearn_sweep.evaluation.screening import Split
from unlearn_sweep.evaluation.staged import Evaluated, StagedEvaluation
from unlearn_sweep.methods.merge import MergeParams
from unlearn_sweep.methods.registry import Method, build_params, get_method, run_method
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.config import Asha
from unlearn_sweep.orchestrator.context import MULTI_WORKER_DEFAULTS, TrialContext, trial_folder_name
from unlearn_sweep.orchestrator.inputs import check_unchanged

# (metrics, checkpoint folder or None) -> reported to Tune or Train.
Report = Callable[[dict[str, Any], "Path | None"], None]


def epoch_metrics(scores: dict[str, Any], epoch: int, limits: Limits) -> dict[str, Any]:
    """One epoch's scores as reported, with its eligibility and its limits' slacks."""
    values = {name: scores[name] for name in tracking.SCORE_METRICS}
    if any(value is None or not math.isfinite(value) for value in values.values()):
        raise FloatingPointError(f"epoch {epoch} scored a missing or non-finite value: {values}")
    return {
        **values,
        "epoch": epoch,
        "eligible": bool(scores["eligible"]),
        **limits.slacks(scores),
        "full_evaluation": float(scores.get("stage", "full") == "full"),
    }


def epoch_report(scores: dict[str, Any], epoch: int, limits: Limits, objective: TrialObjective) -> dict[str, Any]:
    """What one epoch reports: its scores, and the trial's objective updated with it."""
    metrics = epoch_metrics(scores, epoch, limits)
    improved = objective.update(epoch, metrics["final_score"], limits.slacks(scores))
    return {**metrics, "new_best": improved, **objective.metrics()}


def decision_epochs(asha: Asha | None, max_t: int) -> list[int]:
    """The epochs at which ASHA may stop a trial on its objective (its rungs, and max_t): a
    staged trial's objective must be fully evaluated by then."""
    if asha is None:
        return []
    rungs, milestone = [], asha.grace_period
    while milestone < max_t:
        rungs.append(milestone)
        milestone *= asha.reduction_factor
    return [*rungs, max_t]


class EpochReporter:
    """The per-epoch hook of a trial, glue around its StagedEvaluation (evaluation/staged.py):
    compute the records it asks for, score them, log to MLflow, save the epoch it names as the
    trial's best, report. Under several ranks every rank evaluates its share of the rows, MIA
    documents and MMLU questions of each checkpoint; rank 0 gathers the records and decides,
    scores, logs and saves; the others follow its decisions and report its metrics too (Train's
    reports are a barrier)."""

    def __init__(self, context: TrialContext, setup: dict[str, Any], run_id: str, report: Report, rank: int = 0):
        self.context, self.setup, self.run_id, self.report, self.rank = context, setup, run_id, report, rank
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.sets = context.eval_sets()
        self.split = Split.draw(self.sets, context.eval.screen_fraction) if context.eval.screen else None
        self.mlflow = tracking.client(context.tracking_uri) if rank == 0 else None
        # Rank 0 decides; the others evaluate the epochs it names.
        self.staging = StagedEvaluation(context.eval, context.limits, context.decision_epochs) if rank == 0 else None
        # The unlearning clock: from here (the method loads the model next) to each epoch's end,
        # less the time this hook took. Rank 0's is the trial's.
        self.clock_start, self.hook_seconds, self.train_seconds = time.perf_counter(), 0.0, {}
        if rank == 0:
            self.mlflow.set_tag(run_id, "eval_ranks", str(self.world))
            self._carry_over(tune.get_checkpoint() if context.workers == 1 else None)

    def _carry_over(self, checkpoint: tune.Checkpoint | None) -> None:
        """A trial started again (resume) keeps the best eligible epoch its earlier attempt saved
        (Tune still holds that checkpoint): the new attempt only saves an epoch that beats it,
        and its run records it as its best until then."""
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            scores = json.loads((Path(folder) / "scores.json").read_text())
            epoch = json.loads((Path(folder) / "trial_config.json").read_text())["epoch"]
        metrics = epoch_report(scores, epoch, self.context.limits, self.staging.objective)
        tracking.log_best(self.mlflow, self.run_id, epoch, metrics, step=0)  # before this attempt's epochs 1, 2, ...
        self.mlflow.set_tag(self.run_id, "carried_over_epoch", str(epoch))

    def _records(self, model, tokenizer, sets: EvalSets) -> dict[str, list[dict]] | None:
        """This rank's share of the sets' records; on rank 0, all of them in the sets' order."""
        return gathered_inference(model, tokenizer, sets, self.context.eval)

    def _share(self, value: Any) -> Any:
        """Rank 0's value on every rank."""
        if self.world == 1:
            return value
        shared = [value]
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]

    def _score(self, records: dict[str, list[dict]], stage: str, epoch: int) -> dict:
        """The epoch's scores, with its training seconds and eligibility under every limit."""
        settings = eval_settings(self.sets, self.context.eval)
        scores = {**score_records(records, self.context.mmlu_threshold, settings), "stage": stage}
        scores["train_seconds"] = self.train_seconds[epoch]
        return {**scores, "eligible": self.context.limits.eligible(scores)}

    def _evaluate(self, epoch: int, checkpoint: Path, last: bool) -> tuple[dict | None, list[Evaluated]]:
        """On rank 0: this epoch's screened scores (None without staging) and the full
        evaluations staging asked for. Elsewhere (None, [])."""
        options = self.context.eval
        with without_hf_deepspeed_config():  # a whole model on each rank, also in a ZeRO-3 run
            model, tokenizer = load(checkpoint, options)
            screened, targets = None, [(epoch, checkpoint)]
            if self.split is not None:
                records = self._records(model, tokenizer, self.split.screened(self.sets))
                if self.rank == 0:
                    screened = self._score(records, "screen", epoch)
                    targets = self.staging.plan(epoch, checkpoint, screened, records.get(MMLU, []), last)
                targets = self._share(targets)
            evaluated = []
            for target_epoch, folder in targets:  # this epoch first: its model is loaded
                if target_epoch != epoch:
                    release(model, options)
                    del model
                    model, tokenizer = load(folder, options)
                # The whole sets in one pass, not the rest beside the screened part: in bfloat16 a row's
                # numbers depend on its batch, and the saved checkpoint must re-evaluate to its logged score.
                evaluated.append((target_epoch, Path(folder), self._records(model, tokenizer, self.sets)))
            release(model, options)
        if self.rank != 0:
            return None, []
        return screened, [
            Evaluated(e, folder, records, self._score(records, "full", e)) for e, folder, records in evaluated
        ]

    def __call__(self, epoch: int, checkpoint: Path | None, last: bool) -> None:
        started = time.perf_counter()
        self.train_seconds[epoch] = started - self.clock_start - self.hook_seconds
        if self.context.final_epoch_only and not last:
            return
        screened, evaluated = self._evaluate(epoch, checkpoint, last)
        metrics = saved = None
        if self.rank == 0:
            limits = self.context.limits
            # epoch_metrics refuses a missing or non-finite score, before the objective takes it
            full = {entry.epoch: epoch_metrics(entry.scores, entry.epoch, limits) for entry in evaluated}
            outcome = self.staging.conclude(epoch, screened, evaluated)
            metrics = epoch_metrics(outcome.own, epoch, limits)
            for logged_epoch, scores in outcome.to_log:
                tracking.log_scores(self.mlflow, self.run_id, logged_epoch, scores)
            if outcome.best is not None:
                best = outcome.best
                tracking.log_best(self.mlflow, self.run_id, best.epoch, full[best.epoch])
                saved = best.folder
                write_results(saved, best.records, best.scores)
                config = {**self.setup, "epoch": best.epoch}
                if self.context.held_out is not None:  # what an exported submission bundles for methods that read it
                    config["held_out"] = self.context.held_out
                (saved / "trial_config.json").write_text(json.dumps(config, indent=2) + "\n")
            seconds = time.perf_counter() - started  # what the epoch's scoring cost, beside its training
            self.mlflow.log_metric(self.run_id, "eval_seconds", seconds, step=epoch)
            objective = self.staging.objective.metrics()
            metrics = {**metrics, "new_best": outcome.improved, "eval_seconds": seconds, **objective}
        with local_storage_copies():  # Ray copies a reported checkpoint into storage_path; ours is deleted next
            self.report(self._share(metrics), saved)
        if self.rank == 0 and evaluated:
            self.staging.discard_evaluated()  # fully evaluated now, reported (Tune copied it) or not the best
        self.hook_seconds += time.perf_counter() - started


def _tune_report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)


def _train_report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None)


def trial_task(context: TrialContext, method: Method) -> TaskData:
    """The sweep's forget and retain rows, with its held-out documents where it has them and
    the method reads them (a merge: where its source method does); first, this node's inputs
    checked against the sweep's at its start."""
    check_unchanged(context.inputs, ray.util.get_node_ip_address())
    task = load_task(context.data, context.split)
    if context.held_out is None or not method.uses_held_out:
        return task
    # Checked against the scored MIA set once, when the config was read: not in every trial and rank.
    return dataclasses.replace(task, held_out=load_held_out(context.held_out, None))


@contextlib.contextmanager
def released_gpu_cache() -> Iterator[None]:
    """Give the trial's cached GPU memory back when it ends, however it ends: with reuse_actors
    the actor lives on into the next trial, and on a GPU shared by fractional trials its
    allocator would keep this trial's peak reservation from the others."""
    try:
        yield
    finally:
        if torch.cuda.is_initialized():
            gc.collect()  # the trial's tensors held only by reference cycles
            torch.cuda.empty_cache()


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune's function trainable; `context` holds the sweep's fixed paths and options."""
    torch.set_num_threads(context.threads)  # one per CPU the trial holds: shared cores swing otherwise
    only_the_gpus_ray_gave()
    setup = config["setup"]
    tune_context = tune.get_context()
    trial_id = tune_context.get_trial_id()
    mlflow = tracking.client(context.tracking_uri)
    run_id = tracking.trial_run(
        mlflow,
        context.experiment_id,
        context.parent_run_id,
        trial_id,
        setup,
        context.mmlu_threshold,
        node=ray.get_runtime_context().get_node_id(),
        time_limit_s=context.time_limit_s,
    )
    with released_gpu_cache():
        try:
            if context.workers > 1:
                _fit_distributed(setup, context, run_id, trial_id)
            elif "sources" in setup:
                reporter = EpochReporter(context, setup, run_id, _tune_report)
                _run_merge(setup, context, Path(tune_context.get_trial_dir()), reporter)
            else:
                method = get_method(setup["method"])
                method.run(
                    Path(context.model),
                    trial_task(context, method),
                    None,
                    build_params(method, setup["params"]),
                    EpochReporter(context, setup, run_id, _tune_report),
                )
        except TUNE_STOPPED_TRIAL:  # raised at a report when the scheduler stopped the trial early,
            # or Ctrl-C did: the driver says so on its run before it asks Tune to stop. Decided here,
            # since this worker may still be closing its run after the driver marked it.
            tracking.close_stopped_trial(mlflow, run_id, context.parent_run_id)
            raise
        except KeyboardInterrupt:  # Ctrl-C sent to the whole process group reached this worker
            tracking.mark_interrupted(mlflow, run_id)
            raise
        except BaseException:
            tracking.finish_trial(mlflow, run_id, "failed")
            raise
    tracking.finish_trial(mlflow, run_id, "finished")


def _run_merge(setup: dict[str, Any], context: TrialContext, trial_dir: Path, on_epoch: EpochReporter) -> None:
    """Train each source model with its own sampled settings (or find it trained by an earlier
    trial with the same settings), then merge them; one report."""
    merge = get_method(setup["method"])
    task = trial_task(context, get_method(setup["source_method"]))
    work = trial_dir / "sources"
    try:
        paths = [
            _source_checkpoint(setup["source_method"], params, context, task, work / name)
            for name, params in setup["sources"].items()
        ]
        models = MergeParams.models_setting(paths)
        if on_epoch.mlflow is not None:
            on_epoch.mlflow.set_tag(on_epoch.run_id, "source_checkpoints", models)
        params = build_params(merge, {**setup["params"], "models": models})
        merge.run(Path(context.model), task, None, params, on_epoch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source_checkpoint(
    method: str, params: dict[str, Any], context: TrialContext, task: TaskData, scratch: Path
) -> Path:
    """A merge source, trained once per configuration: the sweep's source cache holds it under
    a hash of everything that determines it. Without a cache (sources that cannot recur) it is
    trained into the trial's scratch folder."""
    if context.source_cache is None:
        return run_method(method, context.model, task, scratch, params)
    identity = {
        "method": method,
        "params": params,
        **{key: getattr(context, key) for key in ("model", "data", "split", "held_out")},
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(context.source_cache) / f"{method}-{key}"
    if not (folder / "unlearn_config.json").is_file():
        try:
            run_method(method, context.model, task, folder, params)
        except (DataError, OSError):  # another trial finished the same source first
            if not (folder / "unlearn_config.json").is_file():
                raise
    return folder


def only_the_gpus_ray_gave() -> None:
    """A trial sees exactly the GPUs Ray assigned it. Ray (2.60) no longer blanks
    CUDA_VISIBLE_DEVICES for a worker given no GPU: a `gpu: 0` trial on a GPU host saw them all,
    and the Trainer then spread it over every one (DataParallel), beside the trials holding
    them. Called before anything initialises CUDA in the worker."""
    if not ray.get_gpu_ids():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def export_ray_train_ranks() -> int:
    """In a Ray Train worker, the launcher variables torchrun would set (DeepSpeed's zero.Init
    and accelerate read them; Ray Train sets up the process group but not these). Returns
    this worker's world rank."""
    context = ray.train.get_context()
    os.environ.update(
        RANK=str(context.get_world_rank()),
        LOCAL_RANK=str(context.get_local_rank()),
        WORLD_SIZE=str(context.get_world_size()),
        LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
    )
    return context.get_world_rank()


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a distributed trial (DeepSpeed ZeRO-2 unless the trial names a stage)."""
    context, setup = loop_config["context"], loop_config["setup"]
    torch.set_num_threads(context.threads)
    only_the_gpus_ray_gave()
    rank = export_ray_train_ranks()
    method = get_method(setup["method"])
    # in the trial_config.json it saves: its exported submission runs under torchrun the same way
    setup = {**setup, "params": {**MULTI_WORKER_DEFAULTS, **setup["params"]}}
    params = build_params(method, setup["params"])
    reporter = EpochReporter(context, setup, loop_config["run_id"], _train_report, rank)
    method.run(Path(context.model), trial_task(context, method), None, params, reporter)


def _fit_distributed(setup: dict[str, Any], context: TrialContext, run_id: str, trial_id: str) -> None:
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker = {"CPU": context.cpu_per_worker}
    if context.gpu_per_worker:
        per_worker["GPU"] = context.gpu_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"context": context, "setup": setup, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=context.workers, use_gpu=bool(context.gpu_per_worker), resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=trial_folder_name(trial_id),
            storage_path=context.train_storage_path,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="final_score", checkpoint_score_order="max"
            ),
        ),
    )
    trainer.fit()
