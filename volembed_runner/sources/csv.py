"""CSV sources (optionally gzipped): a header row, quoted fields that may span lines; the columns used read as text."""

from __future__ import annotations

import zlib
from collections.abc import Generator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv

from volembed_runner.errors import SourceError, first_line
from volembed_runner.sources.shape import Shape, guarded, shape_batch
from volembed_runner.sources.text import open_binary, utf8_lines


def read_csv(path: Path, name: str, shape: Shape, task: int, gz: bool) -> Generator[pa.Table, None, None]:
    """Stream a CSV file (header row; quoted fields may span lines); the columns used are read as text."""
    needed = shape.needed

    def on_error(exc: Exception, row0: int) -> SourceError:
        if "UTF8" in str(exc):
            bad = _find_bad_utf8(path, name, gz)
            if bad is not None:
                return bad
        return SourceError(f"{name}: cannot read CSV after row {row0} ({first_line(exc)})")

    try:
        stream = pa.input_stream(str(path), compression="gzip" if gz else None)
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(block_size=8 << 20),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in needed}),
        )
    except (pa.ArrowException, OSError, EOFError, zlib.error) as exc:
        raise on_error(exc, 0) from None
    shape.check_columns(name, reader.schema.names)
    for row0, batch in guarded(iter(reader), on_error):
        yield shape_batch(batch.select(needed), shape, name, task, row0)


def _find_bad_utf8(path: Path, name: str, gz: bool) -> SourceError | None:
    """The error naming the line and byte offset of the file's first invalid UTF-8; None if there is none."""
    try:
        with open_binary(path, gz) as fh:
            for _ in utf8_lines(fh, name):
                pass
    except SourceError as exc:
        return exc
    return None

