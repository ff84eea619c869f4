"""Staged evaluation: a fixed stratified subset screens each epoch; the full evaluation runs
only where the epoch could become the trial's best eligible checkpoint."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from unlearn_sweep.evaluation.evaluator import EvalSets
from unlearn_sweep.evaluation.screening import Split, mmlu_upper_bound, needs_full_evaluation
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.config import EVAL_DEFAULTS
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


def reporter_settings(toy_task_dir: Path, tmp_path: Path, threshold: float) -> dict:
    return {"data": str(toy_task_dir / "data"), "split": None, "mia": str(toy_task_dir / "mia"), "mmlu": str(toy_task_dir / "mmlu"),
            "mmlu_shots": None, "mmlu_threshold": threshold, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "workers": 1,
            **EVAL_DEFAULTS, "max_new_tokens": 16}


@pytest.mark.parametrize("threshold, stage", [(1.0, "screen"), (0.5, "full")])
def test_an_epoch_is_fully_evaluated_and_saved_only_where_it_could_be_the_best(threshold: float, stage: str, toy_task_dir: Path,
                                                                                tmp_path: Path) -> None:
    settings = reporter_settings(toy_task_dir, tmp_path, threshold)
    mlflow = tracking.client(settings["tracking_uri"])
    experiment = tracking.experiment_id(mlflow, "screening")
    parent = mlflow.create_run(experiment).info.run_id
    run_id = tracking.trial_run(mlflow, experiment, parent, "t1", {"method": "npo", "params": {}}, threshold)
    reports = []
    reporter = EpochReporter(settings, {"method": "npo", "params": {}}, run_id, lambda metrics, saved: reports.append((metrics, saved)))
    checkpoint = Path(shutil.copytree(toy_task_dir / "model", tmp_path / "epoch-1"))
    reporter(1, checkpoint)
    ((metrics, saved),) = reports
    assert metrics["full_evaluation"] == (1.0 if stage == "full" else 0.0)
    assert [m.value for m in mlflow.get_metric_history(run_id, "full_evaluation")] == [metrics["full_evaluation"]]
    if stage == "screen":  # the base model's 5-shot MMLU (0.9) is confidently below 1.0 on the subset: never eligible
        assert saved is None and not metrics["eligible"] and not (checkpoint / "scores.json").exists()
    else:  # the first eligible epoch is the trial's best: fully evaluated, saved with its full records
        assert saved == checkpoint and json.loads((checkpoint / "scores.json").read_text())["stage"] == "full"
        generations = (checkpoint / "generations.jsonl").read_text().splitlines()
        assert len(generations) == len(EvalSets.load(settings["data"]).rows)
