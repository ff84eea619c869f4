"""Checkpoint retention (orchestrator/retention.py): which ended trials keep their checkpoints,
and the Tune callback removing the others' and saying so on their runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from ray.tune.experiment import Trial
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.config import STAGE_SELECTORS
from unlearn_sweep.orchestrator.retention import CheckpointRetention, EndedTrial, kept_trials


def ended(trial_id: str, objective: float | None, configuration: str = "", forget_mean=None, failed=False):
    return EndedTrial(trial_id, objective, configuration or trial_id, forget_mean, failed)


def test_the_best_distinct_configurations_and_the_merge_picks_are_kept() -> None:
    trials = [
        ended("a", 0.50, forget_mean=0.4),
        ended("b", 0.70, configuration="same", forget_mean=0.3),
        ended("c", 0.70, configuration="same", forget_mean=0.2),  # b's configuration, tied, later id: not confirmed
        ended("d", 0.60, forget_mean=0.9),
        ended("e", -1.2),  # never eligible: nothing saved to keep
        ended("f", 0.95, failed=True),  # failed: never selected
        ended("g", None),  # failed before its first report
    ]
    assert kept_trials(trials, 2, merge_picks=()) == {"b", "d"}
    assert kept_trials(trials, 3, merge_picks=()) == {"b", "d", "a"}
    # the merge stage's sources: lowest and highest forget mean among the eligible
    assert kept_trials(trials, 1, merge_picks=STAGE_SELECTORS) == {"b", "c", "d"}
    assert kept_trials([ended("x", 0.4, forget_mean=0.5), ended("w", 0.4, forget_mean=0.5)], 1, STAGE_SELECTORS) == {
        "w"
    }


def fake_trial(trial_id: str, status: str, objective: float | None, lr: float, epoch: int = 1):
    result = {} if objective is None else {"objective": objective, "objective_epoch": epoch}
    setup = {"method": "grad_diff", "params": {"learning_rate": lr, "epochs": 2}}
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=result, config={"setup": setup})


def saved_checkpoint(stage: Path, trial_id: str, forget_mean: float) -> Path:
    folder = stage / f"trial_{trial_id}" / "checkpoint_000001"
    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(json.dumps({"forget_mean": forget_mean, "final_score": 0.5}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_ended_trials_outside_the_kept_ones_lose_their_checkpoints_and_say_why(tmp_path: Path) -> None:
    stage, train = tmp_path / "runs" / "s1", tmp_path / "runs" / "s1" / "train"
    mlflow = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("s1")
    parent = mlflow.create_run(experiment).info.run_id
    runs = {
        trial_id: mlflow.create_run(experiment, tags={"mlflow.parentRunId": parent, "trial_id": trial_id}).info.run_id
        for trial_id in ("t1", "t2", "t3", "t4", "t5")
    }
    folders = {
        "t1": saved_checkpoint(stage, "t1", 0.5),
        "t2": saved_checkpoint(stage, "t2", 0.4),
        "t3": saved_checkpoint(train, "t3", 0.3),  # a multi-worker trial: its Ray Train run's folder
        "t4": saved_checkpoint(stage, "t4", 0.6),  # running: never touched
        "t5": saved_checkpoint(stage, "t5", 0.7),
    }
    retention = CheckpointRetention(
        "its search", 1, (), (stage, train), f"sqlite:///{tmp_path}/mlflow.db", experiment, parent
    )
    t1 = fake_trial("t1", Trial.RUNNING, 0.50, 1e-4)
    t2 = fake_trial("t2", Trial.RUNNING, 0.60, 2e-4)
    t3 = fake_trial("t3", Trial.RUNNING, 0.70, 3e-4)
    t4 = fake_trial("t4", Trial.RUNNING, 0.10, 4e-4)
    t5 = fake_trial("t5", Trial.RUNNING, 0.99, 5e-4)
    trials = [t1, t2, t3, t4, t5]

    retention.on_trial_complete(1, trials, t1)  # the only one ended: the best so far
    assert folders["t1"].exists()
    t1.status = Trial.TERMINATED
    retention.on_trial_complete(2, trials, t2)  # better: t1's checkpoint goes
    assert not folders["t1"].exists() and folders["t1"].parent.exists() and folders["t2"].exists()
    t2.status = Trial.TERMINATED
    retention.on_trial_error(3, trials, t5)  # the best objective, but failed
    t5.status = Trial.ERROR
    assert not folders["t5"].exists() and folders["t2"].exists()
    # A resumed driver's fresh copy ranks the trials Tune hands it, ended before or now.
    resumed = CheckpointRetention(
        "its search", 1, (), (stage, train), f"sqlite:///{tmp_path}/mlflow.db", experiment, parent
    )
    resumed.on_trial_complete(4, trials, t3)
    assert not folders["t2"].exists() and folders["t3"].exists() and folders["t4"].exists()

    tags = {trial_id: mlflow.get_run(run_id).data.tags for trial_id, run_id in runs.items()}
    assert tags["t1"]["checkpoint_removed"] == "not among the 1 best configurations of its search (keep_checkpoints)"
    assert tags["t2"]["checkpoint_removed"].startswith("not among the 1 best")
    assert tags["t5"]["checkpoint_removed"] == "its trial failed"
    assert "checkpoint_removed" not in tags["t3"] and "checkpoint_removed" not in tags["t4"]


def test_the_merge_stages_sources_keep_their_checkpoints(tmp_path: Path) -> None:
    """Ranked by the forget mean their saved checkpoints' scores hold, as the merge stage picks them."""
    stage = tmp_path / "runs" / "s1"
    mlflow = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("s1")
    parent = mlflow.create_run(experiment).info.run_id
    folders = {
        trial_id: saved_checkpoint(stage, trial_id, mean) for trial_id, mean in (("a", 0.5), ("b", 0.4), ("c", 0.3))
    }
    trials = [
        fake_trial("a", Trial.TERMINATED, 0.5, 1e-4),  # least forgetting
        fake_trial("b", Trial.TERMINATED, 0.6, 2e-4),
        fake_trial("c", Trial.RUNNING, 0.7, 3e-4),  # best, and most forgetting
    ]
    retention = CheckpointRetention(
        "its search", 1, STAGE_SELECTORS, (stage,), f"sqlite:///{tmp_path}/mlflow.db", experiment, parent
    )
    retention.on_trial_complete(1, trials, trials[2])
    assert folders["a"].exists() and not folders["b"].exists() and folders["c"].exists()


def test_a_store_that_fails_leaves_the_checkpoints_and_the_sweep_going(
    tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What is removed is said on its run first: with the store down nothing goes, and no
    exception reaches Tune; the next trial's end removes it."""
    stage = tmp_path / "s1"
    folder = saved_checkpoint(stage, "a", 0.5)
    trials = [fake_trial("a", Trial.TERMINATED, 0.5, 1e-4), fake_trial("b", Trial.RUNNING, 0.6, 2e-4)]
    retention = CheckpointRetention("its search", 1, (), (stage,), f"sqlite:///{tmp_path}/mlflow.db", "0", "parent")

    def store_down(*args, **kwargs):
        raise MlflowException("the tracking server is down")

    monkeypatch.setattr(tracking, "trial_runs", store_down)
    retention.on_trial_complete(1, trials, trials[1])
    assert folder.exists() and "checkpoint retention skipped after trial b ended" in caplog.text
    monkeypatch.setattr(tracking, "trial_runs", lambda *args: [])
    trials[1].status = Trial.TERMINATED
    trials.append(fake_trial("c", Trial.RUNNING, 0.1, 3e-4))
    retention.on_trial_complete(2, trials, trials[2])
    assert not folder.exists()
