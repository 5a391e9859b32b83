"""JSON sources (optionally gzipped): JSON lines, a list of records, an object mapping key → record, or one record."""

from __future__ import annotations

import zlib
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from volembed_runner.errors import SourceError, first_line
from volembed_runner.sources.parquet import READ_BATCH_ROWS
from volembed_runner.sources.shape import Records, Shape
from volembed_runner.sources.text import decode_utf8, open_binary, utf8_lines


def read_jsonl(path: Path, name: str, shape: Shape, task: int, gz: bool) -> Generator[pa.Table, None, None]:
    """Stream JSON lines (one object per line; blank lines skipped), one block of records at a time."""
    records = Records.start(shape, name)
    lineno = 0
    try:
        with open_binary(path, gz) as fh:
            for lineno, line in utf8_lines(fh, name):
                if not line.strip():
                    continue
                where = f"{name}: line {lineno}"
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise SourceError(f"{where}: invalid JSON ({exc})") from None
                records.add(record, f"{task}:{records.rows}", where)
                if len(records) >= READ_BATCH_ROWS:
                    yield records.take()
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{name}: cannot read after line {lineno} ({first_line(exc)})") from None
    if len(records):
        yield records.take()
    records.check_keep()


def read_json(path: Path, name: str, shape: Shape, task: int, gz: bool) -> Generator[pa.Table, None, None]:
    """A JSON list of records, an object mapping key → record (the key is the default id), or one record."""
    try:
        with open_binary(path, gz) as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{name}: cannot read ({first_line(exc)})") from None
    text = decode_utf8(raw, name)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if _looks_like_jsonl(text):
            yield from read_jsonl(path, name, shape, task, gz)
            return
        raise SourceError(f"{name}: invalid JSON ({exc})") from None
    del raw, text
    if isinstance(obj, list):
        items: Iterable[tuple[str, str, Any]] = (
            (f"{task}:{i}", f"{name}: record {i + 1}", rec) for i, rec in enumerate(obj)
        )
    elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        items = ((str(k), f"{name}: key '{k}'", rec) for k, rec in obj.items())
    elif isinstance(obj, dict):
        items = [(f"{task}:0", name, obj)]  # one object that is not a mapping of records: a single record
    else:
        raise SourceError(f"{name}: expected a list of records or an object mapping keys to records")
    records = Records.start(shape, name)
    for default_id, where, record in items:
        records.add(record, default_id, where)
        if len(records) >= READ_BATCH_ROWS:
            yield records.take()
    if len(records):
        yield records.take()
    records.check_keep()


def _looks_like_jsonl(text: str) -> bool:
    """A `.json` file that is really JSON lines: its first line alone is a JSON object."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(orjson.loads(first), dict)
    except orjson.JSONDecodeError:
        return False

