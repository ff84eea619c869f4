"""Eligibility and the objective: the one home of the rules a submission must meet.

A checkpoint is eligible (can be a submission) when its MMLU is at least the threshold,
absolute (0.371) or a fraction of the base model's (0.75x), resolved to a number once per
sweep and passed as a number from then on, and, where the sweep sets `time_limit_s`, when its
unlearning took at most that long (SemEval discarded submissions over their time limit):
training wall time up to that epoch, evaluation excluded.

The one number a sweep optimises and selects by is a trial's best eligible final score so
far. ASHA stops trials on it, Optuna is told it (with the constraints of the epoch it came
from: each limit's slack, <= 0 where met), and Tune keeps the checkpoint it names. An
ineligible epoch (it can never be the submission) reports a penalised value below every
eligible score, -1 - its largest slack (MMLU: threshold - MMLU), so that among trials that
never became eligible the one that came closest still ranks first."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MmluThreshold:
    """The minimum MMLU for a checkpoint to rank: absolute, or a fraction of the base model's."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> MmluThreshold:
        """'0.371' is absolute; '0.75x' means 0.75 times the base model's MMLU."""
        match = re.fullmatch(r"\s*(\d*\.?\d+)\s*(x?)\s*", text)
        if not match or not 0 <= float(match.group(1)) <= 1:
            raise ValueError(
                f"MMLU threshold {text!r}: expected a number in [0, 1], optionally followed by 'x' (fraction of "
                "the base model's MMLU)"
            )
        return cls(float(match.group(1)), relative=bool(match.group(2)))

    def absolute(self, base_mmlu: float | None) -> float:
        if not self.relative:
            return self.value
        if base_mmlu is None:
            raise ValueError("a relative MMLU threshold needs the base model's MMLU")
        if not (math.isfinite(base_mmlu) and 0 <= base_mmlu <= 1):
            raise ValueError(f"the base model's MMLU {base_mmlu}: expected an accuracy in [0, 1]")
        return self.value * base_mmlu


def is_eligible(mmlu: float | None, threshold: float | None) -> bool | None:
    """Eligible to rank: no threshold, or MMLU measured and at least the threshold (None: not measured)."""
    if threshold is None:
        return True
    if mmlu is None:
        return None
    return mmlu >= threshold


def meets_all(mmlu: float, *thresholds: float | None) -> bool:
    """Eligible under every threshold given (a sweep's own, and a stricter one asked for later)."""
    return all(is_eligible(mmlu, threshold) for threshold in thresholds)


def mmlu_slack(mmlu: float, threshold: float | None) -> float:
    """How far MMLU is below the threshold: <= 0 exactly where the epoch meets it (Optuna's constraint)."""
    return (threshold or 0.0) - mmlu


@dataclass(frozen=True)
class Limits:
    """What an epoch must meet to be a submission."""

    mmlu_threshold: float | None = None  # absolute
    time_limit_s: float | None = None  # unlearning wall time, evaluation excluded

    def slacks(self, scores: dict[str, Any]) -> dict[str, float]:
        """Each limit's slack, <= 0 where it is met: MMLU below the threshold, and the training
        seconds over the time limit as a fraction of it (-1 without a limit)."""
        seconds = scores.get("train_seconds")
        over = -1.0 if self.time_limit_s is None or seconds is None else seconds / self.time_limit_s - 1
        return {"mmlu_slack": mmlu_slack(scores["mmlu_accuracy"], self.mmlu_threshold), "time_slack": over}

    def slack(self, scores: dict[str, Any]) -> float:
        return max(self.slacks(scores).values())

    def eligible(self, scores: dict[str, Any]) -> bool:
        return self.slack(scores) <= 0


OBJECTIVE = "objective"
INELIGIBLE_BELOW = -1.0  # eligible objectives are final scores in [0, 1]; ineligible ones lie below -1


def epoch_objective(final_score: float, slack: float) -> float:
    """One epoch's value; slack = the largest of its limits' slacks (<= 0: eligible)."""
    return final_score if slack <= 0 else INELIGIBLE_BELOW - slack


UNKNOWN_SLACKS = {"mmlu_slack": math.inf, "time_slack": math.inf}


@dataclass
class TrialObjective:
    """The running best over a trial's epochs, the epoch it came from and its slacks."""

    value: float = -math.inf
    slacks: dict[str, float] = field(default_factory=lambda: dict(UNKNOWN_SLACKS))
    epoch: int = 0

    def update(self, epoch: int, final_score: float, slacks: dict[str, float]) -> bool:
        """Take this epoch into account; True when it is the trial's new best."""
        value = epoch_objective(final_score, max(slacks.values()))
        if value <= self.value:
            return False
        self.value, self.slacks, self.epoch = value, dict(slacks), epoch
        return True

    def metrics(self) -> dict[str, Any]:
        """What every report carries, beside the epoch's own scores."""
        slacks = {f"objective_{name}": value for name, value in self.slacks.items()}
        return {OBJECTIVE: self.value, **slacks, "objective_epoch": self.epoch}


def objective_is_eligible(value: float) -> bool:
    """Whether a reported objective came from an eligible epoch."""
    return value > INELIGIBLE_BELOW
