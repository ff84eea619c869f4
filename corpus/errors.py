"""The one error type for bad input data: a message naming file, row and field."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data. The CLI prints it on one line and exits 2."""

    def __init__(self, path: str | Path, problem: str, row: int | None = None, field: str | None = None):
        self.parts = (path, problem, row, field)
        where = str(path)
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple:
        # Rebuilt from its parts: a Ray task or actor that raises it sends it pickled to the
        # driver, and the default (the message alone) does not fit this constructor.
        return type(self), self.parts


def read_text(path: Path) -> str:
    """A file's text as UTF-8, or a DataError naming the file and the first byte that is not."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            path, f"not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}): save it as UTF-8"
        ) from None
