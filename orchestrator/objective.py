"""The one number a sweep optimises and selects by: a trial's best eligible final score so far.

ASHA stops trials on it, Optuna is told it (with the MMLU constraint of the epoch it came
from), and Tune keeps the checkpoint it names. An epoch whose MMLU is below the threshold
(ineligible: it can never be the submission) reports a penalised value below every eligible
score, -1 - (threshold - MMLU), so that among trials that never became eligible the one whose
MMLU came closest still ranks first."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

OBJECTIVE = "objective"
INELIGIBLE_BELOW = -1.0  # eligible objectives are final scores in [0, 1]; ineligible ones lie below -1


def epoch_objective(final_score: float, mmlu_slack: float) -> float:
    """One epoch's value; mmlu_slack = threshold - MMLU (<= 0: eligible)."""
    return final_score if mmlu_slack <= 0 else INELIGIBLE_BELOW - mmlu_slack


@dataclass
class TrialObjective:
    """The running best over a trial's epochs, and the epoch it came from."""

    value: float = -math.inf
    mmlu_slack: float = math.inf
    epoch: int = 0

    def update(self, epoch: int, final_score: float, mmlu_slack: float) -> bool:
        """Take this epoch into account; True when it is the trial's new best."""
        value = epoch_objective(final_score, mmlu_slack)
        if value <= self.value:
            return False
        self.value, self.mmlu_slack, self.epoch = value, mmlu_slack, epoch
        return True

    def metrics(self) -> dict[str, Any]:
        """What every report carries, beside the epoch's own scores."""
        return {OBJECTIVE: self.value, "objective_mmlu_slack": self.mmlu_slack, "objective_epoch": self.epoch}
