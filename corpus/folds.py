"""A task of one fold split into a fold to tune on and a held-out fold, by document.

SemEval's release came with two folds, and the sweep confirms its best configurations on the
second; a team with one set of documents to forget (next month's deletion request) holds some
of them out here. A document's rows (its sentence completions and questions, one id stem) go
to one fold together, drawn within each set and task so that both folds hold every task; its
MIA members follow their documents, nonmembers are drawn with the same fraction.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.mia import HELD_OUT, MiaDocument, load_mia
from unlearn_sweep.corpus.semeval import HF_SPLITS, SETS, TaskData, same_text
from unlearn_sweep.corpus.staging import staged_directory


def document_key(row_id: str) -> str:
    """The id less its kind and index ('"8f24..."sc1' -> '"8f24..."'): one document's rows share it."""
    return row_id[:-3]


@dataclass(frozen=True)
class FoldSizes:
    forget_rows: int
    retain_rows: int
    documents: int
    members: int
    nonmembers: int


def _draw(items: list[str], fraction: float, rng: random.Random) -> set[str]:
    """`fraction` of the items, at least one and never all where there are two or more."""
    if len(items) < 2:
        return set()
    count = min(len(items) - 1, max(1, round(len(items) * fraction)))
    return set(rng.sample(items, count))


def _held_out_documents(task: TaskData, fraction: float, rng: random.Random) -> set[str]:
    groups: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)  # ordered sets of document keys
    for row in task.rows():
        groups[row.split, row.task][document_key(row.id)] = None
    return set().union(*(_draw(list(keys), fraction, rng) for _, keys in sorted(groups.items())))


def _member_folds(members: list[MiaDocument], folds: dict[str, TaskData]) -> list[str | None]:
    """Each member's fold: the one whose rows its document was cut from, by its text, else by its
    id (the release names members by document number in one fold and by sc row id in the other)."""
    texts = {text: fold for fold, task in folds.items() for text in task.documents()}
    ids = {
        name: fold
        for fold, task in folds.items()
        for row in task.rows()
        for name in (row.id, document_key(row.id).strip('"'))
    }
    return [texts.get(same_text(d.document), ids.get(d.id)) for d in members]


def split_folds(
    data: TaskData, mia_dir: str | Path, out_dir: str | Path, fraction: float = 0.2, seed: int = 0
) -> dict[str, FoldSizes]:
    """Write out_dir/data/{forget,retain}_{train,validation}-00000-of-00001.parquet and
    out_dir/mia/ (the train fold's MIA set, validation/ for the other, held_out.jsonl copied
    where mia_dir has one), whole or not at all. Returns each fold's sizes."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie between 0 and 1, got {fraction}")
    mia_dir = Path(mia_dir)
    documents = load_mia(mia_dir)
    rng = random.Random(seed)
    held_out = _held_out_documents(data, fraction, rng)
    folds = {
        fold: TaskData(
            *(
                [row for row in rows if (document_key(row.id) in held_out) == (fold == "validation")]
                for rows in (data.forget, data.retain)
            ),
            layout=f"hf parquet ({fold})",
        )
        for fold in HF_SPLITS
    }
    if not folds["validation"].forget or not folds["validation"].retain:
        raise DataError(out_dir, "too few documents to hold one out of each set: the held-out fold would be empty")
    mia: dict[str, dict[str, list[MiaDocument]]] = {fold: {"member": [], "nonmember": []} for fold in HF_SPLITS}
    members = [d for d in documents if d.membership == "member"]
    for number, (document, fold) in enumerate(zip(members, _member_folds(members, folds), strict=True), start=1):
        if fold is None:
            raise DataError(
                mia_dir / "member.jsonl",
                "is no document of the task (neither its text nor its id): its fold is unknown",
                number,
                "document",
            )
        mia[fold]["member"].append(document)
    nonmembers = [d for d in documents if d.membership == "nonmember"]
    held_out_nonmembers = _draw([d.id for d in nonmembers], fraction, rng)
    for document in nonmembers:
        mia["validation" if document.id in held_out_nonmembers else "train"]["nonmember"].append(document)
    if not mia["validation"]["member"]:
        raise DataError(
            mia_dir / "member.jsonl", "no member is a held-out document: the held-out MIA set would be empty"
        )

    with staged_directory(out_dir) as staging:
        (staging / "data").mkdir()
        for fold, task in folds.items():
            for name, rows in zip(SETS, (task.forget, task.retain), strict=True):
                records = [asdict(row) for row in rows]
                pq.write_table(
                    pa.Table.from_pylist(records), staging / "data" / f"{name}_{fold}-00000-of-00001.parquet"
                )
            folder = staging / "mia" / ("" if fold == "train" else fold)
            folder.mkdir(parents=True, exist_ok=True)
            for membership, chosen in mia[fold].items():
                lines = (json.dumps({"id": d.id, "document": d.document}, ensure_ascii=False) + "\n" for d in chosen)
                (folder / f"{membership}.jsonl").write_text("".join(lines), encoding="utf-8")
        if (mia_dir / HELD_OUT).is_file():
            (staging / "mia" / HELD_OUT).write_bytes((mia_dir / HELD_OUT).read_bytes())
    return {
        fold: FoldSizes(
            len(task.forget),
            len(task.retain),
            len({document_key(row.id) for row in task.rows()}),
            len(mia[fold]["member"]),
            len(mia[fold]["nonmember"]),
        )
        for fold, task in folds.items()
    }
