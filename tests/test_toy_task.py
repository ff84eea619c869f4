"""The miniature task: deterministic on any machine, two folds as the release has them, really
memorised by its base model, and a real trade-off."""

from __future__ import annotations

import copy
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import terminated_when
from transformers import AutoModelForCausalLM, AutoTokenizer
from unlearn_sweep.corpus.mia import default_held_out, load_held_out, load_mia
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.corpus.toy_task import PUBLISHED_FINGERPRINT, build_toy_task, write_toy_task
from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
from unlearn_sweep.evaluation.options import EvalOptions

REPO_ROOT = Path(__file__).resolve().parents[1]


def load(toy_task_dir: Path):
    return AutoModelForCausalLM.from_pretrained(toy_task_dir / "model").eval(), AutoTokenizer.from_pretrained(
        toy_task_dir / "model"
    )


def test_data_is_a_pure_function_of_the_seed() -> None:
    assert build_toy_task(3) == build_toy_task(3)
    assert build_toy_task(3).folds["train"].forget_rows != build_toy_task(4).folds["train"].forget_rows


def test_the_same_seed_writes_identical_files_whatever_the_callers_threads_and_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built here (2 threads, this CPU's own ATen kernels) and in a process with one thread and
    ATen's plain kernels: the caller settings that changed the weights before they were pinned."""
    first, second = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # not the one thread conftest gives processes under xdist
    write_toy_task(first, seed=5, epochs=1)
    code = (
        f"from unlearn_sweep.corpus.toy_task import write_toy_task; write_toy_task({str(second)!r}, seed=5, epochs=1)"
    )
    environment = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], env=environment, check=True, cwd=REPO_ROOT)
    files = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert {"model/model.safetensors", "model/tokenizer.json", "data/forget_train-00000-of-00001.parquet"} <= set(files)
    match, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
    assert mismatch == [] and errors == []


def test_the_default_build_has_the_published_fingerprint(toy_task_dir: Path) -> None:
    """The README states this fingerprint: every figure measured on the toy task is measured on these weights."""
    manifest = json.loads((toy_task_dir / "toy_task.json").read_text())
    assert manifest["weights_sha256"] == PUBLISHED_FINGERPRINT, "the toy model differs from the published one"
    assert PUBLISHED_FINGERPRINT in (REPO_ROOT / "README.md").read_text()


def test_two_folds_as_the_release_lays_them_out(toy_task_dir: Path) -> None:
    folds = {split: load_task(toy_task_dir / "data", split) for split in ("train", "validation")}
    assert [len(folds[s].forget) for s in folds] == [120, 60] and [len(folds[s].retain) for s in folds] == [120, 60]
    for fold in folds.values():  # every task, both kinds of row, in both sets
        assert {(row.split, row.task, row.kind) for row in fold.rows()} == {
            (split, task, kind)
            for split in ("forget", "retain")
            for task in ("Task1", "Task2", "Task3")
            for kind in ("sc", "qa")
        }
    ids = [{row.id for row in fold.rows()} for fold in folds.values()]
    assert not ids[0] & ids[1]
    mia = {"train": load_mia(toy_task_dir / "mia"), "validation": load_mia(toy_task_dir / "mia" / "validation")}
    for split, documents in mia.items():
        members = {doc.id for doc in documents if doc.membership == "member"}
        assert members == {row.id[:-3].strip('"') for row in folds[split].forget if row.kind == "sc"}
    # The held-out documents a method calibrates on are in no scored set, of either fold.
    held_out = default_held_out(toy_task_dir / "mia")
    assert held_out == toy_task_dir / "mia" / "held_out.jsonl"
    for scored in (toy_task_dir / "mia", toy_task_dir / "mia" / "validation"):
        assert len(load_held_out(held_out, scored)) == 24
    scored_texts = {doc.document for documents in mia.values() for doc in documents}
    documents = {f"{row.input} {row.output}" for fold in folds.values() for row in fold.rows() if row.kind == "sc"}
    assert not set(load_held_out(held_out, None)) & (scored_texts | documents)


@pytest.mark.parametrize("split, mia", [("train", "mia"), ("validation", "mia/validation")])
def test_base_model_has_memorised_both_folds(split: str, mia: str, toy_task_dir: Path) -> None:
    sets = EvalSets.load(toy_task_dir / "data", split, toy_task_dir / mia, toy_task_dir / "mmlu")
    scores = evaluate_checkpoint(toy_task_dir / "model", sets, EvalOptions(dtype="float32"))
    means = {
        (s, task, term): value
        for s in ("forget", "retain")
        for task, terms in scores["per_task"][s].items()
        for term, value in terms.items()
    }
    assert len(means) == 12 and min(means.values()) >= 0.8, means
    assert scores["mia_auc"] >= 0.95 and scores["mmlu_accuracy"] >= 0.85, scores


def test_plain_gradient_ascent_hurts_the_retain_set(toy_task_dir: Path) -> None:
    model, tokenizer = load(toy_task_dir)
    model = copy.deepcopy(model)
    task = load_task(toy_task_dir / "data")

    def documents(rows):
        return tokenizer([f"{r.input} {r.output}" for r in rows if r.kind == "sc"], return_tensors="pt", padding=True)

    def mean_loss(batch) -> float:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss

    forget, retain = documents(task.forget), documents(task.retain)
    with torch.no_grad():
        forget_before, retain_before = mean_loss(forget).item(), mean_loss(retain).item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(12):
        (-mean_loss(forget)).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        forget_after, retain_after = mean_loss(forget).item(), mean_loss(retain).item()
    assert forget_after > 5 * forget_before
    # Shared templates: ascent on forget drags retain up with it, by a large factor too.
    assert retain_after > 2.5 * retain_before


def test_a_stopped_build_leaves_nothing_behind(tmp_path: Path) -> None:
    """SIGTERM (a scheduler's stop) ended a command at once: its hidden staging folder stayed
    (for `unlearn` at 7B, a whole model) and the toy task's training process ran on. It now
    stops it as Ctrl-C does: exit 130 with one line, no folder, no process left. (A hang-up
    too: tests/test_sweep_lifecycle.py.)"""
    work, trainer = tmp_path / "work", []
    work.mkdir()

    def training(build: subprocess.Popen) -> bool:  # the base model's training child has started
        trainer[:] = psutil.Process(build.pid).children()
        if trainer:  # by then the output is being written in its staging folder
            assert [path.name.startswith(".task.") for path in work.iterdir()] == [True]
        return bool(trainer)

    command = [sys.executable, "-m", "unlearn_sweep.orchestrator.cli", "toy-task", "--out", str(work / "task")]
    code, output = terminated_when(command, training, tmp_path / "log")
    assert code == 130 and output.endswith("unlearn-sweep: interrupted\n"), output[-2000:]
    assert not any(work.iterdir())
    assert not [process for process in trainer if alive(process)]


def alive(process: psutil.Process) -> bool:
    """Running, not merely unreaped."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
