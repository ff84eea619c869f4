"""Which ended trials keep their checkpoints on the sweep's storage; the others' are removed as
trials end.

Each trial keeps its best eligible epoch's checkpoint, a whole model: 27 GiB for OLMo-2 7B
saved in float32, so 100 trials would fill 2.7 TiB of shared storage. Few of them can still
matter once their trial has ended: the champion is the best eligible trial by tuned score or,
chosen by held-out score, one of the confirmation's `top_k` best distinct configurations; the
merge stage merges the most and the least forgetting eligible trials. A stage therefore keeps
the checkpoints of the trials holding its `keep_checkpoints` best distinct configurations (at
least the confirmation's `top_k`) and of the merge stage's picks, and removes the others as
soon as their trials end. A trial once out of that set never comes back into it: the trials it
is ranked among only grow, and a minimum only falls. Running trials are never touched, nor
those Tune may still resume. A run whose checkpoint was removed is tagged `checkpoint_removed`
with the reason; it still ranks in leaderboards, but it can no longer be registered."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from unlearn_sweep.evaluation.eligibility import OBJECTIVE, objective_is_eligible
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.context import trial_folder_name
from unlearn_sweep.orchestrator.selection import merge_source_picks
from unlearn_sweep.orchestrator.submission import configuration_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndedTrial:
    """An ended trial as retention ranks it."""

    trial_id: str
    objective: float | None  # the best over its epochs (eligible: that epoch's final score); None: no report
    configuration: str  # the configuration it submits (configuration_key): one trial per distinct one counts
    forget_mean: float | None  # its saved checkpoint's, which the merge stage's picks go by
    failed: bool

    @property
    def eligible(self) -> bool:
        return not self.failed and self.objective is not None and objective_is_eligible(self.objective)


def kept_trials(trials: Iterable[EndedTrial], best: int, merge_picks: tuple[str, ...]) -> set[str]:
    """The ended trials whose checkpoints are kept: those holding the `best` best distinct
    configurations (ranked by objective, ties by trial id, as `selection.select` ranks them), and
    those the merge stage's selectors in `merge_picks` would pick now."""
    ranked = sorted((trial for trial in trials if trial.eligible), key=lambda t: (-t.objective, t.trial_id))
    kept, configurations = set(), set()
    for trial in ranked:
        if len(configurations) == best:
            break
        if trial.configuration not in configurations:
            configurations.add(trial.configuration)
            kept.add(trial.trial_id)
    if merge_picks:
        scored = [trial for trial in ranked if trial.forget_mean is not None]
        picks = merge_source_picks(scored, lambda trial: trial.forget_mean)
        kept |= {picks[selector].trial_id for selector in merge_picks if picks[selector] is not None}
    return kept


class CheckpointRetention(tune.Callback):
    """A Tune callback of one stage: each time a trial ends (completes, is stopped early or
    fails), the checkpoints of the stage's ended trials outside `kept_trials` are removed from
    storage and their runs tagged. Tune pickles it with the stage's run config; a resumed
    stage's copy finds what is left from the trials Tune hands it."""

    def __init__(
        self,
        label: str,
        best: int,
        merge_picks: tuple[str, ...],  # the merge stage's selectors (config.STAGE_SELECTORS) it names
        folders: tuple[Path, ...],
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
    ):
        # folders: where the stage's trials keep checkpoints (each trial in trial_folder_name(id) there):
        # the stage's Tune experiment, and the Ray Train runs of multi-worker trials
        self.label, self.best, self.merge_picks, self.folders = label, best, merge_picks, folders
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self._ended: dict[str, EndedTrial] = {}
        self._removed: set[str] = set()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._retain(trials, trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._retain(trials, trial, failed=True)

    def _retain(self, trials: list[Trial], ending: Trial, failed: bool) -> None:
        try:
            self._remove_unkept(trials, ending, failed)
        except Exception as error:  # storage or store trouble must not stop the sweep: what is left stays
            log.warning("checkpoint retention skipped after trial %s ended: %s", ending.trial_id, error)

    def _remove_unkept(self, trials: list[Trial], ending: Trial, failed: bool) -> None:
        # The ending trial's status changes after the callbacks; Tune runs the others again
        # unless they ended (TERMINATED) or failed (ERROR: a sweep never retries them).
        for trial in trials:
            if trial.trial_id in self._ended:
                continue
            if trial is ending:
                self._ended[trial.trial_id] = self._describe(trial, failed)
            elif trial.status in (Trial.TERMINATED, Trial.ERROR):
                self._ended[trial.trial_id] = self._describe(trial, trial.status == Trial.ERROR)
        kept = kept_trials(self._ended.values(), self.best, self.merge_picks)
        for trial_id, trial in self._ended.items():
            if trial_id not in kept and trial_id not in self._removed:
                self._remove(trial)

    def _describe(self, trial: Trial, failed: bool) -> EndedTrial:
        result = trial.last_result or {}
        objective = result.get(OBJECTIVE)
        ended = EndedTrial(
            trial.trial_id,
            objective,
            configuration_key(trial.config["setup"], int(result.get("objective_epoch", 0))),
            None,
            failed,
        )
        saved = self._checkpoints(trial.trial_id) if self.merge_picks and ended.eligible else []
        if not saved:
            return ended
        return dataclasses.replace(ended, forget_mean=json.loads((saved[0] / "scores.json").read_text())["forget_mean"])

    def _checkpoints(self, trial_id: str) -> list[Path]:
        """The trial's saved checkpoints: the folders in its own that hold a scores.json."""
        return sorted(
            scores.parent
            for folder in self.folders
            for scores in (folder / trial_folder_name(trial_id)).glob("*/scores.json")
        )

    def _remove(self, trial: EndedTrial) -> None:
        why = (
            "its trial failed"
            if trial.failed
            else f"not among the {self.best} best configurations of {self.label} (keep_checkpoints)"
        )
        checkpoints = self._checkpoints(trial.trial_id)
        if checkpoints:  # none: it never saved one (never eligible), or an earlier driver removed it
            # Said first: should the store fail, nothing is removed, and the next trial's end tries again.
            mlflow = tracking.client(self.tracking_uri)
            for run in tracking.trial_runs(mlflow, self.experiment_id, self.parent_run_id, trial.trial_id):
                mlflow.set_tag(run.info.run_id, tracking.CHECKPOINT_REMOVED, why)
            for checkpoint in checkpoints:
                shutil.rmtree(checkpoint)
        self._removed.add(trial.trial_id)
