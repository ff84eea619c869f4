"""SemEval-2025 Task 4 forget/retain rows and the layouts they ship in.

Layouts of a task directory, tried in this order:
  forget.jsonl + retain.jsonl        official evaluation layout, the LUME release
  forget.parquet + retain.parquet    submission layout
  data/forget_<split>-*.parquet ...  public Hugging Face layout (split: train | validation)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.tables import read_records, require_fields

TASKS = ("Task1", "Task2", "Task3")
SETS = ("forget", "retain")
HF_SPLITS = ("train", "validation")


@dataclass(frozen=True)
class TaskRow:
    id: str
    input: str
    output: str
    task: str
    split: str  # "forget" or "retain"

    @property
    def kind(self) -> str:
        """'sc' (sentence completion) or 'qa' (question), from the id as the organizers did."""
        return row_kind(self.id)


@dataclass(frozen=True)
class TaskData:
    forget: list[TaskRow]
    retain: list[TaskRow]
    layout: str
    held_out: tuple[str, ...] = ()  # documents the base model never saw (corpus/mia.py: load_held_out)

    def rows(self) -> list[TaskRow]:
        return self.forget + self.retain

    def documents(self) -> set[str]:
        """The whole documents its sentence-completion rows split into prompt and continuation,
        whitespace-normalized (the form of an MIA set's documents, as `same_text` compares)."""
        return {same_text(f"{row.input} {row.output}") for row in self.rows() if row.kind == "sc"}


def same_text(text: str) -> str:
    """A document's words, one space apart: how documents of the task and MIA files compare."""
    return " ".join(text.split())


def row_kind(row_id: str) -> str | None:
    """The organizers' rule: the id minus its last character ends in 'sc' or 'qa'."""
    stem = row_id[:-1]
    if stem.endswith("sc"):
        return "sc"
    if stem.endswith("qa"):
        return "qa"
    return None


def load_rows(path: Path, split: str) -> list[TaskRow]:
    """Validated rows of one forget or retain file."""
    records = read_records(path)
    if not records:
        raise DataError(path, f"the {split} set is empty")
    require_fields(path, records, ("id", "input", "output", "task"))
    rows, seen = [], {}
    for index, record in enumerate(records, start=1):
        row_id = str(record["id"])
        if row_id in seen:
            raise DataError(path, f"duplicate id {row_id!r} (also row {seen[row_id]})", index, "id")
        seen[row_id] = index
        if record["task"] not in TASKS:
            raise DataError(
                path, f"unknown task {record['task']!r} (expected one of {', '.join(TASKS)})", index, "task"
            )
        if row_kind(row_id) is None:
            raise DataError(
                path, f"id {row_id!r} is neither a sentence-completion (..scN) nor a question (..qaN) row", index, "id"
            )
        for field in ("input", "output"):
            if not isinstance(record[field], str):
                raise DataError(path, f"expected a string, got {type(record[field]).__name__}", index, field)
        if record.get("split") not in (None, split):
            raise DataError(path, f"row belongs to {record['split']!r}, file holds the {split} set", index, "split")
        rows.append(TaskRow(row_id, record["input"], record["output"], record["task"], split))
    return rows


def _hf_file(directory: Path, split_set: str, split: str) -> Path:
    matches = sorted(directory.glob(f"{split_set}_{split}-*.parquet"))
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(m.name for m in matches)
        raise DataError(directory, f"expected one {split_set}_{split}-*.parquet file, found {found}")
    return matches[0]


def _load_sets(files: dict[str, Path], layout: str) -> TaskData:
    """Both sets, no id in both: a row cannot be forgotten and retained."""
    forget, retain = (load_rows(files[s], s) for s in SETS)
    forget_ids = {row.id for row in forget}
    for index, row in enumerate(retain, start=1):
        if row.id in forget_ids:
            raise DataError(files["retain"], f"duplicate id {row.id!r}: also in {files['forget'].name}", index, "id")
    return TaskData(forget, retain, layout=layout)


def load_task_files(forget: str | Path, retain: str | Path) -> TaskData:
    """The forget and retain sets as two files (.jsonl or .parquet), or two folders holding
    one such file each: how SemEval handed sets to a submission."""

    def one_file(path: Path, split_set: str) -> Path:
        if not path.is_dir():
            return path
        found = sorted(f for f in path.iterdir() if f.suffix in (".jsonl", ".parquet"))
        if len(found) != 1:
            raise DataError(path, f"expected one .jsonl or .parquet file of the {split_set} set, found {len(found)}")
        return found[0]

    files = {"forget": one_file(Path(forget), "forget"), "retain": one_file(Path(retain), "retain")}
    return _load_sets(files, "files")


def _one_fold_files(data_dir: Path) -> dict[str, Path] | None:
    """The forget and retain files of the layouts that hold one fold, where present."""
    for suffix in (".jsonl", ".parquet"):
        files = {s: data_dir / f"{s}{suffix}" for s in SETS}
        if any(f.exists() for f in files.values()):
            return files
    return None


def _hf_dir(data_dir: Path) -> Path:
    return data_dir / "data" if (data_dir / "data").is_dir() else data_dir


def hf_folds(data_dir: str | Path) -> tuple[str, ...]:
    """The folds a task directory holds in the Hugging Face layout, a file of either set
    counting (so that a fold missing one file is loaded, and refused); none in the others."""
    data_dir = Path(data_dir)
    if _one_fold_files(data_dir) is not None:
        return ()
    hf_dir = _hf_dir(data_dir)
    return tuple(split for split in HF_SPLITS if any(any(hf_dir.glob(f"{s}_{split}-*.parquet")) for s in SETS))


def load_task(data_dir: str | Path, split: str | None = None) -> TaskData:
    """Forget and retain rows of a task directory in any supported layout.

    `split` chooses train or validation in the Hugging Face layout (default train); the
    other layouts hold one split only, so naming one there is an error.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, "data directory not found")
    files = _one_fold_files(data_dir)
    if files is not None:
        if split is not None:
            raise DataError(
                data_dir, f"--split {split} applies only to the Hugging Face layout (data/forget_<split>-*.parquet)"
            )
        return _load_sets(files, f"{{forget,retain}}{files['forget'].suffix}")
    hf_dir = _hf_dir(data_dir)
    if any(hf_dir.glob("forget_*.parquet")):
        split = split or "train"
        if split not in HF_SPLITS:
            raise DataError(data_dir, f"unknown split {split!r} (expected one of {', '.join(HF_SPLITS)})")
        files = {s: _hf_file(hf_dir, s, split) for s in SETS}
        return _load_sets(files, f"hf parquet ({split})")
    raise DataError(
        data_dir,
        "no task data: expected forget.jsonl+retain.jsonl, forget.parquet+retain.parquet, "
        "or data/forget_<split>-*.parquet",
    )


def load_held_out_fold(data_dir: str | Path, split: str, tuned: str | None) -> TaskData:
    """The fold a configuration is confirmed on, refused where it holds a row (same input and
    output) of the fold it was tuned on: a score on such rows is not held out."""
    held_out = load_task(data_dir, split)
    seen = {(row.input, row.output) for row in load_task(data_dir, tuned).rows()}
    shared = [row for row in held_out.rows() if (row.input, row.output) in seen]
    if shared:
        raise DataError(
            data_dir,
            f"{len(shared)} row{'s' * (len(shared) > 1)} of the {split} fold also in the {tuned or 'train'} fold "
            f"(the first: id {shared[0].id!r}): a score on them is not held out",
        )
    return held_out
