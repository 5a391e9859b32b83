"""Text helpers shared by the readers and the chunk stage: arrow string types, UTF-8 checks that name the row or
line at fault, and opening (optionally gzipped) files."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from volembed_runner.errors import SourceError


def is_text_type(kind: pa.DataType) -> bool:
    """True for arrow string types (string, large_string, string_view)."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def first_invalid_utf8(arr: pa.Array) -> tuple[int, UnicodeDecodeError] | None:
    """The first element of a string array that is not valid UTF-8 (parquet does not check on read), and its error.

    Element by element, so only for naming the offending row once a whole-array conversion has failed.
    """
    for i in range(len(arr)):
        try:
            arr[i].as_py()
        except UnicodeDecodeError as exc:
            return i, exc
    return None


def utf8_lines(fh: Any, name: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a binary file; invalid UTF-8 raises naming the line and its byte offset."""
    offset = 0
    for lineno, raw in enumerate(fh, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            at = offset + exc.start
            raise SourceError(f"{name}: line {lineno}: invalid UTF-8 (byte offset {at} in the file)") from None
        offset += len(raw)
        yield lineno, line


def decode_utf8(raw: bytes, where: str) -> str:
    """A whole file's bytes as text; invalid UTF-8 raises naming the line and byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SourceError(f"{where}: line {line}: invalid UTF-8 (byte offset {exc.start})") from None


def open_binary(path: Path, gz: bool) -> IO[bytes]:
    """A binary file object, gunzipping on the fly when `gz`."""
    return gzip.open(path, "rb") if gz else open(path, "rb")

