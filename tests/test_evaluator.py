"""The evaluator on the toy task: batching changes nothing, records reproduce the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearn_sweep.corpus.mmlu import format_prompt, load_mmlu
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.evaluation import inference
from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint, rescore
from unlearn_sweep.orchestrator.cli import main


@pytest.fixture(scope="module")
def base(toy_task_dir: Path):
    return inference.load_model(toy_task_dir / "model")


def test_batched_equals_one_row_at_a_time(toy_task_dir: Path, base) -> None:
    model, tokenizer = base
    rows = load_task(toy_task_dir / "data").rows()[::3]
    prompts, answers = [r.input for r in rows], [r.output for r in rows]
    assert inference.generate(model, tokenizer, prompts, batch_size=16) == inference.generate(model, tokenizer, prompts, batch_size=1)
    assert inference.answer_nll(model, tokenizer, prompts, answers, batch_size=16) == pytest.approx(
        inference.answer_nll(model, tokenizer, prompts, answers, batch_size=1), abs=1e-4)
    documents = [f"{r.input} {r.output}" for r in rows if r.kind == "sc"]
    assert inference.document_loss(model, tokenizer, documents, batch_size=8) == pytest.approx(
        inference.document_loss(model, tokenizer, documents, batch_size=1), abs=1e-4)
    mmlu_prompts = [format_prompt(q) for q in load_mmlu(toy_task_dir / "mmlu")]
    assert inference.choose_letters(model, tokenizer, mmlu_prompts, batch_size=16) == inference.choose_letters(model, tokenizer, mmlu_prompts, batch_size=1)


def test_base_model_scores_and_score_reproduces_evaluate(toy_task_dir: Path, tmp_path: Path) -> None:
    sets = EvalSets.load(toy_task_dir / "data", mia=toy_task_dir / "mia", mmlu=toy_task_dir / "mmlu")
    scores = evaluate_checkpoint(toy_task_dir / "model", sets, tmp_path, mmlu_threshold=0.5)
    for split in ("forget", "retain"):
        for task in ("Task1", "Task2", "Task3"):
            assert min(scores["per_task"][split][task].values()) >= 0.8
    assert scores["mia_auc"] >= 0.9 and scores["mmlu_accuracy"] >= 0.8
    # Memorised forget set: the forget terms are ~0, so the aggregate is ~0 and MIA score ~0.
    assert scores["task_aggregate"] < 0.1 and scores["eligible"] is True
    assert scores["final_score"] == pytest.approx((scores["task_aggregate"] + scores["mmlu_accuracy"] + scores["mia_score"]) / 3)

    generations = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert set(generations[0]) == {"id", "task", "split", "input", "expected_output", "model_output", "nll"}
    assert len(generations) == 240
    mia = [json.loads(line) for line in (tmp_path / "mia.jsonl").read_text().splitlines()]
    assert set(mia[0]) == {"id", "membership", "nll"} and len(mia) == 48

    on_disk = json.loads((tmp_path / "scores.json").read_text())
    (tmp_path / "scores.json").unlink()
    assert rescore(tmp_path, mmlu_threshold=0.5) == on_disk == json.loads(json.dumps(scores))


def test_cli_evaluate_then_score(toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(toy_task_dir / "model"), "--data", str(toy_task_dir / "data"), "--out", str(out), "--batch-size", "64"]
    assert main(args) == 0
    assert "final_score     null" in capsys.readouterr().out and "final_score is null" in caplog.text
    assert json.loads((out / "scores.json").read_text())["final_score"] is None

    assert main(["score", str(out)]) == 0
    assert "task_aggregate  0.0" in capsys.readouterr().out
    (out / "generations.jsonl").write_text('{"id": "x"\n')
    assert main(["score", str(out)]) == 2
    assert "generations.jsonl: row 1: invalid JSON" in capsys.readouterr().err
    assert main(args[:-2] + ["--mmlu-threshold", "0.75x"]) == 2
    assert "needs the base model's MMLU" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--data", str(toy_task_dir / "data"), "--out", str(tmp_path / "x")]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
