"""The one selection rule behind the sweep's leaderboard, `best`, `export` and the champion
alias: which trial runs count, in which order, and registration that never repeats itself."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import terminated_when
from transformers import AutoModelForCausalLM
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.cli import main
from unlearn_sweep.orchestrator.selection import Entry, crown, leaderboard, select

TOY_MODEL: Path


def entry(
    trial_id: str,
    final: float | None,
    mmlu: float = 0.5,
    status: str = "finished",
    threshold: float | None = 0.4,
    checkpoint: str | None = "/ckpt",
) -> Entry:
    scores = {} if final is None else {"final_score": final, "mmlu_accuracy": mmlu, "epoch": 1.0}
    return Entry(f"run-{trial_id}", trial_id, "npo", status, {}, scores, checkpoint, threshold)


def test_only_finished_eligible_trials_with_a_checkpoint_count() -> None:
    entries = [
        entry("failed", 0.9, status="failed"),
        entry("killed", 0.9, status="interrupted"),
        entry("running", 0.9, status="running"),
        entry("no-eligible-epoch", None),
        entry("no-checkpoint", 0.9, checkpoint=None),
        entry("below-own-threshold", 0.9, mmlu=0.3),
        entry("b", 0.5),
        entry("a", 0.5),
        entry("best", 0.6),
    ]
    assert [e.trial_id for e in select(entries)] == ["best", "a", "b"]  # ties: the earlier trial id
    # Under a stricter (current sweep's) threshold, a trial eligible under its own is not.
    assert [
        e.trial_id for e in select([entry("low", 0.9, mmlu=0.45), entry("high", 0.5, mmlu=0.6)], threshold=0.5)
    ] == ["high"]


def test_by_held_out_only_confirmed_trials_count_ranked_by_their_confirmation() -> None:
    """The rule SemEval judged by: the configuration's score on data it was not tuned on."""
    tuned = [entry("a", 0.9), entry("b", 0.7), entry("c", 0.8), entry("unconfirmed", 0.95)]

    def confirmation(of: str, final: float, mmlu: float = 0.5) -> Entry:
        return dataclasses.replace(entry(f"confirm-{of}", final, mmlu), confirms=f"run-{of}")

    confirmations = [confirmation("a", 0.5), confirmation("b", 0.6), confirmation("c", 0.9, mmlu=0.2)]
    entries = tuned + confirmations
    assert [e.trial_id for e in select(entries)] == ["unconfirmed", "a", "c", "b"]  # tuned: confirmations never rank
    ranked = select(entries, by="held_out")
    assert [e.trial_id for e in ranked] == ["b", "a"]  # c's confirmation is below its MMLU threshold
    assert ranked[0].held_out["final_score"] == 0.6 and ranked[0].scores["final_score"] == 0.7


def test_best_prints_the_scores_its_order_comes_from(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Ranked by held-out score, `best` printed the tuned scores alone: its first trial showed a
    lower final score than its second, and not the score it was chosen by."""
    from unlearn_sweep.orchestrator import cli

    def confirmation(of: str, final: float) -> Entry:
        return dataclasses.replace(entry(f"confirm-{of}", final), confirms=f"run-{of}")

    ranked = select([entry("a", 0.9), entry("b", 0.7), confirmation("a", 0.5), confirmation("b", 0.6)], by="held_out")
    monkeypatch.setattr("unlearn_sweep.orchestrator.selection.leaderboard", lambda *args: ranked)
    monkeypatch.setattr(cli, "_existing_store", lambda uri: uri)
    assert main(["best", "exp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "best eligible trial of 'exp' by held-out final score: b (npo), epoch 1"
    assert out[1:4] == [
        f"  {'':<15}   tuned held-out",
        "  final_score      0.7000   0.6000",
        "  mmlu_accuracy    0.5000   0.5000",
    ]
    assert out[-3:] == [
        "rank trial      method         final task agg    MIA   MMLU held-out  eligible",
        "1    b          npo            0.700        -      -  0.500    0.600  True",
        "2    a          npo            0.900        -      -  0.500    0.500  True",
    ]
    # Under a stricter threshold than its own sweep's, the best may be a trial whose checkpoint went.
    gone = dataclasses.replace(entry("c", 0.8), checkpoint_removed="not among the 5 best configurations of its search")
    monkeypatch.setattr("unlearn_sweep.orchestrator.selection.leaderboard", lambda *args: [gone])
    assert main(["best", "exp"]) == 0
    assert "  checkpoint: /ckpt (removed: not among the 5 best configurations of its search)" in capsys.readouterr().out


def fake_trial(
    mlflow, experiment: str, parent: str, folder: Path, trial_id: str, final: float, mmlu: float, threshold: float
) -> str:
    """A finished trial run as a sweep leaves it: best_* metrics and its checkpoint folder (the
    toy model, its scores and trial config)."""
    run_id = tracking.trial_run(mlflow, experiment, parent, trial_id, {"method": "npo", "params": {}}, threshold)
    scores = {name: 0.5 for name in tracking.SCORE_METRICS} | {"final_score": final, "mmlu_accuracy": mmlu}
    tracking.log_best(mlflow, run_id, 1, scores)
    checkpoint = Path(shutil.copytree(TOY_MODEL, folder / trial_id))
    (checkpoint / "scores.json").write_text(json.dumps(scores))
    (checkpoint / "trial_config.json").write_text(json.dumps({"method": "npo", "params": {}, "epoch": 1}))
    mlflow.set_tag(run_id, "checkpoint", str(checkpoint))
    tracking.finish_trial(mlflow, run_id, "finished")
    return run_id


@pytest.fixture(autouse=True)
def toy_model(toy_task_dir: Path) -> None:
    global TOY_MODEL
    TOY_MODEL = toy_task_dir / "model"


def test_crown_registers_once_and_never_moves_to_an_ineligible_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = tracking.client(uri)
    experiment = tracking.experiment_id(mlflow, "exp")
    first = mlflow.create_run(experiment, tags={"role": "sweep"}).info.run_id
    high = fake_trial(mlflow, experiment, first, tmp_path, "t1", final=0.8, mmlu=0.45, threshold=0.4)
    end_time = mlflow.get_run(high).info.end_time
    with pytest.MonkeyPatch.context() as patch:  # registered from its folder: never loaded on the driver
        patch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: pytest.fail("model loaded"))
        champion, version = crown(mlflow, uri, "exp", experiment, 0.4)
    assert (champion.run_id, version) == (high, "1")
    assert crown(mlflow, uri, "exp", experiment, 0.4)[1] == "1"  # run again (resume, re-run): the same version
    assert len(mlflow.search_model_versions("name = 'exp'")) == 1
    # The champion is a real MLflow model: the Transformers flavour loads it and it generates.
    import mlflow as fluent

    fluent.set_tracking_uri(uri)
    generator = fluent.transformers.load_model("models:/exp@champion")
    assert isinstance(generator("Alma was", max_new_tokens=4)[0]["generated_text"], str)
    source = mlflow.get_model_version("exp", "1").source  # models:/<logged model id>, linked to the trial's run
    logged = fluent.get_logged_model(source.removeprefix("models:/"))
    assert logged.source_run_id == high and "champion_final_score" in {metric.key for metric in logged.metrics or []}
    registered = Path(
        fluent.artifacts.download_artifacts(
            f"{logged.artifact_location}/model/model.safetensors", dst_path=str(tmp_path)
        )
    )
    assert registered.read_bytes() == (tmp_path / "t1" / "model.safetensors").read_bytes()  # the weights, as saved
    assert mlflow.get_run(high).info.end_time == end_time  # registering did not move the trial's end
    capsys.readouterr()
    assert main(["export", "exp", "--out", str(tmp_path / "submission"), "--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    assert "(final score 0.8000 on the fold it was tuned on)" in out.splitlines()[0]
    assert "Downloading artifacts" not in err  # MLflow's bars: on a terminal only, as the model libraries'
    exported = tmp_path / "submission"
    assert {"model.safetensors", "config.json", "tokenizer.json", "scores.json", "trial_config.json"} <= {
        p.name for p in exported.iterdir()
    }
    assert not (exported / "confirmation_scores.json").exists()  # selected on the fold it was tuned on

    # A later sweep with a stricter threshold: its lower but eligible trial takes the alias;
    # the earlier champion (MMLU 0.45 < 0.5) is not eligible under it.
    second = mlflow.create_run(experiment, tags={"role": "sweep"}).info.run_id
    eligible = fake_trial(mlflow, experiment, second, tmp_path, "t2", final=0.6, mmlu=0.55, threshold=0.5)
    champion, version = crown(mlflow, uri, "exp", experiment, 0.5)
    assert (champion.run_id, version) == (eligible, "2")
    assert mlflow.get_model_version_by_alias("exp", "champion").run_id == eligible
    # best, export and the alias agree: the leaderboard's first entry is the champion.
    assert leaderboard("exp", uri)[0].run_id == eligible
    # Nothing eligible under an even stricter threshold: the alias stays.
    assert crown(mlflow, uri, "exp", experiment, 0.9) is None
    assert mlflow.get_model_version_by_alias("exp", "champion").run_id == eligible


def test_a_trial_started_again_gets_a_new_run_and_closes_the_old(tmp_path: Path) -> None:
    mlflow = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracking.experiment_id(mlflow, "exp")
    parent = mlflow.create_run(experiment, tags={"role": "sweep"}).info.run_id
    setup = {"method": "npo", "params": {"beta": 0.1}}
    first = tracking.trial_run(mlflow, experiment, parent, "t1", setup, 0.4)
    tracking.log_scores(mlflow, first, 1, {name: 0.5 for name in tracking.SCORE_METRICS} | {"per_task": {}})
    second = tracking.trial_run(mlflow, experiment, parent, "t1", setup, 0.4)
    assert second != first
    old, new = mlflow.get_run(first), mlflow.get_run(second)
    assert (old.info.status, old.data.tags["status"]) == ("KILLED", "interrupted")
    assert (new.info.status, new.data.tags["attempt"], new.data.metrics["mmlu_threshold"]) == ("RUNNING", "2", 0.4)
    assert not mlflow.get_metric_history(second, "final_score")  # the new attempt starts with no steps


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_failed_and_interrupted_runs_are_never_on_the_leaderboard(status: str, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = tracking.client(uri)
    experiment = tracking.experiment_id(mlflow, "exp")
    parent = mlflow.create_run(experiment, tags={"role": "sweep"}).info.run_id
    run_id = fake_trial(mlflow, experiment, parent, tmp_path, "t1", final=0.8, mmlu=0.45, threshold=0.4)
    mlflow.set_tag(run_id, "status", status)
    assert leaderboard("exp", uri) == [] and crown(mlflow, uri, "exp", experiment, 0.4) is None


def test_a_trial_run_killed_while_it_is_being_closed_is_never_left_open_as_finished(tmp_path: Path) -> None:
    """Tune may kill a stopped trial's worker inside finish_trial: whichever write it reached,
    the run is either still tagged running (the sweep closes it) or ended, never tagged
    finished while MLflow shows it running (the CI failure: a finished trial with no end time)."""
    mlflow = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracking.experiment_id(mlflow, "exp")
    parent = mlflow.create_run(experiment).info.run_id

    class KilledAfterOneWrite:
        """The client, until its first write after a read: then the worker is gone."""

        def __init__(self) -> None:
            self.writes = 0

        def __getattr__(self, name: str):
            call = getattr(mlflow, name)
            if name.startswith("get_"):
                return call

            def write(*args, **kwargs):
                if self.writes:
                    raise SystemExit("killed")
                self.writes += 1
                return call(*args, **kwargs)

            return write

    for close in (lambda client, run_id: tracking.finish_trial(client, run_id, "finished"), tracking.mark_interrupted):
        run_id = tracking.trial_run(mlflow, experiment, parent, "t1", {"method": "npo", "params": {}}, 0.4)
        with pytest.raises(SystemExit):
            close(KilledAfterOneWrite(), run_id)
        run = mlflow.get_run(run_id)
        assert run.data.tags["status"] == "running" or run.info.status != "RUNNING"


def test_the_exported_script_prints_its_line_alone(toy_task_dir: Path, tmp_path: Path) -> None:
    """The organizers run `unlearn.py` and read its output: DeepSpeed's guess of the CPU (on
    stdout), bitsandbytes' missing-kernels notice and the weight-loading bars came with its line."""
    from unlearn_sweep.orchestrator.submission import write_submission

    exported = tmp_path / "submission"
    exported.mkdir()
    write_submission(exported, {"method": "grad_ascent", "params": {"epochs": 1}, "epoch": 1})
    data, model, out = toy_task_dir / "data", toy_task_dir / "model", tmp_path / "out"
    sets = [next(data.glob(f"{name}_validation-*.parquet")) for name in ("retain", "forget")]
    unset = ("DS_ACCELERATOR", "HF_HUB_DISABLE_PROGRESS_BARS")  # as a fresh shell has them
    environment = {key: value for key, value in os.environ.items() if key not in unset}
    done = subprocess.run(
        [sys.executable, str(exported / "unlearn.py"), str(model), *map(str, sets), str(out)],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    assert (done.stdout, done.stderr) == (f"unlearned {model} with grad_ascent into {out}\n", "")


def test_the_exported_script_stopped_at_its_time_limit_leaves_nothing(toy_task_dir: Path, tmp_path: Path) -> None:
    """SemEval ran each team's script under a time limit; `timeout` stops it with SIGTERM, which
    ended it at once: the merge's trained sources (under TMPDIR) and the staging folder stayed,
    whole models at 7B. It now stops as on Ctrl-C: exit 130, one line, nothing left."""
    from unlearn_sweep.orchestrator.submission import write_submission

    exported, scratch, out = tmp_path / "submission", tmp_path / "tmp", tmp_path / "out"
    exported.mkdir()
    scratch.mkdir()
    long = {"epochs": 500, "learning_rate": 1e-5}  # far longer than the test waits
    setup = {"method": "merge", "params": {}, "source_method": "grad_diff", "sources": {"a": long, "b": long}}
    write_submission(exported, {**setup, "epoch": 1})
    data, model = toy_task_dir / "data", toy_task_dir / "model"
    sets = [next(data.glob(f"{name}_validation-*.parquet")) for name in ("retain", "forget")]
    command = [sys.executable, str(exported / "unlearn.py"), str(model), *map(str, sets), str(out)]
    code, output = terminated_when(
        command,
        lambda script: any(scratch.glob("*/*/sources-*/.a.*")),  # the first source in training (corpus/scratch.py)
        tmp_path / "log",
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert code == 130 and output.endswith("unlearn.py: interrupted\n"), output[-2000:]
    assert [path.name for path in scratch.rglob("*")] == [f"unlearn-sweep-{os.getuid()}"] and not out.exists()


def test_an_exported_configuration_runs_over_several_processes_under_torchrun(toy_task_dir: Path, tmp_path: Path):
    """A champion trained over several GPUs (ZeRO) does not fit one: its unlearn.py runs under
    torchrun. Every rank renamed its own staging folder onto the output: the output held rank 1's
    unlearn_config.json alone, and rank 0 failed. Now every rank trains, rank 0 writes; a merge's
    sources are trained by all, merged by rank 0; the model is the one process's."""
    from safetensors.torch import load_file
    from unlearn_sweep.corpus.semeval import load_task_files
    from unlearn_sweep.orchestrator.submission import run_configuration, write_submission

    sources = {name: {"epochs": 1, "learning_rate": rate, "zero_stage": 2} for name, rate in (("a", 3e-4), ("b", 1e-4))}
    setup = {"method": "merge", "params": {"combination": "linear"}, "source_method": "grad_diff", "sources": sources}
    exported, scratch, out = tmp_path / "submission", tmp_path / "tmp", tmp_path / "out"
    exported.mkdir()
    scratch.mkdir()
    write_submission(exported, {**setup, "epoch": 1})
    data, model = toy_task_dir / "data", toy_task_dir / "model"
    sets = [next(data.glob(f"{name}_validation-*.parquet")) for name in ("retain", "forget")]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(exported / "unlearn.py")]
        + [str(model), *map(str, sets), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert (done.returncode, done.stdout) == (0, f"unlearned {model} with merge into {out}\n"), done.stderr[-3000:]
    assert json.loads((out / "unlearn_config.json").read_text())["method"] == "merge"
    assert list((scratch / f"unlearn-sweep-{os.getuid()}").iterdir()) == []  # no rank left a model behind
    one_process = run_configuration(setup, model, load_task_files(sets[1], sets[0]), tmp_path / "one")
    alone, launched = load_file(one_process / "model.safetensors"), load_file(out / "model.safetensors")
    for key, tensor in launched.items():
        torch.testing.assert_close(tensor, alone[key], rtol=0, atol=1e-5)


def test_an_exported_merge_trains_its_sources_then_merges_them(toy_task_dir: Path, tmp_path: Path) -> None:
    """`unlearn.py` of a merge champion re-runs the whole configuration: each source trained
    from the input model with its own settings, then merged (here: their average)."""
    from safetensors.torch import load_file
    from unlearn_sweep.corpus.semeval import load_task
    from unlearn_sweep.methods.registry import run_method
    from unlearn_sweep.orchestrator.submission import run_configuration

    sources = {"over": {"epochs": 1, "learning_rate": 3e-4}, "under": {"epochs": 1, "learning_rate": 1e-4}}
    setup = {"method": "merge", "params": {"combination": "linear"}, "source_method": "grad_diff", "sources": sources}
    task, model = load_task(toy_task_dir / "data"), toy_task_dir / "model"
    merged = load_file(run_configuration(setup, model, task, tmp_path / "merged") / "model.safetensors")
    alone = [
        load_file(run_method("grad_diff", model, task, tmp_path / name, params) / "model.safetensors")
        for name, params in sources.items()
    ]
    assert alone[0].keys() == merged.keys()
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, (alone[0][key] + alone[1][key]) / 2, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "merged" / "unlearn_config.json").read_text())["method"] == "merge"
