"""Membership-inference documents: member.jsonl and nonmember.jsonl with {id, document}, and
held-out documents (the same format) that a method may calibrate on: never the scored ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.semeval import hf_folds, load_task, same_text
from unlearn_sweep.corpus.tables import read_records, require_fields

MEMBERSHIPS = ("member", "nonmember")
HELD_OUT = "held_out.jsonl"  # the toy task's: apart from both folds' scored sets
RELEASE_HELD_OUT = Path("validation") / "nonmember.jsonl"  # the public release's other fold, beside the scored set


@dataclass(frozen=True)
class MiaDocument:
    id: str
    document: str
    membership: str  # "member" or "nonmember"


def load_mia(mia_dir: str | Path) -> list[MiaDocument]:
    """Members then nonmembers, validated; both files must be present and non-empty."""
    mia_dir = Path(mia_dir)
    if not mia_dir.is_dir():
        raise DataError(mia_dir, "MIA directory not found")
    documents = []
    seen_ids: dict[str, str] = {}
    seen_texts: dict[str, str] = {}
    for membership in MEMBERSHIPS:
        path = mia_dir / f"{membership}.jsonl"
        for number, document in enumerate(_read_documents(path, membership), start=1):
            # One document counted twice, or as both member and nonmember, would bend the AUC.
            if document.id in seen_ids:
                raise DataError(path, f"id {document.id!r} again (first in {seen_ids[document.id]})", number, "id")
            if document.document in seen_texts:
                raise DataError(path, f"the same document as id {seen_texts[document.document]!r}", number, "document")
            seen_ids[document.id] = f"{membership}.jsonl"
            seen_texts[document.document] = document.id
            documents.append(document)
    return documents


def _read_documents(path: Path, membership: str) -> list[MiaDocument]:
    records = read_records(path)
    if not records:
        raise DataError(path, f"the {membership} set is empty")
    require_fields(path, records, ("id", "document"))
    documents = []
    for index, record in enumerate(records, start=1):
        if not isinstance(record["document"], str) or not record["document"].strip():
            raise DataError(path, "expected a non-empty string", index, "document")
        documents.append(MiaDocument(str(record["id"]), record["document"], membership))
    return documents


def load_held_out(path: str | Path, scored_mia_dir: str | Path | None) -> tuple[str, ...]:
    """Documents the base model never saw, for a method to calibrate forgetting against; none
    may be a document of the scored MIA set (by id or by text), where that set is given:
    calibrating on the documents the MIA score is computed from would fit the score, not forget."""
    path = Path(path)
    held_out = _read_documents(path, "held-out")
    if scored_mia_dir is None:
        return tuple(doc.document for doc in held_out)
    scored = load_mia(scored_mia_dir)
    scored_ids, scored_texts = {doc.id for doc in scored}, {doc.document for doc in scored}
    shared = sum(doc.id in scored_ids or doc.document in scored_texts for doc in held_out)
    if shared:
        raise DataError(
            path,
            f"{shared} of its {len(held_out)} documents are in the scored MIA set {scored_mia_dir}: "
            "held-out documents must be ones the MIA score is not computed on",
        )
    return tuple(doc.document for doc in held_out)


def check_mia_fold(documents: list[MiaDocument], mia_dir: str | Path, data_dir: str | Path, split: str | None) -> None:
    """Where the task directory holds both folds, refuses the MIA set read from mia_dir and scored
    with fold `split` (default train) if its documents are the other fold's: a run that unlearned
    one fold would be measured on documents of the other."""
    folds, scored = hf_folds(data_dir), split or "train"
    if len(folds) < 2 or scored not in folds:
        return
    other = next(fold for fold in folds if fold != scored)
    theirs = load_task(data_dir, other).documents()
    shared = sum(same_text(doc.document) in theirs for doc in documents)
    if shared:
        raise DataError(
            mia_dir,
            f"{shared} of its {len(documents)} documents are documents of the {other} fold: "
            "an MIA set is scored with the fold its members come from",
        )


def default_held_out(mia_dir: str | Path) -> Path | None:
    """<mia>/held_out.jsonl, else <mia>/validation/nonmember.jsonl, where one exists."""
    for candidate in (HELD_OUT, RELEASE_HELD_OUT):
        path = Path(mia_dir) / candidate
        if path.is_file():
            return path
    return None
