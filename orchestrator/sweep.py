"""The sweep driver: Ray Tune runs the trials, Optuna (TPE, MMLU-constrained) proposes
them, ASHA stops weak ones early, MLflow records everything; afterwards the best eligible
checkpoint becomes the registered champion. Thin glue over search, trial and tracking."""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import logging
import os
import pickletools
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from unlearn_sweep.corpus.checkpoints import check_checkpoint
from unlearn_sweep.corpus.compat import local_storage_copies, ray_on_loopback
from unlearn_sweep.corpus.environment import environment
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.evaluation.eligibility import OBJECTIVE
from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
from unlearn_sweep.orchestrator import plots, tracking
from unlearn_sweep.orchestrator.config import STAGE_SELECTORS, ConfigError, SweepConfig
from unlearn_sweep.orchestrator.console import LiveView, library_messages_to
from unlearn_sweep.orchestrator.context import TRIAL_FOLDER_PREFIX, TrialContext, trial_folder_name
from unlearn_sweep.orchestrator.inputs import check_resume, check_unchanged, fingerprints, input_digests, record_start
from unlearn_sweep.orchestrator.lengths import check_lengths
from unlearn_sweep.orchestrator.nodes import check_nodes, check_store_reachable, worker_slots
from unlearn_sweep.orchestrator.plan import check_memory, plan_sweep, trains_zero3_in_tune_worker
from unlearn_sweep.orchestrator.retention import CheckpointRetention
from unlearn_sweep.orchestrator.search import make_searcher, merge_stage_searcher, search_algorithm, study_exists
from unlearn_sweep.orchestrator.selection import crown, merge_source_picks, select, trial_entries
from unlearn_sweep.orchestrator.stopping import handling, leave_closed_terminal, stop_signals
from unlearn_sweep.orchestrator.storage import check_scratch, check_storage, plan_storage
from unlearn_sweep.orchestrator.submission import configuration_key, submitted_setup
from unlearn_sweep.orchestrator.trial import decision_epochs, run_trial

log = logging.getLogger(__name__)
# A trial's objective is -inf until its first full evaluation (with staging, its first decision
# epoch): Tune's TensorBoard logger records every report and would warn at each of them.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
METRIC, MODE = OBJECTIVE, "max"  # what ASHA stops on, Optuna is told and Tune keeps checkpoints by
ASHA_MAX_T = 100  # epochs: above any method's
# A multi-worker trial only launches its Ray Train run, whose workers hold the resources, so it
# holds none of theirs (a token CPU share left workers that take every CPU of a node waiting
# forever); Tune refuses an empty request, hence one byte of Ray's memory resource.
TRIAL_DRIVER = {"cpu": 0, "memory": 1}


class SweepFailed(RuntimeError):
    """Every trial of a sweep failed: there is nothing to select."""


class SweepInterrupted(RuntimeError):
    """A stop signal stopped the sweep. The message says what was done; the command that ran it
    says how to go on: with --resume where its trials had started (`resumable`: Tune saved its
    state), else by starting it again."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


@dataclass
class SweepSummary:
    experiment: str
    parent_run_id: str
    mmlu_threshold: float | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per trial, best first
    champion: dict[str, Any] | None = None
    # one per configuration re-run on the held-out fold, best tuned score first: its tuned and
    # held-out scores and the optimism (tuned - held-out)
    confirmations: list[dict[str, Any]] = field(default_factory=list)


def _start_ray(config: SweepConfig, verbose: bool) -> None:
    """Ray for the sweep; unless verbose, its logging stays as the console quieting set it."""
    if ray.is_initialized():
        return
    if config.ray_address == "local":
        # Ray Train (multi-worker trials) needs the dashboard to clean up after early stops.
        with ray_on_loopback():  # a local instance serves this machine alone
            ray.init(
                address="local",
                include_dashboard=config.workers > 1,
                log_to_driver=False,
                configure_logging=verbose,
            )
    else:
        ray.init(address=config.ray_address, log_to_driver=False, configure_logging=verbose)


def _check_placeable(config: SweepConfig) -> None:
    """On a local Ray (no autoscaler to add nodes) a trial asking for more than any node has
    would wait forever: refuse it."""
    if config.ray_address != "local":
        return
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    unit = "trial worker" if config.workers > 1 else "trial"
    for name, need in (("CPU", config.resources_per_trial.cpu), ("GPU", config.resources_per_trial.gpu)):
        have = max((node.get(name, 0) for node in nodes), default=0)
        if need > have:
            raise ConfigError(
                config.source,
                f"a {unit} needs {need:g} {name}, and this machine's Ray has {have:g}: it could never start",
                field="resources_per_trial",
            )
    total = sum(node.get("CPU", 0) for node in nodes)
    if config.workers * config.resources_per_trial.cpu > total:
        raise ConfigError(
            config.source,
            f"{config.workers} workers x {config.resources_per_trial.cpu:g} CPU exceed this machine's {total:g} CPUs",
            field="resources_per_trial",
        )


def trial_resources(config: SweepConfig) -> dict[str, float]:
    """What Tune reserves for a trial's own process: a one-worker trial's resources, or, where
    the trial launches Ray Train workers that hold them, nothing they need."""
    if config.workers > 1:
        return dict(TRIAL_DRIVER)
    return {"cpu": config.resources_per_trial.cpu, "gpu": config.resources_per_trial.gpu}


def _max_concurrent(config: SweepConfig) -> int:
    """What the cluster holds: the scarcest resource decides (fractional GPUs pack)."""
    if config.max_concurrent_trials:
        return config.max_concurrent_trials
    return max(1, worker_slots({"CPU": 1, **ray.cluster_resources()}, config) // config.workers)


def _sweep_runs(mlflow, experiment: str, config: SweepConfig) -> list:
    """The parent runs recorded for a sweep of this name (one, where it has started)."""
    return mlflow.search_runs([experiment], filter_string=f"tags.sweep = '{config.name}' and tags.role = 'sweep'")


def _parent_run(
    mlflow, experiment: str, config: SweepConfig, resume: bool, inputs: dict[str, Any]
) -> tuple[str, float | None]:
    """The sweep's parent run (found again on resume) and the absolute MMLU threshold
    (`inputs`: inputs.fingerprints, checked where the base model is evaluated)."""
    runs = _sweep_runs(mlflow, experiment, config)
    if resume:
        if not runs:
            raise ConfigError(
                config.source,
                f"no sweep {config.name!r} in MLflow experiment {config.experiment!r} to resume",
                field="name",
            )
        run_id = runs[0].info.run_id
        _interrupt_open_trials(mlflow, experiment, run_id)  # nothing of the sweep runs now
        tracking.reopen_sweep(mlflow, runs[0])
        return run_id, tracking.recorded_threshold(runs[0])
    run = mlflow.create_run(experiment, run_name=config.name, tags={"sweep": config.name, "role": "sweep"})
    run_id = run.info.run_id
    try:
        return run_id, _threshold(mlflow, run_id, config, inputs)
    except KeyboardInterrupt:  # Ctrl-C in the base model's evaluation (minutes at 7B): no failure
        tracking.mark_interrupted(mlflow, run_id)
        raise SweepInterrupted(
            f"sweep {config.name!r} interrupted while it evaluated the base model, before its trials; "
            "no champion was registered",
            resumable=False,
        ) from None
    except BaseException:
        tracking.end_parent(mlflow, run_id, failed=True)
        raise


def _threshold(mlflow, run_id: str, config: SweepConfig, inputs: dict[str, Any]) -> float | None:
    """The absolute MMLU threshold, logged with the sweep's settings on its parent run."""
    threshold = None
    if config.mmlu_threshold is not None:
        base_mmlu = None
        if config.mmlu_threshold.relative:
            log.warning("evaluating the base model once for the relative MMLU threshold")
            # A Ray task holding one trial's resources: on a cluster a GPU worker scores it, not the
            # CPU-only head, and on one machine it takes a GPU only when Ray grants one.
            resources = {
                "num_cpus": config.resources_per_trial.cpu,
                "num_gpus": config.resources_per_trial.gpu,
            }
            base, node = ray.get(ray.remote(**resources)(_evaluate_base).remote(config, inputs))
            mlflow.set_tag(run_id, "base_evaluation_node", node)
            base_mmlu = base["mmlu_accuracy"]
            for name in tracking.SCORE_METRICS:
                if name in base:  # all but train_seconds
                    mlflow.log_metric(run_id, f"base_{name}", base[name])
        threshold = config.mmlu_threshold.absolute(base_mmlu)
    settings = {
        "methods": ",".join(config.methods),
        "trials": config.trials,
        "model": config.model,
        "mmlu_threshold": config.mmlu_threshold,
        "seed": config.seed,
    }
    tracking.record_sweep_settings(mlflow, run_id, settings, threshold, config.time_limit_s)
    if config.source.is_file():
        mlflow.log_artifact(run_id, str(config.source))
    return threshold


def _evaluate_base(config: SweepConfig, inputs: dict[str, Any]) -> tuple[dict, str]:
    """The base model's scores under the sweep's evaluation settings, and the Ray node that
    computed them (its inputs checked first: an autoscaler may have just added it)."""
    import torch

    check_unchanged(inputs, ray.util.get_node_ip_address())
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))
    sets = EvalSets.load(config.data, config.split, config.mia, config.mmlu, config.mmlu_shots)
    scores = evaluate_checkpoint(config.model, sets, config.eval)
    return scores, ray.get_runtime_context().get_node_id()


def run_sweep(config: SweepConfig, resume: bool = False, verbose: bool = False) -> SweepSummary:
    """Run (or resume) the sweep to the end and pick the champion. The console shows the live
    view (console.py), or with `verbose` Tune's own tables; a resumed sweep keeps the choice
    made at its start (Tune restores its run settings, callbacks not included)."""
    return Sweep(config, resume, verbose).run()


@dataclass(frozen=True)
class Stage:
    """One Tune run of a sweep: its search, then (optionally) its merge stage."""

    label: str  # as messages name it
    name: str  # the Tune experiment's, under the sweep's storage_path
    trials: int


def cut_state_file(experiment_path: str) -> str | None:
    """The first of the files a Tune experiment's folder holds for a resume (those Tune fetches
    back: `.json` and `.pkl`, beside the trial folders) that is cut short, or None (none, or no
    folder). The searcher's own file is left out: the Optuna study stands in for it
    (search.ConstrainedOptunaSearch.restore). Tune's files are JSON or pickles, so a file is
    whole if it parses as one or the other; Tune would read a cut one, fail, and quietly start
    the experiment over (its trials run again, the sweep's record then untrue)."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(experiment_path)
    searcher_state = re.compile(fnmatch.translate(Searcher.CKPT_FILE_TMPL.format("*")))
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.File or not info.base_name.endswith((".json", ".pkl")):
            continue
        if searcher_state.match(info.base_name):
            continue
        with filesystem.open_input_stream(info.path) as stream:
            if not _whole(stream.readall()):
                return info.path
    return None


def _whole(data: bytes) -> bool:
    """Whether data is a whole JSON document or a whole pickle (one that reaches its STOP)."""
    with contextlib.suppress(ValueError):
        json.loads(data)
        return True
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError:
        return False
    return True


def trial_folder(trial) -> str:
    """The folder of a Tune trial (Tune's `trial_dirname_creator`); `trial_id_of` reads it back."""
    return trial_folder_name(trial.trial_id)


def trial_id_of(result) -> str:
    """The Tune trial id of a result: in its metrics once it reported, else from its folder
    (a trial that failed before its first report has no metrics)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix(TRIAL_FOLDER_PREFIX)


class Sweep:
    """One sweep's driver: it holds the MLflow client, the parent run, the MMLU threshold and
    the trainable, runs each stage's Tuner, keeps MLflow in step with what Tune reports, and
    selects."""

    def __init__(self, config: SweepConfig, resume: bool = False, verbose: bool = False):
        self.config, self.resume, self.verbose = config, resume, verbose
        self.storage = config.storage_path.rstrip("/")
        self.search = Stage("its search", config.name, config.trials)
        self.merge = (
            Stage("its merge stage", config.merge_stage_name, config.merge_stage.trials) if config.merge_stage else None
        )
        self.confirmation_name = config.confirmation_name  # its trials are counted once the search has ended
        self.input_digests: dict[str, Any] = {}  # of config.trial_inputs, taken once the start's checks begin

    def _path(self, name: str) -> str:
        """Where the Tune experiment of that name (a stage's) lives."""
        return f"{self.storage}/{name}"

    def _refuse_a_bad_start(self) -> None:
        config = self.config
        try:
            check_checkpoint(config.model)  # weights present and whole, not found missing in every trial
        except DataError as error:
            raise ConfigError(config.source, str(error), field="model") from None
        # The data read once, whole, before Ray or MLflow is touched: a fault in it is one line
        # now, not the same error in every trial.
        EvalSets.load(config.data, config.split, config.mia, config.mmlu, config.mmlu_shots)
        longest = check_lengths(config, plan_sweep(config))  # a max_length that cuts the data is refused
        check_memory(config, plan_sweep(config, longest))  # trials that cannot fit their GPUs are refused
        exists = tune.Tuner.can_restore(self._path(self.search.name))
        if not self.resume and exists:
            raise self._refused(
                f"a sweep named {config.name!r} already exists in {config.storage_path}; resume it with --resume or "
                "choose another name"
            )
        if self.resume and not exists:
            raise self._refused(f"no sweep {config.name!r} in {config.storage_path} to resume")
        self.input_digests = input_digests(config.trial_inputs)
        if self.resume:
            check_resume(config, self.input_digests)  # the same settings and inputs as at its start
            self._refuse_a_cut_state()
        if not self.resume and study_exists(config):
            raise self._refused(
                f"an Optuna study named {config.name!r} already exists in {config.study_storage}; "
                "resume the sweep with --resume or choose another name"
            )

    def _refused(self, message: str) -> ConfigError:
        """The sweep's name refused (taken, or nothing to resume under it): the config's error."""
        return ConfigError(self.config.source, message, field="name")

    def _refuse_a_cut_state(self) -> None:
        """A resume whose Tune state is cut short is refused; the sweep's records then say it was
        interrupted (its killed driver left them RUNNING), as they would after a Ctrl-C."""
        config = self.config
        cut = next(filter(None, (cut_state_file(str(path)) for path in config.stage_folders)), None)
        if cut is None:
            return
        mlflow = tracking.client(config.tracking_uri)
        experiment = mlflow.get_experiment_by_name(config.experiment)
        for run in _sweep_runs(mlflow, experiment.experiment_id, config) if experiment else []:
            if run.info.status == "RUNNING":
                _mark_interrupted(mlflow, experiment.experiment_id, run.info.run_id, None)
        raise self._refused(
            f"sweep {config.name!r} cannot be resumed: Tune's state file {cut} is cut short (a driver killed "
            "while it was copied); its open runs are closed as interrupted; run the sweep again under another name"
        )

    def library_log(self) -> Path:
        """Where library notices go unless verbose: the sweep's folder."""
        return Path(self.storage) / self.config.name / "libraries.log"

    def run(self) -> SweepSummary:
        config = self.config
        self._refuse_a_bad_start()
        if self.verbose:
            return self._run()
        # The live view stands in for Tune's tables; its snapshot-frequency notice is noise there.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        log = self.library_log()
        created = not log.parent.exists()
        print(
            f"sweep {config.name!r}{' resumed' if self.resume else ''}: {config.trials} trials of "
            f"{', '.join(config.methods)} on {config.model}; library messages go to {log}",
            flush=True,
        )
        try:
            with library_messages_to(log):
                return self._run()
        except ConfigError:  # refused before anything ran (a trial that can never be placed)
            if created:
                shutil.rmtree(log.parent, ignore_errors=True)
            raise

    def _run(self) -> SweepSummary:
        config = self.config
        _start_ray(config, self.verbose)
        _check_placeable(config)  # before MLflow is touched: nothing is left behind by a bad config
        node_id, nodes = ray.get_runtime_context().get_node_id(), ray.nodes()
        check_store_reachable(config, node_id, nodes)
        plan, concurrent = plan_storage(config), _max_concurrent(config)
        check_storage(config, plan, concurrent)
        check_scratch(config, plan, check_nodes(config, nodes, self.input_digests), concurrent)
        if not self.resume:
            record_start(config, self.input_digests)
        self.mlflow = tracking.client(config.tracking_uri)
        self.experiment = tracking.experiment_id(self.mlflow, config.experiment)
        inputs = fingerprints(config.trial_inputs, self.input_digests)
        self.parent_run_id, self.threshold = _parent_run(self.mlflow, self.experiment, config, self.resume, inputs)
        self.context = context = TrialContext.for_sweep(
            config,
            self._path(self.search.name),
            self.experiment,
            self.parent_run_id,
            self.threshold,
            decision_epochs(config.asha, ASHA_MAX_T),
            inputs,
        )
        resources = trial_resources(config)
        self.trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
        if config.confirm is not None:
            confirming = context.confirming(config.confirm)
            self.confirm_trainable = tune.with_resources(tune.with_parameters(run_trial, context=confirming), resources)
        try:
            with local_storage_copies():  # Tune's state whole in storage_path whenever the driver is killed
                summary = self._run_stages()
        except (SweepInterrupted, SweepFailed):
            raise
        except BaseException:  # the driver itself failed: the record must not say running or finished
            _interrupt_open_trials(self.mlflow, self.experiment, self.parent_run_id)
            tracking.end_parent(self.mlflow, self.parent_run_id, failed=True)
            raise
        if context.source_cache:  # whole models no trial of this sweep will merge again (kept for --resume)
            shutil.rmtree(context.source_cache, ignore_errors=True)
        return summary

    def _run_stages(self) -> SweepSummary:
        config = self.config
        asha = asha_scheduler(config)
        grids = [self._fit(self.search, self._tuner(self.search, lambda: make_searcher(config), asha))]
        summary = SweepSummary(config.experiment, self.parent_run_id, self.threshold, rows=self._settled_rows(grids))
        if summary.rows and all(row["status"] == "failed" for row in summary.rows):
            tracking.end_parent(self.mlflow, self.parent_run_id, failed=True)
            error, count = Counter(row["error"] for row in summary.rows).most_common(1)[0]
            raise SweepFailed(
                f"all {len(summary.rows)} trials of sweep {config.name!r} failed; most common error ({count}x): {error}"
            )
        if self.merge is not None:
            tuner = self._merge_tuner(summary.rows)
            if tuner is not None:
                grids.append(self._fit(self.merge, tuner))
                summary.rows = self._settled_rows(grids)
        if config.confirm is not None:
            summary.confirmations = self._confirm(summary.rows, grids)
        _finish(config, summary, self.mlflow)
        return summary

    def _tuner(
        self,
        stage: Stage,
        searcher: Callable[[], Any],
        scheduler: Any = None,
        trainable: Any = None,
        param_space: dict[str, Any] | None = None,
    ) -> tune.Tuner:
        """The stage's Tuner: restored where a resumed sweep had started it, else new."""
        trainable = trainable or self.trainable
        if self.resume and tune.Tuner.can_restore(self._path(stage.name)):
            return tune.Tuner.restore(
                self._path(stage.name), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
            )
        concurrent = _max_concurrent(self.config)
        return tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=search_algorithm(self.config, searcher(), concurrent, stage.trials),
                num_samples=1 if param_space else stage.trials,  # a grid runs each of its points once
                trial_dirname_creator=trial_folder,
                scheduler=scheduler,
                max_concurrent_trials=concurrent,
                # A fresh worker per trial re-imports torch & co (~6 s); a ZeRO-3 run leaves its states in its worker.
                reuse_actors=not trains_zero3_in_tune_worker(self.config),
            ),
            run_config=tune.RunConfig(
                name=stage.name,
                storage_path=self.config.storage_path,
                verbose=1 if self.verbose else 0,
                callbacks=([] if self.verbose else [LiveView(stage.trials)]) + self._retention(stage),
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
                ),
            ),
        )

    def _retention(self, stage: Stage) -> list[CheckpointRetention]:
        """The stage's checkpoint retention, as a callback list: none for the confirmation (its
        runs are few, and re-run configurations) or where every checkpoint is kept."""
        config = self.config
        if stage.name == self.confirmation_name or config.checkpoints_kept is None:
            return []
        sources = config.merge_stage.sources if config.merge_stage and stage is self.search else ()
        merge_picks = tuple(source for source in sources if source in STAGE_SELECTORS)
        return [
            CheckpointRetention(
                stage.label,
                config.checkpoints_kept,
                merge_picks,
                (Path(self._path(stage.name)), Path(self.context.train_storage_path)),
                config.tracking_uri,
                self.experiment,
                self.parent_run_id,
            )
        ]

    def _merge_tuner(self, rows: list[dict[str, Any]]) -> tune.Tuner | None:
        """The merge stage's Tuner, or None where it cannot run (said on the parent run)."""
        if self.resume and tune.Tuner.can_restore(self._path(self.merge.name)):
            return self._tuner(self.merge, lambda: None)
        sources = _merge_stage_sources(self.config, rows)
        if isinstance(sources, str):
            log.warning("merge stage skipped: %s", sources)
            self.mlflow.set_tag(self.parent_run_id, "merge_stage", f"skipped: {sources}")
            return None
        models, runs = sources
        self.mlflow.set_tag(self.parent_run_id, "merge_stage", ",".join(models))
        return self._tuner(self.merge, lambda: merge_stage_searcher(self.config, models, runs))

    def _confirm(self, rows: list[dict[str, Any]], grids: list) -> list[dict[str, Any]]:
        """The confirmation stage: the best top_k distinct configurations of the search (and
        merge stage) run again from the base model on the held-out fold, each evaluated once,
        fully, at its last epoch. Returns them with their tuned and held-out scores."""
        results = {trial_id_of(result): result for grid in grids for result in grid}
        setups = confirmation_setups(rows, results, self.config.confirm.top_k)
        if not setups:
            log.warning("confirmation stage skipped: no eligible trial to confirm")
            self.mlflow.set_tag(self.parent_run_id, "confirm", "skipped: no eligible trial to confirm")
            return []
        stage = Stage("its confirmation stage", self.confirmation_name, len(setups))
        tuner = self._tuner(
            stage, lambda: None, trainable=self.confirm_trainable, param_space={"setup": tune.grid_search(setups)}
        )
        confirmed = {trial_id_of(result): result for result in self._fit(stage, tuner)}
        self._reconcile(confirmed, confirmations=True)
        runs = {row["run_id"]: row for row in rows}
        entries = {
            entry.trial_id: entry
            for entry in trial_entries(self.mlflow, self.experiment, self.parent_run_id)
            if entry.confirms is not None and entry.status != "interrupted"
        }
        confirmations = []
        for trial_id, result in confirmed.items():
            metrics, tuned = result.metrics or {}, runs[result.config["setup"][tracking.CONFIRMS]]
            held_out = metrics.get("final_score")
            optimism = None if held_out is None else tuned["final_score"] - held_out
            if optimism is not None and trial_id in entries:
                self.mlflow.log_metric(entries[trial_id].run_id, "optimism", optimism)
            confirmations.append(
                {
                    "trial_id": tuned["trial_id"],
                    "method": tuned["method"],
                    "run_id": entries[trial_id].run_id if trial_id in entries else None,
                    "tuned_final_score": tuned["final_score"],
                    "held_out_final_score": held_out,
                    "held_out_mmlu_accuracy": metrics.get("mmlu_accuracy"),
                    "held_out_eligible": bool(metrics.get("eligible")) and not result.error,
                    "train_seconds": metrics.get("train_seconds"),
                    "optimism": optimism,
                    "error": _error_line(result.error) if result.error else None,
                }
            )
        confirmations.sort(key=lambda row: -row["tuned_final_score"])
        measured = [row["optimism"] for row in confirmations if row["optimism"] is not None]
        if measured:
            self.mlflow.log_metric(self.parent_run_id, "optimism_mean", sum(measured) / len(measured))
        return confirmations

    def _fit(self, stage: Stage, tuner: tune.Tuner):
        """Run a stage's Tuner to its end; a stop before it (Ctrl-C, SIGTERM) is an interrupted sweep."""
        record = functools.partial(tracking.record_interrupt, self.mlflow, self.parent_run_id)
        with _recorded_interrupt(record) as interrupt:
            grid = tuner.fit()  # Tune stops gracefully on the interrupt, saving its state, and returns
        done = grid.num_terminated + grid.num_errors
        if done < stage.trials:
            _mark_interrupted(self.mlflow, self.experiment, self.parent_run_id, interrupt.at_ms)
            raise SweepInterrupted(
                f"sweep {self.config.name!r} interrupted after {done} of {stage.trials} trials of {stage.label}; no "
                "champion was registered"
            )
        return grid

    def _settled_rows(self, grids: list) -> list[dict[str, Any]]:
        results = {trial_id_of(result): result for grid in grids for result in grid}
        self._reconcile(results)
        return self._rows(results)

    def _reconcile(self, results: dict[str, Any], confirmations: bool = False) -> None:
        """Bring MLflow in step with what Tune reports: a trial that errored while its run still
        says running (its worker died) is marked failed; one Tune stopped at its last report,
        whose worker was killed before it closed its run, finished; runs of trials Tune no
        longer knows (started by a driver that died before recording them; Tune ran them again
        as new trials) are marked interrupted. Each finished trial's run is tagged with its
        best checkpoint. The search's trials and the confirmation runs are reconciled apart."""
        mlflow = self.mlflow
        latest = {
            entry.trial_id: entry
            for entry in trial_entries(mlflow, self.experiment, self.parent_run_id)
            if entry.status != "interrupted" and (entry.confirms is not None) == confirmations
        }
        for trial_id, result in results.items():
            entry = latest.get(trial_id)
            if entry is None:
                continue
            if result.error and entry.status == "running":
                mlflow.set_tag(entry.run_id, "error", _error_line(result.error))
                tracking.finish_trial(mlflow, entry.run_id, "failed")
            elif entry.status == "running":
                tracking.finish_trial(
                    mlflow,
                    entry.run_id,
                    "finished",
                    stopped_early=True,
                    end_time=tracking.last_report_time(mlflow, entry.run_id),
                )
            checkpoint = _best_checkpoint(result)
            if checkpoint and not result.error:
                mlflow.set_tag(entry.run_id, "checkpoint", checkpoint)
        for trial_id, entry in latest.items():
            if trial_id not in results:
                tracking.mark_interrupted(mlflow, entry.run_id)

    def _rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Per trial of the sweep, best first by the selection rule: its best eligible epoch's
        scores if it has one, else its last report."""
        entries = {
            entry.trial_id: entry
            for entry in trial_entries(self.mlflow, self.experiment, self.parent_run_id)
            if entry.trial_id in results and entry.status != "interrupted" and entry.confirms is None
        }
        order = {entry.trial_id: rank for rank, entry in enumerate(select(list(entries.values()), self.threshold))}
        rows = []
        for trial_id, result in results.items():
            entry, metrics = entries.get(trial_id), result.metrics or {}
            setup = (result.config or {}).get("setup", {})
            scores = entry.scores if trial_id in order else metrics
            rows.append(
                {
                    "trial_id": trial_id,
                    "method": setup.get("method"),
                    "params": setup.get("params", {}),
                    "status": "failed" if result.error else entry.status if entry else "finished",
                    "eligible": trial_id in order,
                    "error": _error_line(result.error) if result.error else None,
                    "epochs": metrics.get("training_iteration", 0),
                    "checkpoint": entry.checkpoint if trial_id in order and not entry.checkpoint_removed else None,
                    "best_epoch": int(entry.scores["epoch"]) if trial_id in order else None,
                    "run_id": entry.run_id if entry else None,
                    **{name: scores.get(name) for name in tracking.SCORE_METRICS},
                }
            )
        return sorted(
            rows,
            key=lambda r: (
                order.get(r["trial_id"], len(order)),
                -(r["final_score"] if r["final_score"] is not None else -1),
            ),
        )


def asha_scheduler(config: SweepConfig) -> ASHAScheduler | None:
    """The search's early stopping, or None (benchmarks/search_replay.py replays this one)."""
    if config.asha is None:
        return None
    return ASHAScheduler(
        metric=METRIC,
        mode=MODE,
        grace_period=config.asha.grace_period,
        reduction_factor=config.asha.reduction_factor,
        max_t=ASHA_MAX_T,
    )


def confirmation_setups(rows: list[dict[str, Any]], results: dict[str, Any], top_k: int) -> list[dict[str, Any]]:
    """The setups the confirmation stage runs: the best `top_k` distinct configurations among
    the eligible trials (rows, best first), each as a submission would run it: trained to the
    epoch its trial was selected at. Merge-stage trials merge checkpoints of the searched fold,
    not a configuration that could run elsewhere: they are not confirmed."""
    setups, seen = [], set()
    for row in rows:
        setup = (results[row["trial_id"]].config or {}).get("setup", {})
        if not row["eligible"] or setup.get("source_runs"):
            continue
        key = configuration_key(setup, row["best_epoch"])
        if key in seen:
            continue
        seen.add(key)
        setups.append({**submitted_setup(setup, row["best_epoch"]), tracking.CONFIRMS: row["run_id"]})
        if len(setups) == top_k:
            break
    return setups


def _merge_stage_sources(config: SweepConfig, rows: list[dict[str, Any]]) -> tuple[list[str], list[str]] | str:
    """(checkpoints, their runs) of the merge stage, or why it cannot run. The selectors pick
    among this sweep's eligible trials: the lowest forget mean (most forgetting) and the highest."""
    eligible = [row for row in rows if row["eligible"] and row.get("forget_mean") is not None]
    picks = merge_source_picks(eligible, lambda row: row["forget_mean"])
    models, runs = [], []
    for source in config.merge_stage.sources:
        if source not in picks:
            models.append(source)
            continue
        row = picks[source]
        if row is None:
            return f"no eligible trial to take {source} from"
        models.append(row["checkpoint"])
        runs.append(row["run_id"])
    if len(set(models)) < len(models):
        return "its sources are the same checkpoint (one eligible trial)"
    return models, runs


@dataclass
class Interrupt:
    at_ms: int | None = None  # when a stop signal reached the driver (ms since the epoch, as MLflow's times)


@contextlib.contextmanager
def _recorded_interrupt(on_interrupt: Callable[[int], None]) -> Iterator[Interrupt]:
    """Ctrl-C, SIGTERM and a hang-up (`stopping.stop_signals`) are recorded, told to `on_interrupt`
    (with the time, from a thread: the signal may arrive inside the call it would make), then
    handed to Tune's graceful stop, which also listens on SIGUSR1: Tune's own SIGINT handler is
    switched off (TUNE_DISABLE_SIGINT_HANDLER), since it would not say when the stop came. A
    second one stops at once, as Tune's second Ctrl-C does."""
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def tell_then_stop() -> None:
        try:
            on_interrupt(interrupt.at_ms)
        except Exception as error:  # the stop must not wait on a store that is down
            log.warning("could not record the interrupt: %s", error)
        finally:
            os.kill(os.getpid(), signal.SIGUSR1)

    telling = threading.Thread(target=tell_then_stop, daemon=True)

    def record(signum: int, frame: Any) -> None:
        leave_closed_terminal(signum)
        if interrupt.at_ms is not None:
            raise KeyboardInterrupt
        interrupt.at_ms = int(time.time() * 1000)
        telling.start()

    # Until Tune listens (and after it ran), SIGUSR1's default would end the process.
    with handling(stop_signals(), record), handling([signal.SIGUSR1], signal.SIG_IGN):
        try:
            with environment(TUNE_DISABLE_SIGINT_HANDLER="1"):
                yield interrupt
        finally:
            if telling.is_alive():
                telling.join(timeout=60)  # the interrupt is on record before its trials are marked


def _interrupt_open_trials(mlflow, experiment: str, parent_run_id: str, at_ms: int | None = None) -> None:
    """Trial runs that no longer run and say otherwise end KILLED, tagged interrupted: one still
    RUNNING; one open at the interrupt `at_ms`, however it closed itself (Tune's graceful stop
    looks like a scheduler's early stop from inside a trial); one tagged interrupted but not
    KILLED (an older version's Ctrl-C)."""
    for run in tracking.trial_runs(mlflow, experiment, parent_run_id):
        info = run.info
        if (
            info.status == "RUNNING"
            or (at_ms is not None and tracking.open_at(info, at_ms))
            or (run.data.tags.get("status") == "interrupted" and info.status != "KILLED")
        ):
            tracking.mark_interrupted(mlflow, info.run_id)


def _mark_interrupted(mlflow, experiment: str, parent_run_id: str, at_ms: int | None) -> None:
    """Trial runs the interrupt at `at_ms` stopped, and the parent, end KILLED: nothing is left
    RUNNING or FINISHED that did not finish."""
    _interrupt_open_trials(mlflow, experiment, parent_run_id, at_ms)
    mlflow.set_tag(parent_run_id, "status", "interrupted")
    mlflow.set_terminated(parent_run_id, "KILLED")


def _error_line(error: BaseException) -> str:
    """A trial error's root cause as one line ('FloatingPointError: loss became nan ...'):
    Tune wraps it in Ray's task errors, whose text ends with the original exception."""
    causes = [
        line.strip()
        for line in str(error).splitlines()
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b[^:]*:", line.strip())
    ]
    return causes[-1] if causes else type(error).__name__


def _best_checkpoint(result) -> str | None:
    """The trial's best checkpoint folder: Tune's own, or (multi-worker trials) the Ray Train
    checkpoint whose path TuneReportCallback put in the metrics."""
    if result.best_checkpoints:
        return result.get_best_checkpoint(METRIC, MODE).path
    history = result.metrics_dataframe
    if history is None or "checkpoint_path" not in history:
        return None
    saved = history[history["checkpoint_path"].notna()]
    return None if saved.empty else saved.loc[saved[METRIC].idxmax(), "checkpoint_path"]


def _finish(config: SweepConfig, summary: SweepSummary, mlflow) -> None:
    """Champion registration (by the selection rule, over the experiment), plots and the
    leaderboard on the parent run."""
    experiment = mlflow.get_run(summary.parent_run_id).info.experiment_id
    crowned = crown(
        mlflow, config.tracking_uri, config.experiment, experiment, summary.mmlu_threshold, config.select_by
    )
    mlflow.set_tag(summary.parent_run_id, tracking.SELECTED_BY, config.select_by)
    if crowned:
        entry, version = crowned
        summary.champion = {
            "trial_id": entry.trial_id,
            "method": entry.method,
            "run_id": entry.run_id,
            "checkpoint": entry.checkpoint,
            "model_version": version,
            "from_this_sweep": entry.run_id in {row["run_id"] for row in summary.rows},
            **entry.scores,
            "held_out": entry.held_out,  # its confirmation's scores, where selected by them
        }
        mlflow.log_metric(summary.parent_run_id, "best_final_score", entry.scores["final_score"])
        if entry.held_out:
            mlflow.log_metric(summary.parent_run_id, "best_held_out_final_score", entry.held_out["final_score"])
    finished = [r for r in summary.rows if r["status"] == "finished" and r["final_score"] is not None]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "leaderboard.json").write_text(json.dumps(summary.rows, indent=2, default=str) + "\n")
        if summary.confirmations:
            (folder / "confirmations.json").write_text(json.dumps(summary.confirmations, indent=2) + "\n")
        plots.score_vs_mmlu(finished, summary.mmlu_threshold, folder / "final_score_vs_mmlu.png")
        plots.optuna_plots(optuna.load_study(study_name=config.name, storage=config.study_storage), folder)
        if summary.champion:
            scores = json.loads((Path(summary.champion["checkpoint"]) / "scores.json").read_text())
            plots.aggregate_terms(scores, folder / "champion_aggregate_terms.png")
        mlflow.log_artifacts(summary.parent_run_id, str(folder), "sweep")
    tracking.end_parent(mlflow, summary.parent_run_id)
