"""Staged evaluation: each epoch is first screened on a fixed, stratified subset of the
evaluation sets; the rest is scored only when the epoch could become the trial's best
eligible checkpoint.

The subset takes the same fraction of every stratum (split x task x row kind, MIA members and
nonmembers, MMLU subject), at least one item each, chosen once per sweep by a seeded draw, so
that every epoch of every trial is screened on the same items. An epoch goes on to the full
evaluation unless its screened final score is more than `margin` below the trial's best
eligible score so far, or its MMLU is confidently below the threshold: the one-sided
Clopper-Pearson upper bound of the subset's accuracy (at `confidence`) is under it. The full
evaluation scores the whole sets again in one pass (in bfloat16 a row's numbers depend on its
batch; the saved checkpoint must re-evaluate to its logged score), so an epoch that goes on
costs its screen on top."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import beta
from unlearn_sweep.evaluation.evaluator import EvalSets


def _stratified(
    items: Sequence[Any], stratum: Callable[[Any], Hashable], fraction: float, rng: random.Random
) -> list[int]:
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(stratum(item), []).append(index)
    chosen = []
    for key in sorted(groups, key=str):
        members = groups[key]
        chosen += rng.sample(members, max(1, math.ceil(fraction * len(members))))
    return sorted(chosen)


@dataclass(frozen=True)
class Split:
    """Indices of the screened subset in each of the three sets."""

    rows: list[int]
    mia: list[int]
    mmlu: list[int]

    @classmethod
    def draw(cls, sets: EvalSets, fraction: float) -> Split:
        rng = random.Random(0)  # one fixed draw: every trial of every sweep on these sets screens the same items
        return cls(
            _stratified(sets.rows, lambda row: (row.split, row.task, row.kind), fraction, rng),
            _stratified(sets.mia or [], lambda doc: doc.membership, fraction, rng),
            _stratified(sets.mmlu or [], lambda question: question.subject, fraction, rng),
        )

    def screened(self, sets: EvalSets) -> EvalSets:
        return _select(sets, self.rows, self.mia, self.mmlu)


def _select(sets: EvalSets, rows: list[int], mia: list[int], mmlu: list[int]) -> EvalSets:
    return EvalSets(
        [sets.rows[i] for i in rows],
        [sets.mia[i] for i in mia] if sets.mia else sets.mia,
        [sets.mmlu[i] for i in mmlu] if sets.mmlu else sets.mmlu,
        sets.mmlu_shots,
        sets.shots,
    )


def mmlu_upper_bound(correct: int, total: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound of an accuracy seen as correct / total."""
    return 1.0 if correct >= total else float(beta.ppf(confidence, correct + 1, total - correct))


def needs_full_evaluation(
    screened: dict,
    best_eligible: float | None,
    threshold: float | None,
    margin: float,
    confidence: float,
    mmlu_records: list[dict],
) -> bool:
    """Whether a screened epoch could still become the trial's best eligible checkpoint."""
    if threshold is not None and mmlu_records:
        correct = sum(record["answer"] == record["predicted"] for record in mmlu_records)
        if mmlu_upper_bound(correct, len(mmlu_records), confidence) < threshold:
            return False  # confidently below the threshold: never eligible
    final = screened.get("final_score")
    return best_eligible is None or final is None or final >= best_eligible - margin
