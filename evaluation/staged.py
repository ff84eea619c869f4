"""Staged evaluation as decisions over one trial's epochs: which screened epochs to hold on
disk, which epochs to evaluate fully and when, and which becomes the trial's best eligible one
(screening.py says what a screen is and when an epoch is a candidate).

With staging, the full evaluation is deferred to the epochs where it decides something: the
trial's last epoch and ASHA's rungs (`decision_epochs`). In between, each epoch is screened,
and the best screened ones that could become the trial's best are held (`screen_hold` of them:
within the margin the screen's order is noise); a decision epoch fully evaluates those held and
itself where it is a candidate. A trial that improves every epoch pays its full evaluations at
the decisions only, not at every epoch. Without staging every epoch is fully evaluated.

No MLflow, Tune or ranks here: the caller computes the records (on however many ranks), then
logs, saves and reports what `conclude` returns."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_sweep.corpus.scratch import temporary_folder
from unlearn_sweep.evaluation.eligibility import Limits, TrialObjective, epoch_objective, objective_is_eligible
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.evaluation.screening import needs_full_evaluation


@dataclass
class Held:
    """A screened epoch that could become the trial's best, kept on disk until the next
    decision epoch fully evaluates it, unless a better screened epoch replaces it first."""

    epoch: int
    folder: Path
    screened: dict[str, Any]  # its screened scores
    value: float  # their objective


@dataclass(frozen=True)
class Evaluated:
    """An epoch's full evaluation."""

    epoch: int
    folder: Path
    records: dict[str, list[dict]]
    scores: dict[str, Any]


@dataclass
class EpochOutcome:
    own: dict[str, Any]  # this epoch's scores: its full evaluation where it had one, else its screen
    improved: bool  # the trial's objective moved
    best: Evaluated | None = None  # a fully evaluated epoch that became the trial's best eligible one: keep it
    to_log: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (epoch, scores), once each


class StagedEvaluation:
    """One trial's evaluation decisions, epoch by epoch: `plan` after the screen (staged only),
    then `conclude` with the full evaluations of the epochs `plan` named, then, once the saved
    best was handed on, `discard_evaluated`."""

    def __init__(self, options: EvalOptions, limits: Limits, decision_epochs: tuple[int, ...] = ()):
        self.options, self.limits, self.decisions = options, limits, set(decision_epochs)
        self.objective = TrialObjective()
        self.held: list[Held] = []  # best screened first
        self._holding = temporary_folder("held-epoch-") if options.screen else None
        self._held_before: list[Held] = []
        self._screen_candidate = True

    def _value(self, scores: dict[str, Any]) -> float:
        return epoch_objective(scores["final_score"], self.limits.slack(scores))

    def plan(
        self, epoch: int, checkpoint: Path, screened: dict[str, Any], mmlu_records: list[dict], last: bool
    ) -> list[tuple[int, Path]]:
        """After this epoch's screen: hold it where it could become the trial's best (moving its
        checkpoint into the holding folder); the epochs to evaluate fully now, this one first."""
        self._held_before = list(self.held)
        best = self.objective.value if objective_is_eligible(self.objective.value) else None
        options = self.options
        # past the time limit no later epoch can be eligible either: its screen is what it reports
        in_time = self.limits.slacks(screened)["time_slack"] <= 0
        self._screen_candidate = in_time and needs_full_evaluation(
            screened, best, self.limits.mmlu_threshold, options.screen_margin, options.screen_confidence, mmlu_records
        )
        if self._screen_candidate:
            value = self._value(screened)
            if len(self.held) < options.screen_hold or value > self.held[-1].value:
                folder = Path(self._holding.name) / f"epoch-{epoch}"
                shutil.move(checkpoint, folder)  # a rename: the engine's staging folder is on the same disk
                self.held = sorted([*self.held, Held(epoch, folder, screened, value)], key=lambda held: -held.value)
                for dropped in self.held[options.screen_hold :]:
                    shutil.rmtree(dropped.folder)
                self.held = self.held[: options.screen_hold]
        if not (last or epoch in self.decisions):
            return []
        # The epochs held, and this one where it is a candidate, held or not: within the
        # margin, the screen's order is not to be trusted.
        folders = {held.epoch: held.folder for held in self.held}
        targets = [(epoch, folders.pop(epoch, checkpoint))] if self._screen_candidate else []
        return targets + list(folders.items())

    def conclude(self, epoch: int, screened: dict[str, Any] | None, evaluated: list[Evaluated]) -> EpochOutcome:
        """This epoch's outcome from its screen (None without staging) and the full evaluations
        of the epochs `plan` named (without staging: this epoch's)."""
        evaluated = sorted(evaluated, key=lambda entry: entry.epoch)
        full = {entry.epoch: entry for entry in evaluated}
        own = full[epoch].scores if epoch in full else screened
        to_log = []
        # Each epoch's scores are logged once, at its step: a held epoch's when it is fully
        # evaluated (its full scores) or replaced by a better one (its screen).
        for dropped in self._held_before:
            if dropped not in self.held and dropped.epoch not in full:
                to_log.append((dropped.epoch, dropped.screened))
        if not any(held.epoch == epoch for held in self.held) or epoch in full:
            to_log.append((epoch, own))
        to_log += [(entry.epoch, entry.scores) for entry in evaluated if entry.epoch != epoch]
        to_log.sort(key=lambda logged: logged[0])  # a run's history in epoch order
        # A candidate's screen does not move the objective: it counts once fully evaluated.
        improved = screened is not None and not self._screen_candidate and self._update(epoch, screened)
        best = None
        for entry in evaluated:
            if self._update(entry.epoch, entry.scores):
                improved, best = True, entry
        self._held_before, self._screen_candidate = [], True
        # The checkpoint kept is the epoch the objective names: the trial's best eligible one, fully evaluated.
        return EpochOutcome(own, improved, best if best is not None and best.scores["eligible"] else None, to_log)

    def _update(self, epoch: int, scores: dict[str, Any]) -> bool:
        return self.objective.update(epoch, scores["final_score"], self.limits.slacks(scores))

    def discard_evaluated(self) -> None:
        """After a decision epoch's report (Tune copied the checkpoint kept): the held epochs are
        fully evaluated now, kept or not the best; their folders go."""
        for held in self.held:
            shutil.rmtree(held.folder)
        self.held = []
