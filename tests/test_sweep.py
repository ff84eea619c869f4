"""The sweep: config and search-space validation, the constraint reaching Optuna, and real
small sweeps on local Ray (MLflow runs, a failing trial, export round trip, resume)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import ray
import torch
import yaml
from conftest import wait_until_ready
from PIL import Image
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from safetensors.torch import load_file
from unlearn_sweep.corpus.compat import TUNE_STOPPED_TRIAL
from unlearn_sweep.corpus.toy_task import sweep_paths
from unlearn_sweep.evaluation import vllm_inference
from unlearn_sweep.evaluation.eligibility import Limits, TrialObjective, epoch_objective
from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
from unlearn_sweep.methods.registry import run_method
from unlearn_sweep.orchestrator import storage, tracking
from unlearn_sweep.orchestrator.cli import _report, main
from unlearn_sweep.orchestrator.config import ConfigError, Confirm, load_config
from unlearn_sweep.orchestrator.context import TrialContext
from unlearn_sweep.orchestrator.search import (
    CONSTRAINTS,
    SPACES_DIR,
    STUDY_TRIAL,
    distributions,
    load_space,
    make_searcher,
    possible_values,
    search_algorithm,
    sources_can_recur,
)
from unlearn_sweep.orchestrator.selection import export_champion, leaderboard
from unlearn_sweep.orchestrator.sweep import METRIC, MODE, SweepSummary, run_sweep
from unlearn_sweep.orchestrator.trial import epoch_report

# For sweeps whose test checks what ran, was recorded or was merged, not the scores: short
# generations, no MMLU shots, no staging (a fraction of the evaluation's cost).
LIGHT_EVAL = {"eval": {"dtype": "float32", "max_new_tokens": 16, "screen": False}, "mmlu_shots": 0}


def trial_context(toy_task_dir: Path, **changes) -> TrialContext:
    """A trial's context over the toy task, as a sweep would build it (tracking where `changes` say)."""
    return TrialContext(
        model=str(toy_task_dir / "model"),
        data=str(toy_task_dir / "data"),
        split=None,
        mia=str(toy_task_dir / "mia"),
        mmlu=str(toy_task_dir / "mmlu"),
        tracking_uri=changes.pop("tracking_uri", "sqlite:///:memory:"),
        **changes,
    )


MMLU_CONSTRAINT, TIME_CONSTRAINT = CONSTRAINTS


def write_config(folder: Path, toy_task_dir: Path, **overrides) -> Path:
    """A sweep config on the toy task with the overrides; a key given as ... is left out (its
    default applies, e.g. `confirm=...`: on where the data has a validation fold)."""
    raw = {
        "name": "s1",
        **sweep_paths(toy_task_dir),
        "methods": ["grad_diff"],
        "trials": 2,
        "seed": 0,
        "search_space_overrides": {
            "grad_diff": {"epochs": {"int": [1, 2]}, "learning_rate": {"log_uniform": [5e-5, 3e-4]}}
        },
        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db"},
        "confirm": None,  # the toy task has a second fold: a test that confirms says so
        "storage_path": str(folder / "runs"),
        # float32 inference: ~4x faster than bfloat16 on a CPU without bf16 units; the end-to-end test
        # scores in the default.
        "eval": {"dtype": "float32"},
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in raw.items() if value is not ...}))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": None}, "field 'name': required"),
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"methods": ["nope"]}, "field 'methods': unknown method 'nope'"),
        ({"mmlu_threshold": "2x"}, "field 'mmlu_threshold'"),
        ({"trials": 0}, "field 'trials'"),
        ({"resources_per_trial": {"cpu": 1, "tpu": 1}}, "field 'resources_per_trial': unknown key(s) tpu (valid: cpu,"),
        ({"search_space_overrides": {"npo": {}}}, "method 'npo' is not among methods"),
        ({"select_by": "held_out"}, "field 'select_by': held_out needs a confirmation stage (confirm)"),
        ({"confirm": {"split": "train"}}, "field 'confirm.split': train is the fold the sweep searches on"),
        ({"confirm": {"mia": "{task}/mmlu"}}, "field 'confirm.mia': "),
        ({"confirm": {"top_k": 0}}, "field 'confirm.top_k': expected a positive integer, got 0"),
        ({"time_limit_s": -5}, "field 'time_limit_s': expected a positive number of seconds, got -5"),
        (
            {"storage_path": "s3://bucket/runs", "optuna_storage": "sqlite:////tmp/optuna.db"},
            "field 'storage_path': s3://bucket/runs: remote storage is not supported: the champion is registered",
        ),
        ({"keep_checkpoints": 0}, "field 'keep_checkpoints': expected a positive integer or all, got 0"),
        ({"keep_checkpoints": "none"}, "field 'keep_checkpoints': expected a positive integer or all, got 'none'"),
        (
            {"resources_per_trial": {"cpu": 1, "gpu": 0.5, "workers": 2}},
            "field 'resources_per_trial': 2 workers of gpu 0.5 would share one GPU, which NCCL refuses",
        ),
        ({"data": "/nonexistent"}, "field 'data': /nonexistent does not exist"),
        ({"mmlu_shots": -1}, "field 'mmlu_shots': expected an integer >= 0, got -1"),
        ({"searcher": "grid"}, "field 'searcher': expected one of tpe, tpe_grouped, random, got 'grid'"),
        ({"reproducible_search": "yes"}, "field 'reproducible_search': expected true or false, got 'yes'"),
        ({"asha": "off"}, "field 'asha': expected a mapping or null, got 'off'"),
        ({"eval": {"screen_fraction": 0}}, "field 'eval.screen_fraction': expected a number in (0, 1], got 0"),
        ({"eval": {"dtype": "fp8"}}, "field 'eval.dtype': expected one of bfloat16, float16, float32, auto, got 'fp8'"),
        ({"eval": {"screen": "yes"}}, "field 'eval.screen': expected true or false, got 'yes'"),
        ({"eval": {"screen_hold": 0}}, "field 'eval.screen_hold': expected a positive integer, got 0"),
        ({"split": "test"}, "field 'split': expected train or validation, got 'test'"),
        ({"merge_stage": {"trials": 0}}, "field 'merge_stage.trials': expected a positive integer, got 0"),
        ({"asha": {"reduction_factor": 1}}, "field 'asha.reduction_factor': expected an integer >= 2, got 1"),
        ({"eval": {"backend": "tgi"}}, "field 'eval.backend': expected one of hf, vllm, got 'tgi'"),
        ({"eval": {"vllm_memory": 1.5}}, "field 'eval.vllm_memory': expected a number in (0, 1), got 1.5"),
        pytest.param(
            {"eval": {"backend": "vllm"}},
            "field 'eval.backend': the vllm backend needs the vllm package",
            marks=pytest.mark.skipif(vllm_inference.installed(), reason="vLLM is installed here"),
        ),
        (
            {"mlflow": {"tracking_uri": "sqlite:////nonexistent/folder/mlflow.db"}},
            "field 'mlflow.tracking_uri': /nonexistent/folder: folder of the MLflow store does not exist",
        ),
        ({"storage_path": "/proc/sweeps"}, "field 'storage_path': /proc/sweeps cannot be written"),
        ({"storage_path": "sweep.yaml/runs"}, "sweep.yaml/runs cannot be written ("),
        ({"model": "/proc"}, "field 'model': /proc: not a Hugging Face checkpoint (no config.json)"),
        (
            {"recipes": ["organizers_npo"]},
            "organizers_npo.yaml: field 'method': method 'npo' is not among the sweep's methods",
        ),
        ({"recipes": ["winner"]}, "field 'recipes': unknown recipe 'winner'"),
        (
            {"merge_stage": {"sources": ["most_forgetting"]}},
            "field 'merge_stage.sources': name at least two different sources",
        ),
        (
            {"merge_stage": {"sources": ["most_forgetting", "/proc"]}},
            "field 'merge_stage.sources': /proc: not a Hugging Face checkpoint",
        ),
        (
            {"merge_stage": {"space": {"weights": {"choice": ["1,1,1"]}}}},
            "field 'merge_stage.space.weights': weights '1,1,1': one per source (2)",
        ),
        (
            {"merge_stage": {"space": {"models": "a,b"}}},
            "field 'merge_stage.space.models': not a hyperparameter of merge",
        ),
        # Calibrating on the scored nonmembers would fit the MIA score, not forget.
        (
            {"methods": ["mia_target"], "search_space_overrides": {}, "held_out": "{task}/mia/nonmember.jsonl"},
            "field 'held_out': {task}/mia/nonmember.jsonl: 24 of its 24 documents are in the scored MIA set",
        ),
        (
            {"methods": ["mia_target"], "search_space_overrides": {}, "mia": "{task}/data"},
            "field 'held_out': mia_target needs documents the model never saw",
        ),
        # Search-space overrides are checked with the config, named in the user's file.
        (
            {"search_space_overrides": {"grad_diff": {"bogus": 1}}},
            "field 'search_space_overrides.grad_diff.bogus': not a hyperparameter",
        ),
        (
            {"search_space_overrides": {"grad_diff": {"learning_rate": {"uniform": [0.2, 0.1]}}}},
            "field 'search_space_overrides.grad_diff.learning_rate': uniform needs [low, high] with low <= high",
        ),
        (
            {"search_space_overrides": {"grad_diff": {"adapter": {"choice": []}}}},
            "field 'search_space_overrides.grad_diff.adapter': choice needs",
        ),
        (
            {"search_space_overrides": {"grad_diff": {"epochs": "two"}}},
            "field 'search_space_overrides.grad_diff.epochs': epochs='two': expected int",
        ),
    ],
)
def test_config_errors_name_the_file_and_field(change, message, toy_task_dir: Path, tmp_path: Path) -> None:
    change = {
        key: value.format(task=toy_task_dir) if isinstance(value, str) else value for key, value in change.items()
    }
    message = message.format(task=toy_task_dir)
    path = write_config(tmp_path, toy_task_dir, **change)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_the_vllm_backend_is_refused_on_a_shared_gpu(
    toy_task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM fails its start when a neighbour frees GPU memory while it profiles: fractional GPUs
    (trials sharing one) are refused with it, whole GPUs accepted (vLLM stands in as installed)."""
    monkeypatch.setattr(vllm_inference, "installed", lambda: True)
    shared = write_config(tmp_path, toy_task_dir, eval={"backend": "vllm"}, resources_per_trial={"cpu": 1, "gpu": 0.5})
    with pytest.raises(ConfigError, match=r"field 'eval.backend': the vllm backend needs whole GPUs"):
        load_config(shared)
    whole = write_config(tmp_path, toy_task_dir, eval={"backend": "vllm"}, resources_per_trial={"cpu": 1, "gpu": 1})
    assert load_config(whole).eval.backend == "vllm"


def test_yaml_numbers_without_a_dot_are_numbers_and_bad_yaml_names_its_line(toy_task_dir: Path, tmp_path: Path) -> None:
    """PyYAML reads 5e-05 as the string '5e-05' (YAML 1.1); a user means a number (YAML 1.2)."""
    path = write_config(tmp_path, toy_task_dir, search_space_overrides={})
    text = path.read_text()
    assert "search_space_overrides: {}\n" in text
    numbers = (
        "gpu_memory_gb: 8e+1\nsearch_space_overrides:\n  grad_diff: {learning_rate: {log_uniform: [5e-05, 3E-4]}}\n"
    )
    path.write_text(text.replace("search_space_overrides: {}\n", numbers))
    config = load_config(path)
    assert config.gpu_memory_gb == 80.0
    assert config.search_space_overrides["grad_diff"]["learning_rate"] == {"log_uniform": [5e-05, 3e-4]}
    path.write_text(text + "trials: [1\n")
    with pytest.raises(ConfigError, match=r"sweep.yaml: invalid YAML at line \d+: "):
        load_config(path)


def test_the_base_evaluation_takes_the_configured_vllm_share(
    toy_task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base model's evaluation (for a relative threshold) loads its vLLM engine with the
    sweep's `eval.vllm_memory`, as trials do: it took vLLM's default share before (review)."""
    from unlearn_sweep.orchestrator import sweep

    config = load_config(write_config(tmp_path, toy_task_dir))
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, backend="vllm", vllm_memory=0.25))
    shares = []

    class Loaded(Exception):
        pass

    def load_model(model_dir, dtype="bfloat16", gpu_memory_utilization=vllm_inference.GPU_SHARE):
        shares.append(gpu_memory_utilization)
        raise Loaded  # no vLLM here: what matters is what it was asked for

    monkeypatch.setattr(vllm_inference, "load_model", load_model)
    with pytest.raises(Loaded):
        sweep._evaluate_base(config, {})
    assert shares == [0.25]


def test_every_relative_path_of_a_config_is_from_its_folder(
    toy_task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite tracking URI was taken from the working directory, every other path from the
    config's folder: started from elsewhere, a sweep wrote its runs to another store."""
    path = write_config(
        tmp_path / "sweep", toy_task_dir, mlflow={"tracking_uri": "sqlite:///mlflow.db"}, storage_path="runs"
    )
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config = load_config(path)
    assert config.tracking_uri == f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}"
    assert config.storage_path == str(tmp_path / "sweep" / "runs")


def test_the_confirmation_stage_is_on_where_the_data_has_another_fold(toy_task_dir: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "a", toy_task_dir, confirm=...))
    assert config.confirm == Confirm(top_k=5, split="validation", mia=toy_task_dir / "mia" / "validation")
    assert config.select_by == "held_out"
    one_fold = tmp_path / "one-fold"  # the official layout holds one fold: nothing to confirm on
    one_fold.mkdir()
    for name in ("forget", "retain"):
        shutil.copy(next((toy_task_dir / "data").glob(f"{name}_train-*.parquet")), one_fold / f"{name}.parquet")
    config = load_config(write_config(tmp_path / "b", toy_task_dir, data=str(one_fold), confirm=...))
    assert config.confirm is None and config.select_by == "tuned"
    # mia_target's held-out documents are scored in neither fold's MIA set
    config = load_config(
        write_config(tmp_path / "c", toy_task_dir, methods=["mia_target"], search_space_overrides={}, confirm={})
    )
    assert config.confirm.held_out == toy_task_dir / "mia" / "held_out.jsonl"


def test_each_stage_keeps_at_least_the_checkpoints_its_champion_is_chosen_among(
    toy_task_dir: Path, tmp_path: Path
) -> None:
    def kept(folder: str, **overrides) -> int | None:
        return load_config(write_config(tmp_path / folder, toy_task_dir, **overrides)).checkpoints_kept

    assert kept("default") == 5
    assert kept("one", keep_checkpoints=1) == 1  # chosen by tuned score: the best alone
    assert kept("confirmed", keep_checkpoints=1, confirm={"top_k": 3}) == 3  # any of the confirmed configurations
    assert kept("all", keep_checkpoints="all") is None


def test_default_spaces_are_for_the_real_task_and_the_demo_brings_the_toys(toy_task_dir: Path, tmp_path: Path) -> None:
    """search_spaces/ hold OLMo-1B/7B ranges (the toy's learning rates, up to 6e-4 in full
    fine-tuning, destroy a 7B model; NPO's drew full fine-tuning up to 3e-4, its LoRA range,
    in about 39% of its full fine-tuning trials); the demo passes the toy's as overrides."""
    from unlearn_sweep.methods.registry import method_names
    from unlearn_sweep.orchestrator.cli import TOY_TASK_SPACES, demo_config

    for method in method_names():
        space = load_space(method)
        spaces = [space["params"], *space.get("sources", {}).values()]
        for params in (params for params in spaces if "learning_rate" in params):
            for distribution in distributions(params["learning_rate"]):
                low, high = distribution["log_uniform"]
                condition = distribution.get("if") or {}
                adapters = condition.get("adapter") or possible_values(params.get("adapter", "full"))
                lora_only = adapters in ("lora", ["lora"]) or method == "task_vector"  # a descent, then negated
                assert high <= (4e-4 if lora_only else 1e-4), (method, adapters, high)
    (tmp_path / "toy_task").symlink_to(toy_task_dir)
    config = demo_config(tmp_path, trials=24, seed=0)
    assert config.search_space_overrides == {method: TOY_TASK_SPACES[method] for method in config.methods}
    assert config.confirm.split == "validation"
    assert config.select_by == "held_out"


def test_an_interrupted_sweep_or_demo_says_how_to_go_on(
    toy_task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C or a closed terminal during `make demo` ended in a traceback (the sweep command
    alone handled the interrupt), and would have offered a --resume of a config that is no file.
    A sweep is continued with --resume once its trials had started, else started again (a stop
    in the base model's evaluation was offered a --resume, which was refused: nothing to resume)."""
    from unlearn_sweep.orchestrator import cli, sweep

    def interrupted(config, resume=False, verbose=False, resumable=True):
        message = f"sweep {config.name!r} interrupted after 1 of 6 trials; no champion was registered"
        raise sweep.SweepInterrupted(message, resumable)

    (tmp_path / "toy_task").symlink_to(toy_task_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert cli.main(["demo"]) == 130
    error = capsys.readouterr().err
    assert re.fullmatch(
        r"unlearn-sweep: sweep 'demo-\d{8}-\d{6}' interrupted after 1 of 6 trials; no champion was registered\. "
        r"A demo is not resumed: `make demo` starts a new one\n",
        error,
    ), error
    path = write_config(tmp_path / "sweep", toy_task_dir)
    for resumable, go_on in (
        (True, f"Continue it with: unlearn-sweep sweep {path} --resume"),
        (False, f"Start it again with: unlearn-sweep sweep {path}"),
    ):
        monkeypatch.setattr(sweep, "run_sweep", functools.partial(interrupted, resumable=resumable))
        assert cli.main(["sweep", str(path)]) == 130
        assert capsys.readouterr().err.endswith(f"no champion was registered. {go_on}\n")


def test_the_report_says_whether_the_champion_was_confirmed_on_held_out_data(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Chosen on the fold it was tuned on (no held-out fold), the champion's score was printed as
    plain "final score", as if it were what new data would give."""
    config = load_config(write_config(tmp_path, toy_task_dir))
    champion = {
        "trial_id": "t1",
        "method": "npo",
        "final_score": 0.61,
        "checkpoint": "/c",
        "model_version": "1",
        "from_this_sweep": True,
    }
    for held_out, score in (
        (None, "final score 0.6100 on the fold it was tuned on (not confirmed on held-out data)"),
        ({"final_score": 0.55}, "held-out final score 0.5500 (chosen by it), tuned 0.6100"),
    ):
        _report(SweepSummary("s1", "run", 0.3, champion={**champion, "held_out": held_out}), config)
        out = capsys.readouterr().out
        assert f"champion: trial t1 (npo), {score}\n" in out and "split-folds" not in out  # the data has two folds
    # Data of one fold: the report says how to hold out a fold
    one_fold = tmp_path / "one-fold"
    one_fold.mkdir()
    for name in ("forget", "retain"):
        shutil.copy(next((toy_task_dir / "data").glob(f"{name}_train-*.parquet")), one_fold / f"{name}.parquet")
    config = load_config(write_config(tmp_path / "b", toy_task_dir, data=str(one_fold)))
    _report(SweepSummary("s1", "run", 0.3, champion={**champion, "held_out": None}), config)
    assert f"  to confirm on documents it was not tuned on: unlearn-sweep split-folds --data {one_fold} ..." in (
        capsys.readouterr().out
    )


def test_confirmation_setups_are_distinct_submitted_configurations() -> None:
    from unlearn_sweep.orchestrator.sweep import confirmation_setups

    class Result:
        def __init__(self, setup: dict) -> None:
            self.config = {"setup": setup}

    def row(trial_id: str, eligible: bool = True, best_epoch: int = 2) -> dict:
        return {"trial_id": trial_id, "eligible": eligible, "best_epoch": best_epoch, "run_id": f"run-{trial_id}"}

    npo = {"method": "npo", "params": {"epochs": 5, "beta": 0.1}}
    results = {
        "a": Result(npo),
        "same-at-its-best-epoch": Result({**npo, "params": {"epochs": 3, "beta": 0.1}}),
        "ineligible": Result({"method": "npo", "params": {"epochs": 5, "beta": 0.3}}),
        "merge-stage": Result({"method": "merge", "params": {"models": "/x,/y"}, "source_runs": ["r1", "r2"]}),
        "b": Result({"method": "npo", "params": {"epochs": 5, "beta": 0.2}}),
        "c": Result({"method": "npo", "params": {"epochs": 5, "beta": 0.4}}),
    }
    rows = [
        row("a"),
        row("same-at-its-best-epoch"),
        row("ineligible", eligible=False),
        row("merge-stage"),
        row("b", best_epoch=4),
        row("c"),
    ]
    setups = confirmation_setups(rows, results, top_k=2)
    assert setups == [
        {"method": "npo", "params": {"epochs": 2, "beta": 0.1}, "confirms_run": "run-a"},
        {"method": "npo", "params": {"epochs": 4, "beta": 0.2}, "confirms_run": "run-b"},
    ]


def test_held_out_documents_default_beside_the_mia_set(toy_task_dir: Path, tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", toy_task_dir)).held_out is None  # no method reads them
    config = load_config(write_config(tmp_path / "b", toy_task_dir, methods=["mia_target"], search_space_overrides={}))
    assert config.held_out == toy_task_dir / "mia" / "held_out.jsonl"


def test_search_space_errors_and_conditions(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="npo.yaml: field 'betta': not a hyperparameter"):
        load_space("npo", {"betta": 0.1})
    with pytest.raises(ConfigError, match="field 'beta': log_uniform needs"):
        load_space("npo", {"beta": {"log_uniform": [1.0]}})
    (tmp_path / "npo.yaml").write_text("beta: {log_uniform: [0.0, 1.0]}\n")
    with pytest.raises(ConfigError, match="npo.yaml: field 'beta': a log scale needs low > 0"):
        load_space("npo", spaces_dir=tmp_path)
    space = load_space("npo", {"adapter": "full"})
    study = optuna.create_study()
    from unlearn_sweep.orchestrator.search import DefineByRun

    setup = DefineByRun({"npo": space})(study.ask())["setup"]
    assert setup["params"]["adapter"] == "full" and "lora_rank" not in setup["params"]
    merge = load_space("merge")
    assert set(merge["sources"]) == {"over", "under"} and merge["source_method"] == "npo"


def test_a_parameter_takes_one_distribution_per_condition(toy_task_dir: Path, tmp_path: Path) -> None:
    """NPO's one learning-rate range, [3e-6, 3e-4], drew full fine-tuning of a 7B model above
    5e-5, which destroys it, in about 39% of those trials: each adapter has its own range now."""
    from unlearn_sweep.orchestrator.plan import plan_sweep
    from unlearn_sweep.orchestrator.search import DefineByRun, load_recipe

    space = load_space("npo")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {"full": [], "lora": []}
    for _ in range(40):
        trial = study.ask()
        params = DefineByRun({"npo": space})(trial)["setup"]["params"]
        drawn[params["adapter"]].append(params["learning_rate"])
        assert f"npo/learning_rate[adapter={params['adapter']}]" in trial.params  # its own Optuna parameter
    assert drawn["full"] and max(drawn["full"]) <= 5e-5 and drawn["lora"] and min(drawn["lora"]) >= 5e-5
    # A recipe is checked against the distribution its own values select.
    (tmp_path / "full_npo.yaml").write_text("method: npo\nparams: {learning_rate: 1.0e-4, adapter: full}\n")
    with pytest.raises(ConfigError, match=r"field 'params.learning_rate': 0.0001 is outside the sweep's space"):
        load_recipe("full_npo", {"npo": space}, recipes_dir=tmp_path)
    (tmp_path / "no_adapter.yaml").write_text("method: npo\nparams: {learning_rate: 1.0e-5}\n")
    with pytest.raises(ConfigError, match=r"sampled only when adapter is 'full' or adapter is 'lora'"):
        load_recipe("no_adapter", {"npo": space}, recipes_dir=tmp_path)
    assert load_recipe("organizers_npo", {"npo": space})["npo/learning_rate[adapter=full]"] == 1e-5
    # Every value the conditions read has a distribution, or the parameter would train at its default unseen.
    with pytest.raises(ConfigError, match=r"npo.yaml: field 'learning_rate': no distribution where adapter is 'qlora'"):
        load_space("npo", {"adapter": {"choice": ["full", "qlora"]}})
    with pytest.raises(ConfigError, match=r"field 'learning_rate': its conditions read beta, which is not a choice"):
        load_space("npo", {"learning_rate": [{"uniform": [1e-5, 2e-5], "if": {"beta": 0.1}}]})
    with pytest.raises(ConfigError, match=r"field 'learning_rate': a list holds one distribution per condition"):
        load_space("npo", {"learning_rate": [{"uniform": [1e-5, 2e-5]}]})
    # The memory plan takes the worst case over every distribution.
    batch = [{"int": [4, 8], "if": {"adapter": "full"}}, {"choice": [8, 32], "if": {"adapter": "lora"}}]
    config = load_config(write_config(tmp_path, toy_task_dir, search_space_overrides={"grad_diff": {"batch_size": 16}}))
    config.search_space_overrides = {"grad_diff": {"adapter": {"choice": ["full", "lora"]}, "batch_size": batch}}
    assert {row.params.batch_size for row in plan_sweep(config)} == {32}


def test_merge_knobs_are_sampled_only_for_the_combinations_that_read_them() -> None:
    from unlearn_sweep.methods.merge import COMBINATIONS
    from unlearn_sweep.orchestrator.search import MERGE_STAGE, DefineByRun

    space = load_space(MERGE_STAGE)
    assert list(space["params"])[0] == "combination"  # sampled before the knobs that depend on it
    assert set(space["params"]["t"]["if"]["combination"]) == {"slerp"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        params = DefineByRun({"merge": space})(study.ask())["setup"]["params"]
        read = set(COMBINATIONS[params["combination"]].knobs) | {"combination"}
        assert set(params) <= read, params  # e.g. no density for linear, no weights for slerp
        seen.add(params["combination"])
    assert {"linear", "slerp", "ties"} <= seen
    # a condition the space states itself is kept
    own = load_space(MERGE_STAGE, {"t": {"uniform": [0.3, 0.7], "if": {"combination": ["slerp", "linear"]}}})
    assert own["params"]["t"]["if"] == {"combination": ["slerp", "linear"]}


def test_every_recipe_is_a_point_of_its_methods_space_and_runs_first(tmp_path: Path) -> None:
    from unlearn_sweep.methods.registry import build_params, get_method
    from unlearn_sweep.orchestrator.search import DefineByRun, load_recipe, recipe_names

    names = recipe_names()
    assert {
        "ails_ntua_sugd",
        "zjuklab_npo_ties",
        "gil_iimas_ga_finetune",
        "gil_iimas_task_vector",
        "organizers_grad_diff",
        "organizers_npo",
    } <= set(names)
    for name in names:
        recipe = yaml.safe_load((SPACES_DIR / "recipes" / f"{name}.yaml").read_text())
        spaces = {recipe["method"]: load_space(recipe["method"]), "grad_diff": load_space("grad_diff")}
        study = optuna.create_study()
        study.enqueue_trial(load_recipe(name, spaces))
        setup = DefineByRun(spaces)(study.ask())["setup"]
        assert setup["method"] == recipe["method"] and recipe["params"].items() <= setup["params"].items()
        for source, values in (recipe.get("sources") or {}).items():
            assert values.items() <= setup["sources"][source].items()
    # SUGD's defaults are the published setting (AILS-NTUA, 7B), a point of its space.
    sugd = yaml.safe_load((SPACES_DIR / "recipes" / "ails_ntua_sugd.yaml").read_text())["params"]
    assert dataclasses.asdict(build_params(get_method("sugd"), {})).items() >= sugd.items()
    with pytest.raises(
        ConfigError, match=r"ails_ntua_sugd.yaml: field 'params.learning_rate': 1e-05 is outside the sweep's space"
    ):
        load_recipe("ails_ntua_sugd", {"sugd": load_space("sugd", {"learning_rate": {"log_uniform": [1e-4, 1e-3]}})})
    with pytest.raises(ConfigError, match=r"field 'params.last_k_layers': sampled only when adapter is 'lora'"):
        load_recipe(
            "ails_ntua_sugd",
            {"sugd": load_space("sugd", {"last_k_layers": {"choice": [8], "if": {"adapter": "lora"}}})},
        )


def test_searcher_hands_the_mmlu_constraint_to_optuna(toy_task_dir: Path, tmp_path: Path) -> None:
    searcher = make_searcher(load_config(write_config(tmp_path, toy_task_dir)))
    for trial_id in ("a", "b", "c"):
        assert searcher.suggest(trial_id)["setup"]["method"] == "grad_diff"
    searcher.on_trial_complete("a", {"objective": 0.6, "objective_mmlu_slack": -0.1, "objective_time_slack": -0.5})
    searcher.on_trial_complete("b", {"objective": -1.2, "objective_mmlu_slack": 0.2, "objective_time_slack": 0.3})
    searcher.on_trial_complete("c", None, error=True)  # failed before its first score
    trials = searcher.study().trials
    assert [t.constraints[MMLU_CONSTRAINT] for t in trials] == [-0.1, 0.2, 1.0]
    assert [t.constraints[TIME_CONSTRAINT] for t in trials] == [-0.5, 0.3, 1.0]  # the time limit, a second constraint
    assert trials[2].state == optuna.trial.TrialState.FAIL
    feasible = [
        t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.constraints[MMLU_CONSTRAINT] <= 0
    ]
    assert [t.value for t in feasible] == [0.6]


def test_the_default_search_is_the_replays_best_strategy(toy_task_dir: Path, tmp_path: Path) -> None:
    """benchmarks/search_replay.py: grouped multivariate TPE without early stopping was the best
    at 32 trials (docs/benchmarks.md, "Which search")."""
    config = load_config(write_config(tmp_path, toy_task_dir, methods=["grad_diff", "npo"], search_space_overrides={}))
    assert (config.searcher, config.asha) == ("tpe_grouped", None)
    searcher = make_searcher(config)
    setups = [searcher.suggest(str(trial))["setup"] for trial in range(4)]
    assert {setup["method"] for setup in setups[:2]} == {"grad_diff", "npo"}  # each method first, as before


@pytest.mark.parametrize("seed", range(4))
def test_every_method_is_sampled_during_start_up(seed: int, toy_task_dir: Path, tmp_path: Path) -> None:
    methods = ["grad_diff", "npo", "sugd"]
    searcher = make_searcher(
        load_config(
            write_config(tmp_path, toy_task_dir, methods=methods, trials=8, seed=seed, search_space_overrides={})
        )
    )
    assert {searcher.suggest(str(trial))["setup"]["method"] for trial in range(3)} == set(methods)


def suggested_in_simulated_time(search_alg, seconds, trials: int = 10, concurrency: int = 2) -> list[dict]:
    """Tune's loop for one stage, in simulated time: fill the free slots while the searcher
    suggests, then end the trial due first. A trial's score follows from its setup alone, its
    duration from `seconds(setup)`; returns the setups in the order they were suggested."""
    running: list[tuple[float, int, dict]] = []
    setups: list[dict] = []
    now = 0.0
    while len(setups) < trials or running:
        while len(setups) < trials and len(running) < concurrency:
            config = search_alg.suggest(f"t{len(setups)}")
            if config is None:  # the searcher waits for a trial to end
                break
            setups.append(config["setup"])
            heapq.heappush(running, (now + seconds(config["setup"]), len(setups) - 1, config))
        now, number, config = heapq.heappop(running)
        score = -abs(math.log10(config["setup"]["params"]["learning_rate"]) + 3.7)
        result = {"objective": score, "objective_mmlu_slack": -0.1, "objective_time_slack": -1.0, "config": config}
        search_alg.on_trial_complete(f"t{number}", result)
    return setups


@pytest.mark.parametrize("reproducible", [True, False])
def test_a_reproducible_search_suggests_the_same_trials_whichever_finishes_first(
    reproducible: bool, toy_task_dir: Path, tmp_path: Path
) -> None:
    """Two trials at a time, ending in opposite orders (in one run a higher learning rate takes
    longer, in the other a lower one): with reproducible_search (the demo's) Optuna suggests the
    same ten trials; without it, the trials after start-up differ, as two runs of one demo did."""
    runs = []
    for name, seconds in (
        ("slow-high", lambda s: s["params"]["learning_rate"]),
        ("slow-low", lambda s: 1 / s["params"]["learning_rate"]),
    ):
        config = load_config(
            write_config(tmp_path / name, toy_task_dir, name=name, trials=10, reproducible_search=reproducible)
        )
        runs.append(suggested_in_simulated_time(search_algorithm(config, make_searcher(config), 2, 10), seconds))
    assert (runs[0] == runs[1]) is reproducible
    assert len({setup["params"]["learning_rate"] for setup in runs[0]}) == 10


def test_a_reproducible_search_tells_optuna_in_trial_order_also_after_a_resume(
    toy_task_dir: Path, tmp_path: Path
) -> None:
    """One trial at a time (a lag of two): trial 2 is suggested once trial 0 is told, and trial 1
    stays running to Optuna until trial 3 is suggested, though it ended first. The order is
    Tune's to save (beside the searcher's state) and restore after a driver was killed."""
    from ray import cloudpickle
    from ray.tune.search import SearchGenerator

    config = load_config(write_config(tmp_path, toy_task_dir, trials=4, reproducible_search=True))
    search_alg = search_algorithm(config, make_searcher(config), 1, 4)
    as_built = cloudpickle.dumps(SearchGenerator(search_alg))  # what Tune's tuner.pkl holds
    running = SearchGenerator(search_alg)
    first = {trial_id: search_alg.suggest(trial_id) for trial_id in ("a", "b")}
    assert search_alg.suggest("c") is None  # trial 0 has not ended
    for trial_id, score in (("b", 0.5), ("a", 0.6)):
        search_alg.on_trial_complete(
            trial_id, {"objective": score, "objective_mmlu_slack": -0.1, "config": first[trial_id]}
        )
    running.save_to_dir(str(tmp_path), "killed")
    resumed = cloudpickle.loads(as_built)
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.searcher.suggest("c")[STUDY_TRIAL] == 2
    study = resumed.searcher.searcher.study()
    complete, running_state = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING
    assert [t.state for t in study.trials] == [complete, running_state, running_state]
    assert resumed.searcher.suggest("d")[STUDY_TRIAL] == 3  # now trial 1 is told
    assert [t.state for t in study.trials] == [complete, complete, running_state, running_state]
    for trial_id in ("d", "c"):  # every trial suggested: each told as soon as those before it are
        resumed.searcher.on_trial_complete(trial_id, {"objective": 0.4, "objective_mmlu_slack": -0.1})
    assert [t.value for t in study.trials] == [0.6, 0.5, 0.4, 0.4]
    # A trial this wrapper never saw (its saved order lost) goes to the searcher, which finds it
    # in the study by the number its config carries, rather than waiting forever.
    lost = cloudpickle.loads(as_built).searcher
    fifth = lost.searcher.suggest("e")
    lost.on_trial_complete("e", {"objective": 0.3, "objective_mmlu_slack": -0.1, "config": fifth})
    assert study.trials[-1].value == 0.3


def test_a_sweep_of_a_model_without_whole_weights_is_refused_before_mlflow(toy_task_dir: Path, tmp_path: Path) -> None:
    from test_evaluator import broken_copies

    for kind, folder in broken_copies(toy_task_dir / "model", tmp_path).items():
        config = load_config(write_config(tmp_path / kind.replace(" ", "_"), toy_task_dir, model=str(folder)))
        with pytest.raises(ConfigError, match=r"sweep.yaml: field 'model': .*(no weights|unreadable weights)"):
            run_sweep(config)
        assert not (tmp_path / kind.replace(" ", "_") / "mlflow.db").exists()


def test_a_fresh_sweep_never_continues_an_existing_study(toy_task_dir: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, toy_task_dir, name="taken"))
    make_searcher(config)  # creates the study, as a sweep of that name did
    with pytest.raises(ConfigError, match="an Optuna study named 'taken' already exists"):
        run_sweep(config)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_searcher_state_cut_short_resumes_from_the_study(toy_task_dir: Path, tmp_path: Path) -> None:
    """A driver killed while Tune copied its state into storage left the searcher's file empty,
    and the resumed sweep hung. The resumed searcher continues from the Optuna study: the
    trial in flight is found again by the study number its config carries, and told its result."""
    searcher = make_searcher(load_config(write_config(tmp_path, toy_task_dir)))
    as_built = pickle.dumps(searcher)  # what Tune's tuner.pkl holds: the searcher before any trial
    in_flight = searcher.suggest("a")
    searcher.save_to_dir(str(tmp_path), "killed")
    (state,) = tmp_path.glob("searcher-state-*.pkl")
    state.write_bytes(b"")
    resumed = pickle.loads(as_built)
    resumed.restore_from_dir(str(tmp_path))
    resumed.on_trial_result("a", {"objective": 0.4, "training_iteration": 1, "config": in_flight})
    resumed.on_trial_complete("a", {"objective": 0.6, "objective_mmlu_slack": -0.1, "config": in_flight})
    (trial,) = resumed.study().trials
    assert (trial.state, trial.value) == (optuna.trial.TrialState.COMPLETE, 0.6)
    assert trial.constraints == {MMLU_CONSTRAINT: -0.1, TIME_CONSTRAINT: 1.0}
    assert resumed.suggest("b")[STUDY_TRIAL] == 1  # and the search goes on


def test_eligible_then_ineligible_trial_is_feasible_with_its_eligible_value(toy_task_dir: Path, tmp_path: Path) -> None:
    limits, objective = Limits(0.5), TrialObjective()
    scores = {name: 0.5 for name in tracking.SCORE_METRICS}
    epoch_report({**scores, "final_score": 0.55, "mmlu_accuracy": 0.6, "eligible": True}, 1, limits, objective)
    last = epoch_report({**scores, "final_score": 0.7, "mmlu_accuracy": 0.3, "eligible": False}, 2, limits, objective)
    assert (last["objective"], last["objective_epoch"]) == (0.55, 1) and last["objective_mmlu_slack"] <= 0
    searcher = make_searcher(load_config(write_config(tmp_path, toy_task_dir)))
    searcher.suggest("t")
    searcher.on_trial_complete("t", last)  # Tune hands the last report
    (trial,) = searcher.study().trials
    assert trial.value == 0.55 and trial.constraints[MMLU_CONSTRAINT] <= 0


def test_ineligible_epochs_rank_below_eligible_ones_by_how_close_they_came() -> None:
    assert epoch_objective(0.01, 0.0) > epoch_objective(0.99, 0.01) > epoch_objective(0.99, 0.2)


def test_a_run_over_the_time_limit_is_ineligible_as_one_under_the_mmlu_threshold() -> None:
    limits = Limits(mmlu_threshold=0.5, time_limit_s=100.0)
    scores = {"mmlu_accuracy": 0.6, "train_seconds": 80.0}
    assert limits.slacks(scores) == pytest.approx({"mmlu_slack": -0.1, "time_slack": -0.2})
    assert limits.eligible(scores) and not limits.eligible({**scores, "train_seconds": 130.0})
    assert not limits.eligible({**scores, "mmlu_accuracy": 0.4})
    assert Limits(0.5).eligible({**scores, "train_seconds": 1e9})  # no limit set
    objective = TrialObjective()
    base = {name: 0.5 for name in tracking.SCORE_METRICS} | {"mmlu_accuracy": 0.6}
    epoch_report({**base, "final_score": 0.4, "train_seconds": 50.0, "eligible": True}, 1, limits, objective)
    late = epoch_report({**base, "final_score": 0.9, "train_seconds": 150.0, "eligible": False}, 2, limits, objective)
    assert (late["objective"], late["objective_epoch"], late["time_slack"]) == (0.4, 1, 0.5)
    assert late["objective_time_slack"] == pytest.approx(-0.5)


@pytest.mark.e2e
def test_asha_stops_an_ineligible_high_trial_before_an_eligible_lower_one(local_ray, tmp_path: Path) -> None:
    def reports(epochs: list[tuple[float, float]]) -> list[dict]:
        """Each epoch's report, as a trial's EpochReporter would send it (built here, on the driver)."""
        objective = TrialObjective()
        return [
            epoch_report(
                {name: 0.5 for name in tracking.SCORE_METRICS}
                | {"final_score": final, "mmlu_accuracy": mmlu, "eligible": mmlu >= 0.5},
                epoch,
                Limits(0.5),
                objective,
            )
            for epoch, (final, mmlu) in enumerate(epochs, start=1)
        ]

    def scripted_trial(config: dict) -> None:  # nested and import-free: Ray pickles it by value
        try:
            for report in config["reports"]:
                tune.report(report)
        except BaseException as stop:  # how Tune ends a trial ASHA stopped (corpus/compat.py)
            with open(config["stops"], "a") as record:
                record.write(type(stop).__name__ + "\n")
            raise

    # collapsed: a high final score, MMLU far below 0.5
    eligible, collapsed = reports([(0.4, 0.6)] * 4), reports([(0.9, 0.2)] * 4)
    tuner = tune.Tuner(
        scripted_trial,
        param_space={
            "reports": tune.grid_search([eligible, collapsed, eligible, collapsed]),
            "stops": str(tmp_path / "stops.txt"),
        },
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(metric=METRIC, mode=MODE, grace_period=1, reduction_factor=2, max_t=4),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    )
    epochs = {}
    for result in tuner.fit():
        epochs.setdefault("eligible" if result.config["reports"] == eligible else "collapsed", []).append(
            result.metrics["training_iteration"]
        )
    assert max(epochs["collapsed"]) < 4 and max(epochs["eligible"]) == 4, epochs
    # Every trial here is stopped by ASHA at a report: the collapsed ones early, the others at max_t.
    assert (tmp_path / "stops.txt").read_text().split() == [TUNE_STOPPED_TRIAL.__name__] * 4


@pytest.mark.e2e
def test_small_sweep_end_to_end(local_ray, toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = {
        "grad_diff": {"epochs": {"int": [1, 2]}, "learning_rate": {"log_uniform": [1e-4, 4e-4]}},
        "grad_ascent": {"learning_rate": 1.0e6, "epochs": 1},  # diverges to NaN: a deliberately failing trial
    }
    config = load_config(
        write_config(
            tmp_path,
            toy_task_dir,
            methods=["grad_diff", "grad_ascent"],
            trials=5,
            mmlu_threshold=0.8,
            search_space_overrides=overrides,
            eval={},
            keep_checkpoints=1,
        )
    )
    tracking.client(config.tracking_uri).search_experiments()  # the store exists: the UI starts beside the sweep
    with ui_serving(config.tracking_uri, tmp_path / "ui.log") as ui:
        summary = run_sweep(config)
        # The UI, on loopback, browses the sweep's store.
        url = f"{ui}/api/2.0/mlflow/experiments/get-by-name?experiment_name={config.experiment}"
        with urllib.request.urlopen(url, timeout=30) as response:
            found = json.loads(response.read())
        assert found["experiment"]["name"] == config.experiment
    # The live view, not Tune's tables: a line per ended trial (no bar: the output is not a terminal).
    console = capsys.readouterr().out
    assert "started with configuration" not in console and "finished iteration" not in console, (
        console
    )  # Tune's per-trial boxes
    assert re.search(
        r"\[5/5\] trial \w+ \(grad_(diff|ascent)\) (finished|failed).*\| 0 running, \d failed, best \d\.\d{4} "
        r"\(grad_diff\)",
        console,
    )
    assert "top: " in console and "\r" not in console
    assert not logging.getLogger("tensorboardX.x2num").isEnabledFor(
        logging.WARNING
    )  # -inf objectives before a first evaluation
    statuses = {row["trial_id"]: row["status"] for row in summary.rows}
    assert len(statuses) == 5
    failed = [row for row in summary.rows if row["status"] == "failed"]
    assert failed and all(row["method"] == "grad_ascent" for row in failed)
    assert summary.mmlu_threshold == 0.8

    # The best is eligible, and no infeasible trial ranks above a feasible one.
    eligible_flags = [row["eligible"] for row in summary.rows]
    assert eligible_flags == sorted(eligible_flags, reverse=True)
    champion = summary.champion
    assert champion and champion["mmlu_accuracy"] >= 0.8

    mlflow = tracking.client(config.tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.experiment).experiment_id
    children = mlflow.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    assert sorted(run.data.tags["trial_id"] for run in children) == sorted(statuses)
    for run in children:
        assert run.data.tags["status"] == statuses[run.data.tags["trial_id"]]
        assert run.data.tags["method"] in ("grad_diff", "grad_ascent")
        if run.data.tags["status"] == "finished":
            history = mlflow.get_metric_history(run.info.run_id, "final_score")
            # each epoch once (a held epoch is logged when its decision epoch evaluates it)
            assert sorted(m.step for m in history) == list(range(1, len(history) + 1))
            assert {"task_aggregate", "mia_auc", "mia_score", "mmlu_accuracy", "forget_mean", "retain_mean"} <= set(
                run.data.metrics
            )
    # keep_checkpoints 1: of the trials' checkpoints only the champion's stays; the runs of the others say why
    saved = Path(config.storage_path, config.name).glob("trial_*/checkpoint_*/scores.json")
    assert {path.parent.parent.name for path in saved} == {f"trial_{champion['trial_id']}"}
    others = [row for row in summary.rows if row["eligible"] and row["trial_id"] != champion["trial_id"]]
    assert others  # 3 of the 4 grad_diff trials were eligible here
    for row in others:
        removed = mlflow.get_run(row["run_id"]).data.tags.get("checkpoint_removed")
        assert removed.startswith("not among the 1 best configurations") and row["checkpoint"] is None, row
    artifacts = {a.path for a in mlflow.list_artifacts(summary.parent_run_id, "sweep")}
    pictures = {
        "sweep/final_score_vs_mmlu.png",
        "sweep/optimization_history.png",
        "sweep/parallel_coordinates.png",
        "sweep/champion_aggregate_terms.png",
    }
    assert pictures | {"sweep/leaderboard.json"} <= artifacts
    for picture in pictures:  # valid PNGs, not empty files
        with Image.open(mlflow.download_artifacts(summary.parent_run_id, picture, str(tmp_path))) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100

    # The constraint reached Optuna for every trial.
    # The study persists beside the sweep (optuna-dashboard opens it), every trial told with its constraint.
    assert config.study_storage == f"sqlite:///{config.storage_path}/{config.name}/optuna.db"
    study = optuna.load_study(study_name=config.name, storage=config.study_storage)
    assert len(study.trials) == 5 and all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    assert all(MMLU_CONSTRAINT in t.constraints for t in study.trials)
    # Both methods were tried first, whatever the seed.
    assert {t.params["method"] for t in study.trials[:2]} == {"grad_diff", "grad_ascent"}

    # best / export / re-evaluate reproduce the logged score.
    assert leaderboard(config.experiment, config.tracking_uri)[0].scores["final_score"] == pytest.approx(
        champion["final_score"]
    )
    assert main(["best", config.experiment, "--tracking-uri", config.tracking_uri]) == 0
    assert champion["trial_id"] in capsys.readouterr().out
    exported = export_champion(config.experiment, config.tracking_uri, tmp_path / "submission")
    assert (exported / "model.safetensors").exists() and (exported / "trial_config.json").exists()
    sets = EvalSets.load(config.data, mia=config.mia, mmlu=config.mmlu)
    assert evaluate_checkpoint(exported, sets)["final_score"] == pytest.approx(champion["final_score"], abs=1e-9)

    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(config)


@pytest.mark.e2e
def test_the_champion_is_the_configuration_that_held_on_the_held_out_fold(
    local_ray, toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Tuned on the train fold, the best configurations re-run on the validation fold; the
    champion is the best there, and its exported script reproduces its confirmation run."""
    config = load_config(
        write_config(
            tmp_path,
            toy_task_dir,
            trials=3,
            **LIGHT_EVAL,
            confirm={"top_k": 2},
            time_limit_s=3600,
            search_space_overrides={
                "grad_diff": {"epochs": {"int": [1, 3]}, "learning_rate": {"log_uniform": [1e-4, 6e-4]}}
            },
        )
    )
    assert config.select_by == "held_out" and config.confirm.mia == toy_task_dir / "mia" / "validation"
    summary = run_sweep(config)
    assert all(row["status"] == "finished" for row in summary.rows)
    eligible = [row for row in summary.rows if row["eligible"]]
    assert len(summary.confirmations) == min(2, len(eligible)) >= 1
    mlflow = tracking.client(config.tracking_uri)
    by_run = {row["run_id"]: row for row in summary.rows}
    for confirmation in summary.confirmations:
        run = mlflow.get_run(confirmation["run_id"])
        tuned = by_run[run.data.tags["confirms_run"]]
        assert confirmation["trial_id"] == tuned["trial_id"] and tuned["eligible"]
        assert run.data.params["epochs"] == str(tuned["best_epoch"])  # re-run as it would be submitted
        assert run.data.metrics["optimism"] == pytest.approx(
            tuned["final_score"] - confirmation["held_out_final_score"]
        )
        assert run.data.metrics["time_limit_s"] == 3600 and 0 < run.data.metrics["train_seconds"] < 3600
    champion = summary.champion
    held_out = [c for c in summary.confirmations if c["held_out_eligible"]]
    best = max(held_out, key=lambda c: c["held_out_final_score"])
    assert champion["trial_id"] == best["trial_id"]
    assert champion["held_out"]["final_score"] == pytest.approx(best["held_out_final_score"])
    assert leaderboard(config.experiment, config.tracking_uri)[0].trial_id == best["trial_id"]  # best/export: same rule
    version = mlflow.get_model_version_by_alias(config.experiment, "champion")
    assert version.tags["selected_by"] == "held_out"
    parent = mlflow.get_run(summary.parent_run_id).data
    assert parent.metrics["best_held_out_final_score"] == pytest.approx(best["held_out_final_score"])
    assert "optimism_mean" in parent.metrics
    capsys.readouterr()
    _report(summary, config)  # what `unlearn-sweep sweep` prints after the sweep
    report = capsys.readouterr().out
    assert "confirmed on the held-out fold" in report and "mean optimism (tuned - held-out): " in report
    assert all(c["trial_id"] in report for c in summary.confirmations) and "chosen by it" in report

    # The export runs: the script, on the validation fold, gives the confirmation run's score.
    assert (
        main(
            ["export", config.experiment, "--out", str(tmp_path / "submission"), "--tracking-uri", config.tracking_uri]
        )
        == 0
    )
    exported = tmp_path / "submission"
    held_out = champion["held_out"]["final_score"]
    assert json.loads((exported / "confirmation_scores.json").read_text())["final_score"] == pytest.approx(held_out)
    assert f"(held-out final score {held_out:.4f}, tuned {champion['final_score']:.4f})" in capsys.readouterr().out
    configuration = json.loads((exported / "configuration.json").read_text())
    assert configuration["params"]["epochs"] == champion["epoch"]
    data = toy_task_dir / "data"
    unlearned = tmp_path / "unlearned"
    script = subprocess.run(
        [
            sys.executable,
            str(exported / "unlearn.py"),
            str(config.model),
            str(next(data.glob("retain_validation-*.parquet"))),
            str(next(data.glob("forget_validation-*.parquet"))),
            str(unlearned),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as the trial ran: one thread per CPU it held
    )
    assert script.returncode == 0, script.stderr
    sets = EvalSets.load(config.data, "validation", config.confirm.mia, config.mmlu, config.mmlu_shots)
    again = evaluate_checkpoint(unlearned, sets, config.eval)
    assert again["final_score"] == pytest.approx(best["held_out_final_score"], abs=1e-6)


@pytest.mark.e2e
def test_a_trial_given_no_gpu_sees_none(local_ray) -> None:
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES as the node has it for a worker given no GPU: a
    `gpu: 0` trial on a GPU host saw every GPU and the Trainer spread over them all."""
    from unlearn_sweep.orchestrator.trial import only_the_gpus_ray_gave

    @ray.remote(num_cpus=1, num_gpus=0, runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0,1"}})
    def devices_seen() -> tuple[str, str]:
        before = os.environ["CUDA_VISIBLE_DEVICES"]
        only_the_gpus_ray_gave()
        return before, os.environ["CUDA_VISIBLE_DEVICES"]

    assert ray.get(devices_seen.remote()) == ("0,1", "")


@pytest.mark.e2e
def test_merge_stage_merges_trials_already_trained(local_ray, toy_task_dir: Path, tmp_path: Path) -> None:
    stage = {"trials": 2, "space": {"combination": {"choice": ["linear"]}}}
    config = load_config(
        write_config(
            tmp_path,
            toy_task_dir,
            trials=3,
            asha=None,
            merge_stage=stage,
            **LIGHT_EVAL,
            search_space_overrides={"grad_diff": {"epochs": 1, "learning_rate": {"log_uniform": [5e-5, 5e-4]}}},
        )
    )
    summary = run_sweep(config)
    trained = [row for row in summary.rows if row["method"] == "grad_diff"]
    merged = [row for row in summary.rows if row["method"] == "merge"]
    assert len(trained) == 3 and len(merged) == 2 and all(row["status"] == "finished" for row in summary.rows)
    most = min(trained, key=lambda row: row["forget_mean"])
    least = max(trained, key=lambda row: row["forget_mean"])
    mlflow = tracking.client(config.tracking_uri)
    for row in merged:
        run = mlflow.get_run(row["run_id"])
        # Linked to its source runs; merges their saved checkpoints, trains nothing of its own.
        assert run.data.tags["source_runs"] == f"{most['run_id']},{least['run_id']}"
        assert run.data.params["models"] == f"{most['checkpoint']},{least['checkpoint']}"
        assert not any(key.startswith(("over.", "under.")) or key == "learning_rate" for key in run.data.params)
        weights = [float(w) for w in run.data.params["weights"].split(",")]
        tensors = [
            load_file(Path(folder) / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
            for folder in (most["checkpoint"], least["checkpoint"], row["checkpoint"])
        ]
        expected = (weights[0] * tensors[0] + weights[1] * tensors[1]) / sum(
            weights
        )  # mergekit's linear: a weighted average
        assert torch.allclose(tensors[2], expected, atol=1e-6)
    assert len(optuna.load_study(study_name=f"{config.name}-merge", storage=config.study_storage).trials) == 2


def test_merge_sources_are_trained_once_per_configuration(toy_task_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from unlearn_sweep.corpus.semeval import load_task
    from unlearn_sweep.orchestrator import trial

    trained = []
    monkeypatch.setattr(trial, "run_method", lambda *args: trained.append(args) or trial_run_method(*args))
    trial_run_method = run_method
    context = trial_context(toy_task_dir, source_cache=str(tmp_path / "sources"))
    task = load_task(toy_task_dir / "data")
    params = {"epochs": 1, "learning_rate": 1e-4}
    first = trial._source_checkpoint("grad_diff", params, context, task, tmp_path / "scratch-1")
    again = trial._source_checkpoint("grad_diff", dict(params), context, task, tmp_path / "scratch-2")
    other = trial._source_checkpoint(
        "grad_diff", {**params, "learning_rate": 2e-4}, context, task, tmp_path / "scratch-3"
    )
    assert first == again != other and len(trained) == 2 and (first / "model.safetensors").is_file()


# Every NPO source setting fixed: a merge search whose sources recur (trial after trial alike).
FIXED_NPO = {
    "learning_rate": 1e-4,
    "epochs": 1,
    "beta": 0.1,
    "retain_kl_weight": 1.0,
    "retain_ce_weight": 1.0,
    "adapter": "full",
}


def test_merge_sources_are_kept_only_where_they_can_recur(toy_task_dir: Path, tmp_path: Path) -> None:
    """A trained source is a whole model (14 GB at 7B in bf16): the default merge space samples
    its learning rates, so no two trials train the same one and a cache would only grow."""
    assert not sources_can_recur(load_space("merge"))
    fixed = {"sources": {"over": {**FIXED_NPO, "adapter": {"choice": ["full", "lora"]}}, "under": FIXED_NPO}}
    assert sources_can_recur(load_space("merge", fixed))

    def source_cache(**overrides) -> str | None:
        config = load_config(write_config(tmp_path, toy_task_dir, methods=["merge"], **overrides))
        return TrialContext.for_sweep(config, str(tmp_path / "runs" / "s1"), "0", "parent", None, [1]).source_cache

    assert source_cache(search_space_overrides={}) is None
    assert source_cache(search_space_overrides={"merge": fixed}) == str(tmp_path / "runs" / "s1" / "sources")


@pytest.mark.parametrize(
    "methods, overrides, field",
    [
        (["grad_diff"], {"grad_diff": {"max_length": 40}}, "grad_diff.max_length"),
        (["grad_diff"], {"grad_diff": {"max_length": {"choice": [16, 48]}}}, "grad_diff.max_length"),
        (
            ["merge"],
            {"merge": {"sources": {"over": FIXED_NPO, "under": {**FIXED_NPO, "max_length": 40}}}},
            "merge.sources.under.max_length",
        ),
    ],
)
def test_a_max_length_that_cuts_the_data_is_refused_before_mlflow(
    methods: list[str], overrides: dict, field: str, toy_task_dir: Path, tmp_path: Path
) -> None:
    """A cap shorter than the rows trials train on cut the end of their answers in every trial,
    silently (LUME's longest rows are about 400 of OLMo's tokens; the default cap was 256)."""
    config = load_config(write_config(tmp_path, toy_task_dir, methods=methods, search_space_overrides=overrides))
    with pytest.raises(
        ConfigError,
        match=rf"field 'search_space_overrides\.{re.escape(field)}': \w+: max_length (40|48) cuts \d+ of the 240 "
        r"forget and retain examples \(the longest is 91 tokens\) of the data with the model's tokenizer; their "
        r"answers would be cut in every trial: give max_length 91 or more",
    ):
        run_sweep(config)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.e2e
def test_a_completed_merge_search_trained_its_sources_once_and_deletes_them(
    local_ray, toy_task_dir: Path, tmp_path: Path
) -> None:
    fixed = {"sources": {"over": FIXED_NPO, "under": {**FIXED_NPO, "learning_rate": 5e-5}}, "combination": "linear"}
    config = load_config(
        write_config(
            tmp_path,
            toy_task_dir,
            methods=["merge"],
            trials=2,
            max_concurrent_trials=1,
            search_space_overrides={"merge": fixed},
            **LIGHT_EVAL,
        )
    )
    summary = run_sweep(config)
    assert [row["status"] for row in summary.rows] == ["finished", "finished"]
    mlflow = tracking.client(config.tracking_uri)
    used = {mlflow.get_run(row["run_id"]).data.tags["source_checkpoints"] for row in summary.rows}
    assert len(used) == 1  # the second trial merged the first one's sources
    cache = Path(config.storage_path) / config.name / "sources"
    assert all(Path(path).parent == cache for path in next(iter(used)).split(","))
    assert not cache.exists()


@pytest.mark.e2e
def test_a_trial_that_can_never_be_placed_or_a_disk_without_room_is_refused_before_mlflow(
    local_ray, toy_task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, toy_task_dir, name="too-big", resources_per_trial={"cpu": 64})
    with pytest.raises(
        ConfigError, match=r"field 'resources_per_trial': a trial needs 64 CPU, and this machine's Ray has 2"
    ):
        run_sweep(load_config(path))
    assert not (tmp_path / "mlflow.db").exists()
    # A file system that cannot hold the checkpoints the sweep may keep, with as many trials
    # running as this Ray holds: refused, nothing written.
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 5 * 2**20)
    config = load_config(write_config(tmp_path, toy_task_dir, name="too-full", trials=8))
    with pytest.raises(ConfigError, match=r"field 'storage_path': .* has 0.0 GiB free, .*, 2 running\); lower"):
        run_sweep(config)
    assert not (tmp_path / "mlflow.db").exists() and list(Path(config.storage_path).iterdir()) == []


@pytest.mark.e2e
def test_sweep_whose_every_trial_fails_exits_non_zero(
    local_ray, toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_config(
        tmp_path,
        toy_task_dir,
        name="all-fail",
        methods=["grad_ascent"],
        trials=2,
        search_space_overrides={"grad_ascent": {"learning_rate": 1.0e6, "epochs": 1}},
    )  # the loss diverges
    assert main(["sweep", str(path)]) == 1
    error = capsys.readouterr().err
    assert "all 2 trials of sweep 'all-fail' failed; most common error (2x): FloatingPointError: " in error
    mlflow = tracking.client(load_config(path).tracking_uri)
    parent = mlflow.search_runs(
        [mlflow.get_experiment_by_name("all-fail").experiment_id], filter_string="tags.role = 'sweep'"
    )[0]
    assert parent.info.status == "FAILED"


def test_ui_refuses_a_store_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """(Serving a sweep's store on loopback: test_small_sweep_end_to_end.)"""
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2  # no store there: refused, none created
    assert "no MLflow store here" in capsys.readouterr().err and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("port", ["taken", 0, 65536])
def test_ui_refuses_a_port_it_cannot_serve_on(
    port, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """MLflow's server logs a port it cannot bind and exits 0: the UI said it served, and ended (the
    default 5000 is often taken). Now one line and exit 2, before MLflow starts."""
    store = f"sqlite:///{tmp_path}/m.db"
    tracking.client(store).search_experiments()
    capsys.readouterr()
    monkeypatch.setattr(subprocess, "Popen", lambda *command, **options: pytest.fail(f"started {command}"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        if port == "taken":
            port = holder.getsockname()[1]
        assert main(["ui", "--port", str(port), "--tracking-uri", store]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"unlearn-sweep: error: --port {port}: ") and error.count("\n") == 1, error


JOBS = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def ui_with_stand_in(server: str, port: int, store: str, check_port: bool = True) -> str:
    """Python code running `unlearn-sweep ui` with the Python program `server` in MLflow's place
    (other processes start as they would: MLflow's import runs `uname`)."""
    return f"""if True:
        import subprocess, sys
        from unlearn_sweep.orchestrator import cli
        start = subprocess.Popen
        def stand_in(command, **options):
            is_mlflow = command[1:3] == ["-m", "mlflow"]
            return start([sys.executable, "-c", {server!r}] if is_mlflow else command, **options)
        subprocess.Popen = stand_in
        if not {check_port}:
            cli._check_port_free = lambda port: None
        sys.exit(cli.main(["ui", "--port", "{port}", "--tracking-uri", "{store}"]))"""


def test_ui_fails_when_the_server_ends_by_itself(tmp_path: Path) -> None:
    """A port taken between our check and MLflow's bind: MLflow logs it and exits 0, and so did
    `unlearn-sweep ui`, after saying it served. A server that ends without being stopped failed.
    (The stop by SIGTERM: test_small_sweep_end_to_end, through ui_serving.)"""
    store = f"sqlite:///{tmp_path}/m.db"
    tracking.client(store).search_experiments()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # The race, made certain and quick: our check passes, and the server (a stand-in for
        # MLflow, which takes 20 s to get there) reports the taken port and exits 0.
        # It also says whether MLflow's job runner (7 more processes, 1.8 GB) would start.
        jobs = tmp_path / "jobs"
        server = f"import os; print('in use'); open({str(jobs)!r}, 'w').write(os.environ.get({JOBS!r}, 'unset'))"
        code = ui_with_stand_in(server, port, store, check_port=False)
        ui = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ui.returncode == 1, ui.stderr[-3000:]
    assert ui.stderr.endswith("error: the MLflow UI ended by itself (exit code 0); its log above says why\n")
    assert jobs.read_text() == "false"


@contextlib.contextmanager
def ui_serving_a_stand_in(tmp_path: Path, server_setup: str = "pass") -> Iterator[tuple[subprocess.Popen, int, Path]]:
    """`unlearn-sweep ui` once its stand-in for MLflow (running `server_setup` first) is up: the
    `ui` process, the stand-in's pid and `ui`'s log; both processes are killed after."""
    store = f"sqlite:///{tmp_path}/m.db"
    tracking.client(store).search_experiments()
    pid_file = tmp_path / "server.pid"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = (
        f"import os, signal, time; {server_setup}; "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    )
    log = tmp_path / "ui.log"  # not a pipe: a server left running would hold it open
    with log.open("w") as output:
        ui = subprocess.Popen(
            [sys.executable, "-c", ui_with_stand_in(server, port, store)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_until_ready(ui, lambda ui: pid_file.exists() and bool(pid_file.read_text()), log)
        yield ui, int(pid_file.read_text()), log
    finally:
        ui.kill()
        ui.wait()
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):  # one a stop left
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_a_second_ctrl_c_kills_a_ui_server_that_is_slow_to_stop(tmp_path: Path) -> None:
    """The first Ctrl-C asks the server's tree to stop (SIGTERM); a second one sent SIGTERM again,
    so a server that did not stop kept `ui` waiting. Now it kills the tree."""
    # A stand-in for MLflow that ignores SIGTERM.
    with ui_serving_a_stand_in(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN)") as (ui, server, log):
        ui.send_signal(signal.SIGINT)
        time.sleep(2)
        assert ui.poll() is None  # the stand-in ignored the first stop
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert gone_within(server, 10)


def test_closing_the_terminal_stops_the_ui_server(tmp_path: Path) -> None:
    """A closed terminal or ssh session sends SIGHUP to `ui`; the server runs in its own session,
    so it gets none: `ui` ended and left MLflow serving, its port taken for the next `ui`."""
    with ui_serving_a_stand_in(tmp_path) as (ui, server, log):
        ui.send_signal(signal.SIGHUP)
        assert ui.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert gone_within(server, 10)


def test_a_killed_ui_takes_its_server_with_it(tmp_path: Path) -> None:
    """`kill -9` or the OOM killer ends `ui` with no handler run: its server, in its own session,
    kept serving and held the port the next `ui` asks for."""
    with ui_serving_a_stand_in(tmp_path) as (ui, server, log):
        ui.kill()
        ui.wait()
        assert gone_within(server, 10), log.read_text()[-3000:]


@contextlib.contextmanager
def loopback_server(command: list[str], log: Path) -> Iterator[str]:
    """A server `command` (+ `--port`) on a free loopback port, in the background, once it answers;
    its address. The port is probed free first, so another process (Ray's, the other test
    worker's) may take it before the server binds it: then another port, not an error (a failed
    CI run waited on a UI that had exited). Any other early exit fails with the server's output."""
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with log.open("w") as output:
            server = subprocess.Popen(
                [*command, "--port", str(port)], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}"
        try:
            if answers(f"{url}/health", server):
                yield url
                assert server.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
                stop(server)
                # What it started stops with it (`unlearn-sweep ui` runs MLflow in its own group).
                assert silent_within(f"{url}/health", seconds=30), f"{url} still answers after the stop"
                return
            assert server.poll() is not None, f"no answer at {url}:\n{log.read_text()[-3000:]}"
        finally:
            stop(server)
        output = log.read_text()
        assert re.search("is taken|address already in use", output), f"exited before serving:\n{output[-3000:]}"
    pytest.fail(f"three free ports were taken before the server bound them:\n{output[-3000:]}")


def answers(url: str, server: subprocess.Popen, seconds: float = 180) -> bool:
    """Whether a starting server answers at url; False once it exits or after `seconds`."""
    deadline = time.time() + seconds
    while server.poll() is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return True
        except OSError:
            time.sleep(1)
    return False


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the process group a server started in (nothing once the group is gone); its end."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    server.wait()


def silent_within(url: str, seconds: float) -> bool:
    """Whether nothing answers at url within `seconds` (a stopped server's children shut down)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                time.sleep(0.5)
        except OSError:
            return True
    return False


def ui_serving(tracking_uri: str, log: Path) -> contextlib.AbstractContextManager[str]:
    """`unlearn-sweep ui` of a store."""
    command = [sys.executable, "-m", "unlearn_sweep.orchestrator.cli", "ui", "--tracking-uri", tracking_uri]
    return loopback_server(command, log)


def mlflow_server(folder: Path) -> contextlib.AbstractContextManager[str]:
    """`mlflow server` (SQLite backend, proxied artifacts), as on a cluster."""
    folder.mkdir(parents=True, exist_ok=True)
    command = ["env", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"]  # as cluster.yaml starts it
    command += [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/server.db"]
    command += ["--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--workers", "1"]
    return loopback_server(command, folder / "server.log")


def test_reading_a_config_loads_no_torch() -> None:
    """A config is read on the driver (a cluster's CPU-only head) and by plan/validate: the
    evaluation backends' facts it checks come without torch or transformers."""
    code = "import sys, unlearn_sweep.orchestrator.config; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
