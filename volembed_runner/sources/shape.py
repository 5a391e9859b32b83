"""Source rows → the shard's columns: `id`, `text` (one column, or a rendered `text_template`) and keep_columns.

Every check names the source, the row (or record) and the column at fault in one line. Readers (one module per
format) produce arrow batches or records; `shape_batch` and `Records` turn them into shard tables.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from volembed_runner.errors import SourceError, first_line, name_list
from volembed_runner.sources.text import first_invalid_utf8, is_text_type
from volembed_runner.spec import template_fields

if TYPE_CHECKING:
    from volembed_runner.plan import DataSettings

@dataclass(frozen=True)
class Shape:
    """Which source columns become the shard's `id`, `text` and keep columns."""

    text_column: str | None
    template: str | None
    template_columns: tuple[str, ...]
    id_column: str | None
    keep_columns: tuple[str, ...]

    @classmethod
    def of(cls, data: DataSettings) -> Shape:
        """The shape a (validated) DataSettings asks for."""
        return cls(
            text_column=None if data.text_template else (data.text_column or "text"),
            template=data.text_template,
            template_columns=tuple(template_fields(data.text_template)) if data.text_template else (),
            id_column=data.id_column,
            keep_columns=tuple(data.keep_columns),
        )

    @property
    def needed(self) -> list[str]:
        """Source columns to read, in order, each once."""
        text = list(self.template_columns) if self.template else [str(self.text_column)]
        return list(dict.fromkeys([*text, *([self.id_column] if self.id_column else []), *self.keep_columns]))

    def check_columns(self, name: str, columns: list[str]) -> None:
        """Raise naming the first column the source lacks, and the columns it has."""
        have = f"(columns: {name_list(columns, 30)})"
        if self.text_column is not None and self.text_column not in columns:
            raise SourceError(f"{name}: no text column '{self.text_column}' {have}")
        for c in self.template_columns:
            if c not in columns:
                raise SourceError(f"{name}: text_template names column '{c}', which is missing {have}")
        if self.id_column and self.id_column not in columns:
            raise SourceError(f"{name}: id_column '{self.id_column}' is missing {have}")
        for c in self.keep_columns:
            if c not in columns:
                raise SourceError(f"{name}: keep_columns '{c}' is missing {have}")


def _render(template: str, row: dict[str, Any], where: str) -> str:
    """Render the text template for one row; a null value renders as an empty string."""
    try:
        return template.format_map({k: "" if v is None else v for k, v in row.items()})
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise SourceError(f"{where}: text_template cannot be rendered ({type(exc).__name__}: {exc})") from None


def _short(value: Any) -> str:
    """A value for an error message, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def shape_batch(batch: pa.RecordBatch, shape: Shape, name: str, task: int, row0: int) -> pa.Table:
    """Source rows (a batch starting at 0-based row `row0`) → the shard's columns, with one-line errors by row."""
    n = batch.num_rows
    if shape.template:
        for c in shape.template_columns:
            _valid_strings(batch.column(c), name, c, row0)
        rows = batch.select(list(shape.template_columns)).to_pylist()
        text = pa.array(
            [_render(shape.template, r, f"{name}: row {row0 + i + 1}") for i, r in enumerate(rows)], pa.string()
        )
    else:
        text = _text_array(batch.column(str(shape.text_column)), name, str(shape.text_column), row0)
    if shape.id_column:
        ids = _id_array(batch.column(shape.id_column), name, shape.id_column, row0)
    else:
        ids = pa.array([f"{task}:{row0 + i}" for i in range(n)], pa.string())
    columns = {"id": ids, "text": text} | {c: batch.column(c) for c in shape.keep_columns}
    return pa.table(columns)


def _decoded(arr: pa.Array) -> pa.Array:
    """Dictionary-encoded columns (common in parquet) as plain arrays."""
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _first_valid(arr: pa.Array) -> tuple[int, Any]:
    """Index and value of the first non-null element, to name an offending row."""
    for i in range(len(arr)):
        if arr[i].is_valid:
            return i, arr[i].as_py()
    return 0, None


def _valid_strings(arr: pa.Array, name: str, column: str, row0: int) -> None:
    """Raise naming the first row whose string is not valid UTF-8 (parquet does not check on read)."""
    arr = _decoded(arr)
    if not is_text_type(arr.type):
        return
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        bad = first_invalid_utf8(arr)
        if bad is None:
            raise SourceError(f"{name}: column '{column}' near row {row0 + 1} is not valid UTF-8") from None
        i, exc = bad
        raise SourceError(
            f"{name}: row {row0 + i + 1}: column '{column}' is not valid UTF-8 (byte {exc.start})"
        ) from None


def _text_array(arr: pa.Array, name: str, column: str, row0: int) -> pa.Array:
    """The text column as strings (null → empty document); anything but text raises naming a row."""
    arr = _decoded(arr)
    if pa.types.is_null(arr.type):
        return pa.array([""] * len(arr), pa.string())
    if not is_text_type(arr.type):
        i, value = _first_valid(arr)
        raise SourceError(
            f"{name}: row {row0 + i + 1}: column '{column}' holds {arr.type} values ({_short(value)}), not text"
        )
    _valid_strings(arr, name, column, row0)
    return pc.fill_null(arr.cast(pa.string()), "")


def _id_array(arr: pa.Array, name: str, column: str, row0: int) -> pa.Array:
    """The id column as strings: text or integers, never null."""
    arr = _decoded(arr)
    if arr.null_count:
        i = pc.index(pc.is_null(arr), True).as_py()
        raise SourceError(f"{name}: row {row0 + i + 1}: id column '{column}' is null")
    if is_text_type(arr.type):
        _valid_strings(arr, name, column, row0)
    elif not pa.types.is_integer(arr.type):
        raise SourceError(f"{name}: id column '{column}' holds {arr.type} values; ids must be text or integers")
    return arr.cast(pa.string())


def guarded(batches: Iterator[pa.RecordBatch], on_error: Callable[[Exception, int], SourceError]) -> Iterator[Any]:
    """Yield (0-based first row, batch), turning a read failure into a SourceError that says where it happened."""
    row0 = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, EOFError, zlib.error, ValueError) as exc:
            raise on_error(exc, row0) from None
        yield row0, batch
        row0 += batch.num_rows


@dataclass
class Records:
    """Accumulates parsed records and turns them into shard-column tables, checking each one."""

    shape: Shape
    name: str
    ids: list[str]
    texts: list[str]
    keep: dict[str, list[Any]]
    seen_keep: set[str]
    first_columns: list[str] | None = None
    rows: int = 0

    @classmethod
    def start(cls, shape: Shape, name: str) -> Records:
        """An empty accumulator for the source `name`."""
        return cls(shape, name, [], [], {c: [] for c in shape.keep_columns}, set())

    def add(self, record: Any, default_id: str, where: str) -> None:
        """Check one record and add its id, text and keep values; `where` names it in errors."""
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__} ({_short(record)})")
        if self.first_columns is None:
            self.first_columns = list(record)
        shape = self.shape
        if shape.template:
            for c in shape.template_columns:
                if c not in record:
                    raise SourceError(
                        f"{where}: text_template names column '{c}', which is missing (columns: {name_list(record)})"
                    )
            text = _render(shape.template, {c: record[c] for c in shape.template_columns}, where)
        else:
            column = str(shape.text_column)
            if column not in record:
                raise SourceError(f"{where}: no text column '{column}' (columns: {name_list(record)})")
            value = record[column]
            if value is not None and not isinstance(value, str):
                raise SourceError(f"{where}: column '{column}' is {type(value).__name__} ({_short(value)}), not text")
            text = value or ""
        self.texts.append(text)
        self.ids.append(record_id(record, shape.id_column, default_id, where))
        for c in shape.keep_columns:
            if c in record:
                self.seen_keep.add(c)
            self.keep[c].append(record.get(c))
        self.rows += 1

    def __len__(self) -> int:
        """Records waiting to be taken."""
        return len(self.ids)

    def take(self) -> pa.Table:
        """The accumulated records as a table; the accumulator starts over."""
        try:
            columns = {"id": pa.array(self.ids, pa.string()), "text": pa.array(self.texts, pa.string())}
        except (pa.ArrowException, UnicodeEncodeError) as exc:
            raise SourceError(f"{self.name}: text is not valid Unicode ({first_line(exc)})") from None
        for c, values in self.keep.items():
            try:
                columns[c] = pa.array(values)
            except (pa.ArrowException, TypeError, OverflowError, UnicodeEncodeError) as exc:
                raise SourceError(f"{self.name}: keep column '{c}' mixes value types ({first_line(exc)})") from None
        self.ids, self.texts, self.keep = [], [], {c: [] for c in self.shape.keep_columns}
        return pa.table(columns)

    def check_keep(self) -> None:
        """After the whole source: a keep column no record had is an error, not a column of nulls."""
        if self.rows:
            for c in self.shape.keep_columns:
                if c not in self.seen_keep:
                    have = name_list(self.first_columns or [], 30)
                    raise SourceError(f"{self.name}: keep_columns '{c}' is missing from every record (columns: {have})")


def record_id(record: dict[str, Any], column: str | None, default: str, where: str) -> str:
    """A record's id: its id column (text or integer), else the default (row id, mapping key, file path)."""
    if not column:
        return default
    if column not in record:
        raise SourceError(f"{where}: id_column '{column}' is missing (columns: {name_list(record)})")
    value = record[column]
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = type(value).__name__
    raise SourceError(f"{where}: id column '{column}' is {kind} ({_short(value)}); ids are text or integers")

