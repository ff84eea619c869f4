"""Scoring a checkpoint end to end: inference -> records on disk -> scores.json.

The records (generations.jsonl, mia.jsonl, mmlu.jsonl) are enough to recompute every
score (`rescore`), the way the organizers' metrics-only mode worked."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from unlearn_sweep.corpus.checkpoints import BACKENDS
from unlearn_sweep.corpus.errors import DataError, read_text
from unlearn_sweep.corpus.mia import MEMBERSHIPS, load_mia
from unlearn_sweep.corpus.mmlu import LETTERS, MmluQuestion, first_shots, fitted_prompt, has_split, load_mmlu
from unlearn_sweep.corpus.semeval import SETS, TASKS, TaskRow, load_task
from unlearn_sweep.corpus.staging import as_if_created_plainly
from unlearn_sweep.evaluation import inference
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.evaluation.scoring import compute_scores

log = logging.getLogger(__name__)

GENERATIONS, MIA, MMLU, SCORES = "generations.jsonl", "mia.jsonl", "mmlu.jsonl", "scores.json"
DEFAULT_SHOTS = 5  # MMLU 5-shot, as the organizers ran it, where the set has dev examples
# Generation settings of the task's own scoring: a score computed otherwise says so in scores.json.
TASK_SETTINGS = {"dtype": "bfloat16", "max_new_tokens": 256}
DEFAULT_OPTIONS = EvalOptions()


class InferenceBackend(Protocol):
    """What a backend module provides, with these signatures: `evaluation.inference` (Hugging
    Face) and `evaluation.vllm_inference` (vLLM)."""

    def open_model(self, model_dir: str | Path, options: EvalOptions) -> tuple[Any, Any]: ...
    def generate(
        self, model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int
    ) -> list[str]: ...
    def document_loss(self, model: Any, tokenizer: Any, documents: Sequence[str], batch_size: int) -> list[float]: ...
    def choose_letters(self, model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int) -> list[int]: ...
    def release(self, model: Any) -> None: ...


def backend_passes(backend: str) -> InferenceBackend:
    """The module implementing InferenceBackend for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from unlearn_sweep.evaluation import vllm_inference  # imports nothing of vLLM until a model is loaded

        return vllm_inference
    return inference


def load(model_dir: str | Path, options: EvalOptions):
    """(model, tokenizer) of a checkpoint for the options' backend, in their dtype (a vLLM
    engine taking their `vllm_memory` share of the GPU)."""
    return backend_passes(options.backend).open_model(model_dir, options)


def release(model, options: EvalOptions) -> None:
    """Give a loaded model's memory back before the next is loaded: a vLLM engine holds its
    share of the GPU until it is shut down."""
    backend_passes(options.backend).release(model)


@dataclass(frozen=True)
class EvalSets:
    """What a checkpoint is scored on, loaded and validated once."""

    rows: list[TaskRow]
    mia: list | None = None
    mmlu: list[MmluQuestion] | None = None
    mmlu_shots: dict[str, list[MmluQuestion]] | None = None
    shots: int = 0  # MMLU examples per prompt asked for (fewer where 2,048 tokens do not hold them)

    @classmethod
    def load(
        cls,
        data: str | Path,
        split: str | None = None,
        mia: str | Path | None = None,
        mmlu: str | Path | None = None,
        mmlu_shots: int | None = None,
    ) -> EvalSets:
        """mmlu_shots None: 5 where the MMLU set has dev examples, else 0."""
        shots = None
        if mmlu is not None and mmlu_shots != 0:
            # A set without a dev split is asked 0-shot by default; a dev split that is there is
            # read and checked like the test split (a bad one is an error, not 0-shot).
            dev = load_mmlu(mmlu, "dev") if mmlu_shots is not None or has_split(mmlu, "dev") else []
            mmlu_shots = DEFAULT_SHOTS if mmlu_shots is None and dev else mmlu_shots or 0
            shots = first_shots(dev, mmlu_shots) if mmlu_shots else None
        return cls(
            rows=load_task(data, split).rows(),
            mia=load_mia(mia) if mia is not None else None,
            mmlu=load_mmlu(mmlu) if mmlu is not None else None,
            mmlu_shots=shots,
            shots=mmlu_shots or 0,
        )

    def shard(self, rank: int, world: int) -> EvalSets:
        """This rank's share: every world-th row, document and question from the rank's own."""
        return EvalSets(
            self.rows[rank::world],
            self.mia[rank::world] if self.mia else self.mia,
            self.mmlu[rank::world] if self.mmlu else self.mmlu,
            self.mmlu_shots,
            self.shots,
        )


def merge_shards(shards: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """The records of `EvalSets.shard`'s shares (rank order) in the order of the whole sets,
    as a single-process evaluation writes them (MMLU records numbered over the whole set)."""
    merged = {}
    for name in shards[0]:
        lists = [shard[name] for shard in shards]
        merged[name] = [lists[index % len(lists)][index // len(lists)] for index in range(sum(map(len, lists)))]
    merged[MMLU] = [{**record, "id": index} for index, record in enumerate(merged.get(MMLU, []))]
    return merged


def eval_settings(sets: EvalSets, options: EvalOptions) -> dict:
    """How a score was computed, as scores.json records it; `task_settings` is false when the
    generation settings differ from the task's (such a score is not comparable with the task's)."""
    settings = {"dtype": options.dtype, "max_new_tokens": options.max_new_tokens, "mmlu_shots": sets.shots}
    return {**settings, "task_settings": all(settings[key] == value for key, value in TASK_SETTINGS.items())}


def run_inference(
    model,
    tokenizer,
    sets: EvalSets,
    options: EvalOptions = DEFAULT_OPTIONS,
) -> dict[str, list[dict]]:
    """The three record lists for one model loaded with `load(..., options)`. The gold answers'
    NLL (a diagnostic no score uses) costs a pass of its own: only with answer_nll, on the HF backend."""
    passes = backend_passes(options.backend)
    if options.answer_nll and options.backend != "hf":
        raise ValueError(passes.NO_ANSWER_NLL)
    batch_size = options.batch_size
    prompts = [row.input for row in sets.rows]
    outputs = passes.generate(model, tokenizer, prompts, batch_size, options.max_new_tokens)
    nlls = (
        inference.answer_nll(model, tokenizer, prompts, [row.output for row in sets.rows], batch_size)
        if options.answer_nll
        else None
    )
    records = {
        GENERATIONS: [
            {
                "id": row.id,
                "task": row.task,
                "split": row.split,
                "input": row.input,
                "expected_output": row.output,
                "model_output": output,
                **({"nll": nlls[index]} if nlls else {}),
            }
            for index, (row, output) in enumerate(zip(sets.rows, outputs, strict=True))
        ],
        MIA: [],
        MMLU: [],
    }
    if sets.mia:
        losses = passes.document_loss(model, tokenizer, [doc.document for doc in sets.mia], batch_size)
        records[MIA] = [
            {"id": doc.id, "membership": doc.membership, "nll": loss}
            for doc, loss in zip(sets.mia, losses, strict=True)
        ]
    if sets.mmlu:
        predicted = passes.choose_letters(model, tokenizer, mmlu_prompts(sets, tokenizer), batch_size)
        records[MMLU] = [
            {"id": index, "subject": q.subject, "answer": q.answer, "predicted": p}
            for index, (q, p) in enumerate(zip(sets.mmlu, predicted, strict=True))
        ]
    return records


# The last two sets' fitted MMLU prompts, by questions, shots and tokenizer: a trial scores
# every epoch's checkpoint (its screen's questions and then all of them), each with its own copy
# of one tokenizer, and fitting 14,042 5-shot prompts to 2,048 tokens tokenizes each once or
# more (about 9 s a pass on a CPU core).
_FITTED_PROMPTS: dict[tuple, list[str]] = {}


def mmlu_prompts(sets: EvalSets, tokenizer: Any) -> list[str]:
    """Each MMLU question with as many of its subject's shots as fit 2,048 tokens; computed once
    per questions, shots and tokenizer (told apart by its whole definition, not its folder)."""
    shots = sets.mmlu_shots or {}
    definition = getattr(tokenizer, "backend_tokenizer", None)
    key = (
        (
            tuple(sets.mmlu),
            tuple(sorted((subject, tuple(questions)) for subject, questions in shots.items())),
            hashlib.sha256(definition.to_str().encode()).hexdigest(),
        )
        if definition is not None
        else None
    )
    if key in _FITTED_PROMPTS:
        return _FITTED_PROMPTS[key]

    def token_count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = [fitted_prompt(q, shots.get(q.subject, []), token_count) for q in sets.mmlu]
    if key is not None:
        if len(_FITTED_PROMPTS) >= 2:  # a trial's two: its screen's questions and all of them
            del _FITTED_PROMPTS[next(iter(_FITTED_PROMPTS))]
        _FITTED_PROMPTS[key] = prompts
    return prompts


def score_records(
    records: dict[str, list[dict]], mmlu_threshold: float | None = None, settings: dict | None = None
) -> dict:
    """scores.json from records (with the settings they were computed under); warns where
    the final score cannot be given."""
    missing = [name for name, key in (("MIA", MIA), ("MMLU", MMLU)) if not records.get(key)]
    if missing:
        log.warning(
            "no %s records: final_score is null, as the task gave no final score without them", " or ".join(missing)
        )
    scores = compute_scores(records[GENERATIONS], records.get(MIA) or None, records.get(MMLU) or None, mmlu_threshold)
    return {**scores, "eval": settings} if settings is not None else scores


def write_results(out_dir: str | Path, records: dict[str, list[dict]], scores: dict) -> None:
    """Records and scores.json, each file replaced whole (never half-written)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in records.items() if rows
    }
    files[SCORES] = json.dumps(scores, indent=2) + "\n"
    for name, text in files.items():
        _write_atomically(out_dir / name, text)
    for name in {GENERATIONS, MIA, MMLU} - set(
        files
    ):  # an earlier evaluation's records would be read back with these scores
        (out_dir / name).unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(as_if_created_plainly(Path(temporary)), path)


def gathered_inference(
    model, tokenizer, sets: EvalSets, options: EvalOptions = DEFAULT_OPTIONS
) -> dict[str, list[dict]] | None:
    """run_inference over a process group (a multi-worker trial's, a launcher's) shared out:
    each rank infers its `EvalSets.shard`, and rank 0 gets all the records in the sets' order
    (the others None); without a group, this process infers them all."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return run_inference(model, tokenizer, sets, options)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    records = run_inference(model, tokenizer, sets.shard(rank, world), options)
    shards = [None] * world if rank == 0 else None
    torch.distributed.gather_object(records, shards, dst=0)
    return merge_shards(shards) if rank == 0 else None


@contextlib.contextmanager
def launched_group() -> Iterator[None]:
    """Under a launcher of several processes (torchrun sets WORLD_SIZE) where none is formed
    yet, their process group: NCCL with each rank on its node's LOCAL_RANK GPU, gloo on CPUs;
    destroyed after. Alone, nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or torch.distributed.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def evaluate_checkpoint(
    model_dir: str | Path,
    sets: EvalSets,
    options: EvalOptions = DEFAULT_OPTIONS,
    out_dir: str | Path | None = None,
    mmlu_threshold: float | None = None,
) -> dict | None:
    """Load (by default in bfloat16, as the organizers did), infer, score, and (with out_dir)
    write the records and scores.json. Over a process group (`launched_group`), each rank
    infers its share and rank 0 alone scores, writes and returns the scores (the others None)."""
    model, tokenizer = load(model_dir, options)
    try:
        records = gathered_inference(model, tokenizer, sets, options)
    finally:
        release(model, options)
    if records is None:
        return None
    scores = score_records(records, mmlu_threshold, eval_settings(sets, options))
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
        for number, line in enumerate(read_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(path, f"invalid JSON: {error.msg}", number) from None
        records[name] = rows
    return records


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_letter_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(LETTERS)


# What `score` requires of each record, field by field (a record a score would silently drop or
# miscount is refused): the check and what it expects.
RECORD_FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    GENERATIONS: {
        "id": (lambda value: isinstance(value, str | int) and not isinstance(value, bool), "a string or integer"),
        "task": (lambda value: value in TASKS, f"one of {', '.join(TASKS)}"),
        "split": (lambda value: value in SETS, f"one of {', '.join(SETS)}"),
        "expected_output": (_is_text, "a string"),
        "model_output": (_is_text, "a string"),
    },
    MIA: {
        "membership": (lambda value: value in MEMBERSHIPS, f"one of {', '.join(MEMBERSHIPS)}"),
        "nll": (_is_finite_number, "a finite number"),
    },
    MMLU: {
        "answer": (_is_letter_index, "an answer index 0-3"),
        "predicted": (_is_letter_index, "an answer index 0-3"),
    },
}


def _previous_scores(path: Path) -> dict:
    """The scores.json a rescore replaces ({} where there is none)."""
    if not path.exists():
        return {}
    try:
        previous = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(path, f"not JSON ({error.msg} at line {error.lineno}): delete it to rescore") from None
    if not isinstance(previous, dict):
        raise DataError(path, "expected a JSON object: delete it to rescore")
    return previous


def rescore(results_dir: str | Path, mmlu_threshold: float | None = None) -> dict:
    """Recompute scores.json from the records in results_dir; the threshold defaults to the
    one recorded in the existing scores.json."""
    results_dir = Path(results_dir)
    records = read_records(results_dir)
    previous = _previous_scores(results_dir / SCORES)
    if mmlu_threshold is None:
        mmlu_threshold = previous.get("mmlu_threshold")
    for name, fields in RECORD_FIELDS.items():
        if name == GENERATIONS and not records[name]:
            raise DataError(results_dir / name, "no records")
        for number, record in enumerate(records[name], start=1):
            if not isinstance(record, dict):
                raise DataError(results_dir / name, "expected a JSON object", number)
            for field, (valid, expected) in fields.items():
                if field not in record:
                    raise DataError(results_dir / name, "missing field", number, field)
                if not valid(record[field]):
                    raise DataError(results_dir / name, f"{record[field]!r}: expected {expected}", number, field)
    scores = score_records(
        records, mmlu_threshold, previous.get("eval")
    )  # the records were computed under those settings
    _write_atomically(results_dir / SCORES, json.dumps(scores, indent=2) + "\n")
    return scores
