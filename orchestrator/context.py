"""Everything a trial needs besides its sampled configuration, built once per sweep from the
config and passed, frozen, to the trainable, its workers and the per-epoch hook (Ray pickles it
to each of them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unlearn_sweep.evaluation.eligibility import Limits
from unlearn_sweep.evaluation.evaluator import EvalSets
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.orchestrator.config import Confirm, SweepConfig
from unlearn_sweep.orchestrator.inputs import Digests
from unlearn_sweep.orchestrator.search import load_space, sources_can_recur

TRIAL_FOLDER_PREFIX = "trial_"
# What a multi-worker trial trains under unless its space says otherwise: several ranks train only
# under DeepSpeed. Recorded in its trial_config.json, so an exported submission runs the same.
MULTI_WORKER_DEFAULTS = {"zero_stage": 2}


def trial_folder_name(trial_id: str) -> str:
    """A trial's folder in its stage's Tune experiment, and the name of a multi-worker trial's Ray
    Train run (its folder in `train_storage_path`)."""
    return f"{TRIAL_FOLDER_PREFIX}{trial_id}"


@dataclass(frozen=True)
class TrialContext:
    model: str  # the base model every trial starts from
    data: str
    split: str | None
    mia: str
    mmlu: str
    tracking_uri: str
    eval: EvalOptions = EvalOptions()
    held_out: str | None = None  # documents never seen nor scored (methods that calibrate on them)
    mmlu_shots: int | None = None
    mmlu_threshold: float | None = None  # absolute, resolved once per sweep
    time_limit_s: float | None = None  # unlearning wall time of one run, evaluation excluded
    decision_epochs: tuple[int, ...] = ()  # where a staged trial's full evaluation is due (ASHA's rungs)
    experiment_id: str = ""
    parent_run_id: str = ""
    threads: int = 1  # torch threads of a trial's process: one per CPU it holds
    workers: int = 1  # Ray Train workers per trial (DeepSpeed when more than one)
    cpu_per_worker: float = 1
    gpu_per_worker: float = 0
    train_storage_path: str = ""  # where a multi-worker trial's Ray Train run keeps its state
    # Merge sources trained once per configuration; None: sources that cannot recur.
    source_cache: str | None = None
    final_epoch_only: bool = False  # a confirmation run: only its last epoch is evaluated, as a submission's
    # by field, each input's path and its files' digests at the sweep's start: checked by every trial
    inputs: dict[str, tuple[str, Digests | None]] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_sweep(
        cls,
        config: SweepConfig,
        experiment_path: str,
        experiment_id: str,
        parent_run_id: str,
        threshold: float | None,
        decision_epochs: list[int],
        inputs: dict[str, tuple[str, Digests | None]] | None = None,
    ) -> TrialContext:
        """`inputs`: config.trial_inputs with their digests (inputs.fingerprints), checked in every trial."""
        resources = config.resources_per_trial
        return cls(
            model=str(config.model),
            data=str(config.data),
            split=config.split,
            mia=str(config.mia),
            mmlu=str(config.mmlu),
            tracking_uri=config.tracking_uri,
            eval=config.eval,
            held_out=None if config.held_out is None else str(config.held_out),
            mmlu_shots=config.mmlu_shots,
            mmlu_threshold=threshold,
            time_limit_s=config.time_limit_s,
            decision_epochs=tuple(decision_epochs),
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            threads=max(1, int(resources.cpu)),
            workers=config.workers,
            cpu_per_worker=resources.cpu,
            gpu_per_worker=resources.gpu,
            train_storage_path=f"{experiment_path}/train",
            source_cache=f"{experiment_path}/sources" if caches_sources(config) else None,
            inputs=inputs or {},
        )

    def confirming(self, confirm: Confirm) -> TrialContext:
        """The context of a confirmation run: the held-out fold, its MIA set (and held-out
        documents), every run evaluated once, fully, at its last epoch."""
        return dataclasses.replace(
            self,
            split=confirm.split,
            mia=str(confirm.mia),
            held_out=None if confirm.held_out is None else str(confirm.held_out),
            eval=dataclasses.replace(self.eval, screen=False),
            decision_epochs=(),
            final_epoch_only=True,
        )

    @property
    def limits(self) -> Limits:
        return Limits(self.mmlu_threshold, self.time_limit_s)

    def eval_sets(self) -> EvalSets:
        """The sets every epoch is scored on."""
        return EvalSets.load(self.data, self.split, self.mia, self.mmlu, self.mmlu_shots)


def caches_sources(config: SweepConfig) -> bool:
    """A merge search keeps its trained sources to reuse where a source can be drawn again; the
    sweep deletes them when it completes."""
    return "merge" in config.methods and sources_can_recur(
        load_space("merge", config.search_space_overrides.get("merge"))
    )
