"""Scoring a checkpoint end to end: inference -> records on disk -> scores.json.

The records (generations.jsonl, mia.jsonl, mmlu.jsonl) are enough to recompute every
score (`rescore`), the way the organizers' metrics-only mode worked."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.mia import load_mia
from unlearn_sweep.corpus.mmlu import MmluQuestion, format_prompt, load_mmlu
from unlearn_sweep.corpus.semeval import TaskRow, load_task
from unlearn_sweep.evaluation import inference
from unlearn_sweep.evaluation.scoring import compute_scores

log = logging.getLogger(__name__)

GENERATIONS, MIA, MMLU, SCORES = "generations.jsonl", "mia.jsonl", "mmlu.jsonl", "scores.json"


@dataclass(frozen=True)
class EvalSets:
    """What a checkpoint is scored on, loaded and validated once."""

    rows: list[TaskRow]
    mia: list | None = None
    mmlu: list[MmluQuestion] | None = None
    mmlu_shots: dict[str, list[MmluQuestion]] | None = None

    @classmethod
    def load(cls, data: str | Path, split: str | None = None, mia: str | Path | None = None,
             mmlu: str | Path | None = None, mmlu_shots: int = 0) -> "EvalSets":
        shots = None
        if mmlu is not None and mmlu_shots > 0:
            shots = {}
            for question in load_mmlu(mmlu, "dev"):
                shots.setdefault(question.subject, []).append(question)
            shots = {subject: examples[:mmlu_shots] for subject, examples in shots.items()}
        return cls(
            rows=load_task(data, split).rows(),
            mia=load_mia(mia) if mia is not None else None,
            mmlu=load_mmlu(mmlu) if mmlu is not None else None,
            mmlu_shots=shots,
        )


def run_inference(model, tokenizer, sets: EvalSets, batch_size: int = 32, max_new_tokens: int = 256) -> dict[str, list[dict]]:
    """The three record lists for one in-memory model."""
    prompts = [row.input for row in sets.rows]
    outputs = inference.generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    nlls = inference.answer_nll(model, tokenizer, prompts, [row.output for row in sets.rows], batch_size)
    records = {
        GENERATIONS: [
            {"id": row.id, "task": row.task, "split": row.split, "input": row.input,
             "expected_output": row.output, "model_output": output, "nll": nll}
            for row, output, nll in zip(sets.rows, outputs, nlls)
        ],
        MIA: [],
        MMLU: [],
    }
    if sets.mia:
        losses = inference.document_loss(model, tokenizer, [doc.document for doc in sets.mia], batch_size)
        records[MIA] = [{"id": doc.id, "membership": doc.membership, "nll": loss} for doc, loss in zip(sets.mia, losses)]
    if sets.mmlu:
        shots = sets.mmlu_shots or {}
        prompts = [format_prompt(q, shots.get(q.subject, [])) for q in sets.mmlu]
        predicted = inference.choose_letters(model, tokenizer, prompts, batch_size)
        records[MMLU] = [
            {"id": index, "subject": q.subject, "answer": q.answer, "predicted": p}
            for index, (q, p) in enumerate(zip(sets.mmlu, predicted))
        ]
    return records


def score_records(records: dict[str, list[dict]], mmlu_threshold: float | None = None) -> dict:
    """scores.json from records; warns where the final score cannot be given."""
    missing = [name for name, key in (("MIA", MIA), ("MMLU", MMLU)) if not records.get(key)]
    if missing:
        log.warning("no %s records: final_score is null, as the task gave no final score without them", " or ".join(missing))
    return compute_scores(records[GENERATIONS], records.get(MIA) or None, records.get(MMLU) or None, mmlu_threshold)


def write_results(out_dir: str | Path, records: dict[str, list[dict]], scores: dict) -> None:
    """Records and scores.json, each file replaced whole (never half-written)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in records.items() if rows}
    files[SCORES] = json.dumps(scores, indent=2) + "\n"
    for name, text in files.items():
        _write_atomically(out_dir / name, text)
    for name in {GENERATIONS, MIA, MMLU} - set(files):  # an earlier evaluation's records would be read back with these scores
        (out_dir / name).unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def evaluate_checkpoint(model_dir: str | Path, sets: EvalSets, out_dir: str | Path | None = None,
                        batch_size: int = 32, max_new_tokens: int = 256, mmlu_threshold: float | None = None) -> dict:
    """Load, infer, score, and (with out_dir) write the records and scores.json."""
    model, tokenizer = inference.load_model(model_dir)
    records = run_inference(model, tokenizer, sets, batch_size, max_new_tokens)
    scores = score_records(records, mmlu_threshold)
    if out_dir is not None:
        write_results(out_dir, records, scores)
    return scores


def read_records(results_dir: str | Path) -> dict[str, list[dict]]:
    results_dir = Path(results_dir)
    records = {}
    for name in (GENERATIONS, MIA, MMLU):
        path = results_dir / name
        if not path.exists():
            if name == GENERATIONS:
                raise DataError(path, "file not found")
            records[name] = []
            continue
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(path, f"invalid JSON: {error.msg}", number) from None
        records[name] = rows
    return records


def rescore(results_dir: str | Path, mmlu_threshold: float | None = None) -> dict:
    """Recompute scores.json from the records in results_dir; the threshold defaults to the
    one recorded in the existing scores.json."""
    results_dir = Path(results_dir)
    records = read_records(results_dir)
    if mmlu_threshold is None and (results_dir / SCORES).exists():
        mmlu_threshold = json.loads((results_dir / SCORES).read_text()).get("mmlu_threshold")
    required = {GENERATIONS: ("id", "task", "split", "expected_output", "model_output"),
                MIA: ("membership", "nll"), MMLU: ("answer", "predicted")}
    for name, fields in required.items():
        for number, record in enumerate(records[name], start=1):
            for field in fields:
                if field not in record:
                    raise DataError(results_dir / name, "missing field", number, field)
    scores = score_records(records, mmlu_threshold)
    _write_atomically(results_dir / SCORES, json.dumps(scores, indent=2) + "\n")
    return scores
