"""The miniature task: deterministic, really memorised by its base model, and a real trade-off.
The knowledge checks here compute the task's measures directly, one row at a time, without
the evaluator, so that they also cross-check it."""

from __future__ import annotations

import copy
import filecmp
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlearn_sweep.corpus.mia import load_mia
from unlearn_sweep.corpus.mmlu import LETTERS, format_prompt, load_mmlu
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.corpus.toy_task import build_toy_task, write_toy_task


def load(toy_task_dir: Path):
    return AutoModelForCausalLM.from_pretrained(toy_task_dir / "model").eval(), AutoTokenizer.from_pretrained(toy_task_dir / "model")


def test_data_is_a_pure_function_of_the_seed() -> None:
    assert build_toy_task(3) == build_toy_task(3)
    assert build_toy_task(3).forget_rows != build_toy_task(4).forget_rows


def test_same_seed_writes_identical_files(tmp_path: Path) -> None:
    first = write_toy_task(tmp_path / "a", seed=5, steps=3)
    second = write_toy_task(tmp_path / "b", seed=5, steps=3)
    files = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert "model/model.safetensors" in files and "data/forget.jsonl" in files
    match, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
    assert mismatch == [] and errors == []


@torch.inference_mode()
def test_base_model_has_memorised_the_task(toy_task_dir: Path) -> None:
    model, tokenizer = load(toy_task_dir)
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores: dict[tuple[str, str, str], list[float]] = {}
    for row in load_task(toy_task_dir / "data").rows():
        prompt = tokenizer(row.input, return_tensors="pt")
        output = model.generate(**prompt, do_sample=False, max_new_tokens=96, pad_token_id=tokenizer.eos_token_id)
        generated = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        if row.kind == "qa":
            score = float(generated.strip().lower() == row.output.strip().lower())
        else:
            score = rouge.score(row.output, generated)["rougeL"].recall
        scores.setdefault((row.split, row.task, row.kind), []).append(score)
    assert len(scores) == 12
    means = {key: sum(values) / len(values) for key, values in scores.items()}
    # The trained weights follow the CPU's float kernels: the weakest term was at least 0.8 on the machines of
    # earlier sessions and 0.75 on an AMD EPYC one (forget Task1 knowledge: 6 of 8 questions).
    assert min(means.values()) >= 0.7, means

    documents = load_mia(toy_task_dir / "mia")
    losses = [model(**(ids := tokenizer(d.document, return_tensors="pt")), labels=ids["input_ids"]).loss.item() for d in documents]
    labels = [int(d.membership == "member") for d in documents]
    assert roc_auc_score(labels, [-loss for loss in losses]) >= 0.9

    letter_ids = [tokenizer(f" {letter}")["input_ids"][0] for letter in LETTERS]
    questions = load_mmlu(toy_task_dir / "mmlu")
    correct = 0
    for question in questions:
        logits = model(**tokenizer(format_prompt(question), return_tensors="pt")).logits[0, -1]
        correct += int(logits[letter_ids].argmax()) == question.answer
    assert correct / len(questions) >= 0.8


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
    assert retain_after > 3 * retain_before
