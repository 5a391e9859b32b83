"""Document sources: one document per .txt/.md/.pdf file (a folder of them, or one file), with its relative path."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pyarrow as pa

from volembed_runner.errors import SourceError, first_line
from volembed_runner.sources.files import folder_documents
from volembed_runner.sources.parquet import READ_BATCH_ROWS
from volembed_runner.sources.shape import Records, Shape
from volembed_runner.sources.text import decode_utf8

# A folder's documents become a new table once they hold this many characters (shards stay bounded).
TABLE_CHARS = 32 * 2**20


def read_documents(path: Path, name: str, shape: Shape) -> Generator[pa.Table, None, None]:
    """One document per .txt/.md/.pdf file (a folder, or one file): columns `path` (relative) and `text`."""
    docs = folder_documents(path) if path.is_dir() else [(path.name, path)]
    shape.check_columns(name, ["path", "text"])
    records = Records.start(shape, name)
    chars = 0  # characters in `records`
    for rel, doc in docs:
        where = f"{name}/{rel}" if path.is_dir() else name
        text = _pdf_text(doc, where) if doc.suffix.lower() == ".pdf" else _plain_text(doc, where)
        records.add({"path": rel, "text": text}, rel, where)
        chars += len(text)
        if len(records) >= READ_BATCH_ROWS or chars > TABLE_CHARS:
            yield records.take()
            chars = 0
    if len(records):
        yield records.take()


def _plain_text(path: Path, where: str) -> str:
    """A text document's content as UTF-8 (a leading BOM dropped); invalid bytes raise naming line and offset."""
    return decode_utf8(path.read_bytes(), where).removeprefix("\ufeff")


def _pdf_text(path: Path, where: str) -> str:
    """The text of every page, joined by blank lines (pypdf; no OCR: scanned pages give no text)."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise SourceError(f"{where}: the PDF is encrypted")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except SourceError:
        raise
    except Exception as exc:  # pypdf raises many kinds of errors on a damaged file
        raise SourceError(f"{where}: unreadable PDF ({type(exc).__name__}: {first_line(exc)})") from None

