"""Staged evaluation: a fixed stratified subset screens each epoch; the full evaluation runs
only where the epoch could become the trial's best eligible checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_sweep import trial_context
from transformers import AutoConfig, AutoModelForCausalLM
from unlearn_sweep.evaluation.eligibility import Limits
from unlearn_sweep.evaluation.evaluator import EvalSets
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.evaluation.screening import Split, mmlu_upper_bound, needs_full_evaluation
from unlearn_sweep.evaluation.staged import Evaluated, StagedEvaluation
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.context import TrialContext
from unlearn_sweep.orchestrator.trial import EpochReporter


@pytest.fixture(scope="module")
def sets(toy_task_dir: Path) -> EvalSets:
    return EvalSets.load(toy_task_dir / "data", mia=toy_task_dir / "mia", mmlu=toy_task_dir / "mmlu")


def test_the_subset_is_stratified_and_fixed(sets: EvalSets) -> None:
    split = Split.draw(sets, 0.2)
    assert split == Split.draw(sets, 0.2)  # the same items for every epoch of every trial
    screened = split.screened(sets)
    strata = Counter((row.split, row.task, row.kind) for row in sets.rows)
    chosen = Counter((row.split, row.task, row.kind) for row in screened.rows)
    assert set(chosen) == set(strata) and all(chosen[key] >= 0.2 * strata[key] for key in strata)
    assert {doc.membership for doc in screened.mia} == {"member", "nonmember"}
    assert {q.subject for q in screened.mmlu} == {q.subject for q in sets.mmlu}
    assert len(screened.rows) < 0.3 * len(sets.rows)


def test_the_screen_decides_by_margin_and_a_confident_mmlu_bound() -> None:
    assert mmlu_upper_bound(0, 10, 0.95) == pytest.approx(1 - 0.05 ** (1 / 10))
    assert mmlu_upper_bound(10, 10, 0.95) == 1.0
    mmlu = [{"answer": 0, "predicted": 0}] * 7 + [{"answer": 0, "predicted": 1}] * 3  # 7/10: upper bound ~0.91
    assert needs_full_evaluation({"final_score": 0.5}, None, 0.6, 0.05, 0.95, mmlu)  # no best yet, MMLU could reach 0.6
    assert not needs_full_evaluation({"final_score": 0.5}, None, 0.95, 0.05, 0.95, mmlu)  # confidently below 0.95
    assert needs_full_evaluation({"final_score": 0.47}, 0.5, 0.6, 0.05, 0.95, mmlu)  # within the margin of the best
    assert not needs_full_evaluation({"final_score": 0.40}, 0.5, 0.6, 0.05, 0.95, mmlu)  # cannot become the best


def reporter_context(toy_task_dir: Path, tmp_path: Path, threshold: float, **changes) -> TrialContext:
    return trial_context(
        toy_task_dir,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        mmlu_threshold=threshold,
        eval=EvalOptions(max_new_tokens=16),
        **changes,
    )


def reporter_for(
    context: TrialContext, name: str, threshold: float, reports: list, kept: Path
) -> tuple[EpochReporter, str]:
    """A trial's reporter whose reports keep a copy of the checkpoint saved, as Tune does."""
    mlflow = tracking.client(context.tracking_uri)
    experiment = tracking.experiment_id(mlflow, name)
    parent = mlflow.create_run(experiment).info.run_id
    run_id = tracking.trial_run(mlflow, experiment, parent, "t1", {"method": "npo", "params": {}}, threshold)

    def report(metrics: dict, saved: Path | None) -> None:
        reports.append((metrics, saved and Path(shutil.copytree(saved, kept / f"report-{len(reports) + 1}"))))

    return EpochReporter(context, {"method": "npo", "params": {}}, run_id, report), run_id


def untrained_copy(model_dir: Path, out: Path) -> Path:
    """The toy model's architecture and tokenizer with fresh random weights: MMLU at chance."""
    shutil.copytree(model_dir, out)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
    return out


@pytest.mark.parametrize("trained, threshold, stage", [(False, 0.95, "screen"), (True, 0.5, "full")])
def test_an_epoch_is_fully_evaluated_and_saved_only_where_it_could_be_the_best(
    trained: bool, threshold: float, stage: str, toy_task_dir: Path, tmp_path: Path
) -> None:
    context = reporter_context(toy_task_dir, tmp_path, threshold)
    mlflow = tracking.client(context.tracking_uri)
    reports = []
    reporter, run_id = reporter_for(context, "screening", threshold, reports, tmp_path)
    if trained:
        checkpoint = Path(shutil.copytree(toy_task_dir / "model", tmp_path / "epoch-1"))
    else:
        checkpoint = untrained_copy(toy_task_dir / "model", tmp_path / "epoch-1")
    reporter(1, checkpoint, True)
    ((metrics, saved),) = reports
    assert metrics["full_evaluation"] == (1.0 if stage == "full" else 0.0)
    assert [m.value for m in mlflow.get_metric_history(run_id, "full_evaluation")] == [metrics["full_evaluation"]]
    if stage == "screen":  # an untrained model's MMLU (chance) is confidently below 0.95 on the subset: never eligible
        assert saved is None and not metrics["eligible"] and not (checkpoint / "scores.json").exists()
    else:  # the first eligible epoch is the trial's best: fully evaluated, saved with its full records
        assert json.loads((saved / "scores.json").read_text())["stage"] == "full"
        generations = (saved / "generations.jsonl").read_text().splitlines()
        assert len(generations) == len(EvalSets.load(context.data).rows)


def test_the_full_evaluation_waits_for_a_decision_epoch_and_takes_the_best_screened_epochs(
    toy_task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six epochs, ASHA's rung at 4, the two best screened candidates held. Epochs 1-3 screen
    higher each time: 3 and 2 are held, 1 dropped. Epoch 4 (a decision) screens higher still:
    it and epoch 3 are fully evaluated and 4, better, is saved. Epoch 5 is a candidate (within
    the margin of 0.46): held. Epoch 6 (the last) screens lower than 5 but is a candidate: both
    are fully evaluated, and 5, better in full, is saved. Four full evaluations in six epochs,
    where evaluating each candidate when seen took six."""
    context = reporter_context(toy_task_dir, tmp_path, 0.5, decision_epochs=(4,))
    screened = iter([0.30, 0.35, 0.40, 0.45, 0.47, 0.44])
    full = iter([0.46, 0.43, 0.45, 0.50])  # in the order evaluated: the decision epoch first (4, 3, then 6, 5)
    score = EpochReporter._score
    monkeypatch.setattr(
        EpochReporter,
        "_score",
        lambda self, records, stage, epoch: {
            **score(self, records, stage, epoch),
            "final_score": next(screened if stage == "screen" else full),
        },
    )
    reports = []
    reporter, run_id = reporter_for(context, "deferred", 0.5, reports, tmp_path)
    for epoch in range(1, 7):
        checkpoint = Path(shutil.copytree(toy_task_dir / "model", tmp_path / f"staging-{epoch}"))
        reporter(epoch, checkpoint, epoch == 6)
    assert [saved is not None for _, saved in reports] == [False, False, False, True, False, True]
    assert [metrics["objective"] for metrics, _ in reports] == [-math.inf] * 3 + [0.46, 0.46, 0.50]
    assert reports[5][0]["objective_epoch"] == 5 and reports[5][0]["final_score"] == 0.45  # epoch 6's own, in full
    assert [json.loads((saved / "trial_config.json").read_text())["epoch"] for _, saved in reports if saved] == [4, 5]
    assert json.loads((reports[5][1] / "scores.json").read_text())["stage"] == "full"
    mlflow = tracking.client(context.tracking_uri)
    full_evaluations = [(m.step, m.value) for m in mlflow.get_metric_history(run_id, "full_evaluation")]
    assert sorted(full_evaluations) == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 1.0)]  # each epoch once
    assert mlflow.get_run(run_id).data.metrics["best_epoch"] == 5
    assert reporter.staging.held == [] and not any(
        Path(reporter.staging._holding.name).iterdir()
    )  # nothing left on disk


def scores(final: float, mmlu: float, threshold: float = 0.5) -> dict:
    return {"final_score": final, "mmlu_accuracy": mmlu, "eligible": mmlu >= threshold}


def test_staging_holds_the_best_screens_and_fully_evaluates_them_at_a_decision_epoch(tmp_path: Path) -> None:
    """StagedEvaluation alone, on made-up scores: no model, backend, MLflow or Tune."""
    staging = StagedEvaluation(EvalOptions(screen_hold=2), Limits(0.5), decision_epochs=(3,))
    folders = {epoch: tmp_path / f"epoch-{epoch}" for epoch in (1, 2, 3)}
    for folder in folders.values():
        folder.mkdir()
    screens = {1: scores(0.40, 0.6), 2: scores(0.50, 0.6), 3: scores(0.30, 0.6)}
    for epoch in (1, 2):  # candidates (no best yet), held, not evaluated: nothing logged yet
        assert staging.plan(epoch, folders[epoch], screens[epoch], [], last=False) == []
        outcome = staging.conclude(epoch, screens[epoch], [])
        assert (outcome.own, outcome.improved, outcome.best, outcome.to_log) == (screens[epoch], False, None, [])
    assert [held.epoch for held in staging.held] == [2, 1] and not folders[1].exists()  # moved into holding
    targets = staging.plan(3, folders[3], screens[3], [], last=False)  # a decision: itself, then those held
    assert [epoch for epoch, _ in targets] == [3, 2, 1] and targets[0][1] == folders[3]
    full = {1: scores(0.41, 0.6), 2: scores(0.52, 0.6), 3: scores(0.31, 0.6)}
    evaluated = [Evaluated(epoch, folder, {}, full[epoch]) for epoch, folder in targets]
    outcome = staging.conclude(3, screens[3], evaluated)
    assert outcome.own == full[3] and outcome.improved and outcome.best.epoch == 2
    assert outcome.to_log == [(1, full[1]), (2, full[2]), (3, full[3])]  # each epoch once, full scores, in order
    assert staging.objective.value == 0.52 and staging.objective.epoch == 2
    staging.discard_evaluated()
    assert staging.held == [] and not any(Path(staging._holding.name).iterdir())


def test_staging_judges_a_confidently_ineligible_screen_without_a_full_evaluation(tmp_path: Path) -> None:
    staging = StagedEvaluation(EvalOptions(), Limits(0.9), decision_epochs=())
    (tmp_path / "epoch-1").mkdir()
    mmlu = [{"answer": 0, "predicted": 1}] * 20  # 0 of 20: confidently below 0.9
    assert staging.plan(1, tmp_path / "epoch-1", scores(0.8, 0.0, 0.9), mmlu, last=True) == []
    outcome = staging.conclude(1, scores(0.8, 0.0, 0.9), [])
    assert outcome.best is None and outcome.to_log == [(1, scores(0.8, 0.0, 0.9))] and outcome.improved
    assert staging.held == [] and (tmp_path / "epoch-1").exists()  # never held


def test_without_staging_every_epoch_is_fully_evaluated_and_the_best_eligible_kept(tmp_path: Path) -> None:
    staging = StagedEvaluation(EvalOptions(screen=False), Limits(0.5))
    first = staging.conclude(1, None, [Evaluated(1, tmp_path, {}, scores(0.7, 0.4))])  # ineligible
    second = staging.conclude(2, None, [Evaluated(2, tmp_path, {}, scores(0.3, 0.6))])
    third = staging.conclude(3, None, [Evaluated(3, tmp_path, {}, scores(0.2, 0.6))])
    assert (first.improved, first.best) == (True, None)  # the best ineligible value so far, nothing kept
    assert second.improved and second.best.epoch == 2
    assert not third.improved and third.best is None


def test_an_epoch_over_the_time_limit_is_never_held_nor_kept(tmp_path: Path) -> None:
    """Past the time limit no later epoch can be eligible: its screen is what it reports."""
    staging = StagedEvaluation(EvalOptions(), Limits(0.5, time_limit_s=100), decision_epochs=())
    (tmp_path / "epoch-1").mkdir()
    late = {**scores(0.9, 0.8), "train_seconds": 120.0, "eligible": False}
    assert staging.plan(1, tmp_path / "epoch-1", late, [], last=True) == []
    outcome = staging.conclude(1, late, [])
    assert outcome.best is None and staging.held == [] and staging.objective.value < 0
    assert staging.objective.slacks["time_slack"] == pytest.approx(0.2)
