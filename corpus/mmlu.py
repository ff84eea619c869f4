"""MMLU-format multiple-choice sets and the prompt they are asked with.

Two layouts: the `cais/mmlu` columns (question, subject, choices[4], answer 0-3) in parquet
or JSONL files, and the original CSV files (question, A, B, C, D, answer letter; no header;
subject from the file name, e.g. `test/abstract_algebra_test.csv`). Files are picked by the
split name (`test`, `dev`, ...) in their name or parent folder; an `all/` folder, where
present, is used alone so that per-subject copies are not counted twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.tables import read_records, require_fields

LETTERS = ("A", "B", "C", "D")
CSV_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


@dataclass(frozen=True)
class MmluQuestion:
    question: str
    subject: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices


def _split_files(mmlu_dir: Path, split: str) -> list[Path]:
    root = mmlu_dir / "all" if (mmlu_dir / "all").is_dir() else mmlu_dir
    files = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".parquet", ".jsonl", ".csv") or not path.is_file():
            continue
        if split in re.split(r"[_\-.]", path.stem) or path.parent.name == split:
            files.append(path)
    return files


def _from_csv(path: Path) -> list[MmluQuestion]:
    records = read_records(path, CSV_COLUMNS)
    require_fields(path, records, tuple(CSV_COLUMNS))
    subject = re.sub(r"_(test|dev|val|validation|train)$", "", path.stem)
    questions = []
    for index, record in enumerate(records, start=1):
        letter = record["answer"].strip().upper()
        if letter not in LETTERS:
            raise DataError(path, f"answer {record['answer']!r} is not one of A, B, C, D", index, "answer")
        choices = tuple(record[letter_] for letter_ in LETTERS)
        questions.append(MmluQuestion(record["question"], subject, choices, LETTERS.index(letter)))
    return questions


def _from_columns(path: Path) -> list[MmluQuestion]:
    records = read_records(path)
    require_fields(path, records, ("question", "subject", "choices", "answer"))
    questions = []
    for index, record in enumerate(records, start=1):
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise DataError(path, "expected a list of 4 strings", index, "choices")
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
            raise DataError(path, f"answer {answer!r} is not an index 0-3", index, "answer")
        questions.append(MmluQuestion(record["question"], record["subject"], tuple(choices), answer))
    return questions


def has_split(mmlu_dir: str | Path, split: str) -> bool:
    return Path(mmlu_dir).is_dir() and bool(_split_files(Path(mmlu_dir), split))


def load_mmlu(mmlu_dir: str | Path, split: str = "test") -> list[MmluQuestion]:
    """All questions of one split, in file order."""
    mmlu_dir = Path(mmlu_dir)
    if not mmlu_dir.is_dir():
        raise DataError(mmlu_dir, "MMLU directory not found")
    files = _split_files(mmlu_dir, split)
    if not files:
        raise DataError(mmlu_dir, f"no MMLU '{split}' files (.parquet, .jsonl or .csv with '{split}' in the name)")
    questions = []
    for path in files:
        file_questions = _from_csv(path) if path.suffix == ".csv" else _from_columns(path)
        if not file_questions:
            raise DataError(path, "no questions")
        questions.extend(file_questions)
    return questions


def _format_question(question: MmluQuestion) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=False))
    return f"{question.question}{options}\nAnswer:"


def format_prompt(question: MmluQuestion, shots: list[MmluQuestion] = ()) -> str:
    """The MMLU prompt as Open-Instruct's evaluation (the organizers' MMLU) writes it: its
    subject is each '_'-separated word after a space (hence two spaces after 'about'), then
    the shots with their answers, then the question; the model continues with ' A'..' D'."""
    subject = "".join(" " + word for word in question.subject.split("_"))
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    examples = "".join(f"{_format_question(shot)} {LETTERS[shot.answer]}\n\n" for shot in shots)
    return header + examples + _format_question(question)


def first_shots(dev: list[MmluQuestion], count: int) -> dict[str, list[MmluQuestion]]:
    """Each subject's first `count` dev questions, in file order: its few-shot examples."""
    shots: dict[str, list[MmluQuestion]] = {}
    for question in dev:
        shots.setdefault(question.subject, []).append(question)
    return {subject: questions[:count] for subject, questions in shots.items()}


def fitted_prompt(
    question: MmluQuestion, shots: list[MmluQuestion], token_count: Callable[[str], int], limit: int = 2048
) -> str:
    """The prompt with as many of the first shots as keep it within `limit` tokens (counted
    without special tokens), dropping the last shot until it fits, as Open-Instruct does."""
    shots = list(shots)
    prompt = format_prompt(question, shots)
    while shots and token_count(prompt) > limit:
        shots.pop()
        prompt = format_prompt(question, shots)
    return prompt
