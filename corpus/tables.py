"""Reading JSONL, parquet and CSV files into lists of dicts with pyarrow, errors named by file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from unlearn_sweep.corpus.errors import DataError, read_text


def read_records(path: Path, csv_column_names: list[str] | None = None) -> list[dict]:
    """Rows of a .jsonl, .parquet or header-less .csv file (CSV needs column names)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        elif path.suffix in (".jsonl", ".json"):
            if path.stat().st_size == 0:
                return []
            # Strings stay strings: ids like "69383905" must not become integers.
            table = pa_json.read_json(path, parse_options=pa_json.ParseOptions(newlines_in_values=False))
        elif path.suffix == ".csv":
            if csv_column_names is None:
                raise DataError(path, "CSV needs column names")
            table = pa_csv.read_csv(
                path,
                read_options=pa_csv.ReadOptions(column_names=csv_column_names),
                convert_options=pa_csv.ConvertOptions(column_types={name: pa.string() for name in csv_column_names}),
            )
        else:
            raise DataError(path, f"unsupported file type '{path.suffix}' (use .jsonl, .parquet or .csv)")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
        if path.suffix in (".jsonl", ".json"):
            # Arrow's message names neither the line nor the fault (a value whose type differs
            # from the rows before is "row 0" of a block): read line by line, and let the
            # caller's checks name the row and the field.
            return _json_lines(path)
        first_line = str(error).strip().splitlines()[0]
        # Arrow counts JSON rows from 0; people (and editors) count lines from 1.
        first_line = re.sub(r" in row (\d+)$", lambda match: f" on line {int(match.group(1)) + 1}", first_line)
        raise DataError(path, f"cannot read: {first_line}") from None
    try:
        return table.to_pylist()
    except UnicodeDecodeError:  # Arrow decodes strings only when they are read out
        read_text(path)
        raise


def _json_lines(path: Path) -> list[dict]:
    """The records of a JSONL file, or a DataError naming its first line that is not one JSON object."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, f"line {number}: not JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(path, f"line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def require_fields(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    """Every row has every field, non-null."""
    for index, row in enumerate(rows, start=1):
        for field in fields:
            if row.get(field) is None:
                raise DataError(path, "missing value" if field in row else "missing column", index, field)
