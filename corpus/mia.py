"""Membership-inference documents: member.jsonl and nonmember.jsonl with {id, document}."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.tables import read_records, require_fields

MEMBERSHIPS = ("member", "nonmember")


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
    for membership in MEMBERSHIPS:
        path = mia_dir / f"{membership}.jsonl"
        records = read_records(path)
        if not records:
            raise DataError(path, f"the {membership} set is empty")
        require_fields(path, records, ("id", "document"))
        for index, record in enumerate(records, start=1):
            if not isinstance(record["document"], str) or not record["document"].strip():
                raise DataError(path, "expected a non-empty string", index, "document")
            documents.append(MiaDocument(str(record["id"]), record["document"], membership))
    return documents
