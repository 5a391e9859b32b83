"""Chunk stage: one downloaded shard → one chunk shard of token windows, cut with the embedding model's tokenizer.

Reads the source shard in row-group batches and writes one row group per batch, so memory is bounded by the batch;
the windows come from `chunking.chunk_texts` (pure, no I/O). The chunk shard is written to a temporary name,
renamed, then marked done with its statistics (`store.write_shard`); reruns write identical bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from volembed_runner import models, store
from volembed_runner.chunking import ChunkColumns, check_window, chunk_texts, load_tokenizer
from volembed_runner.errors import ModelError, SourceError, StageError
from volembed_runner.plan import Plan
from volembed_runner.sources.text import first_invalid_utf8, is_text_type

# Chunks shorter than this are reported as tiny in the stats (the tails the scripts we replace emitted).
TINY_CHUNK_TOKENS = 8

# Rows read from the input shard at a time; each such batch becomes one row group of the chunk shard.
READ_BATCH_ROWS = 2_048

# Upper bound of the chunks-per-document histogram (the last bucket is open-ended).
CHUNKS_PER_DOC_TOP = 1_024


OUTPUT_COLUMNS = ("doc_id", "chunk_index", "char_start", "char_end", "n_tokens", "text")

# Fixed writer settings, so a rerun writes the same bytes.
_WRITER_OPTIONS: dict[str, Any] = {
    "version": "2.6",
    "compression": "zstd",
    "compression_level": 1,
    "write_statistics": True,
    "data_page_version": "1.0",
}


def paths(root: Path, plan: Plan, shard: str) -> tuple[Path, Path]:
    """The source shard read and the chunk shard written."""
    return (
        store.shard_path(store.data_dir(root, plan.data.fingerprint), shard),
        store.shard_path(store.chunks_dir(root, plan.name, plan.chunk.fingerprint), shard),
    )


def run_shard(root: Path, plan: Plan, shard: str, max_rows: int | None = None) -> dict[str, Any]:
    """Chunk the first `max_rows` documents (all when None) of one downloaded shard into its chunk shard."""
    src, out = paths(root, plan, shard)
    if not store.is_done(src):
        raise StageError(f"source shard {shard} is not downloaded ({src}); run the download stage first")
    tokenizer = models.tokenizer_file(plan.model.location, plan.model.revision)
    return chunk_shard(
        src,
        out,
        tokenizer_path=tokenizer,
        size=plan.chunk.size,
        overlap=plan.chunk.overlap,
        keep_columns=list(plan.chunk.keep_columns),
        max_rows=max_rows,
        prefix=plan.chunk.prefix,
    )


@lru_cache(maxsize=4)
def _cached_tokenizer(path: str, mtime_ns: int, size: int) -> Tokenizer:
    """A tokenizer loaded once per worker process (keyed by file identity, so an edited file is reloaded)."""
    return load_tokenizer(Path(path))


def _shard_tokenizer(path: Path) -> Tokenizer:
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelError(f"cannot load tokenizer {path}: {exc.strerror or exc}") from exc
    return _cached_tokenizer(str(path), stat.st_mtime_ns, stat.st_size)


def _open_shard(in_path: Path, keep_columns: list[str]) -> pq.ParquetFile:
    """Open an input shard and check it has `id`, a string `text` and every kept column."""
    try:
        reader = pq.ParquetFile(in_path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read shard {in_path}: {exc}") from exc
    schema = reader.schema_arrow
    clash = sorted(set(keep_columns) & set(OUTPUT_COLUMNS))
    if clash:
        raise SourceError(f"keep_columns {clash} clash with the chunk columns {list(OUTPUT_COLUMNS)}; rename them")
    for name in ["id", "text", *keep_columns]:
        if schema.get_field_index(name) < 0:
            raise SourceError(f"shard {in_path} has no column {name!r} (columns: {schema.names})")
    if not is_text_type(schema.field("text").type):
        raise SourceError(f"shard {in_path}: column 'text' must hold strings, found {schema.field('text').type}")
    return reader


def _output_schema(source: pa.Schema, keep_columns: list[str]) -> pa.Schema:
    fields = [
        pa.field("doc_id", pa.string()),
        pa.field("chunk_index", pa.int32()),
        pa.field("char_start", pa.int64()),
        pa.field("char_end", pa.int64()),
        pa.field("n_tokens", pa.int32()),
        pa.field("text", pa.string()),
    ]
    fields += [pa.field(name, _takeable(source.field(name).type)) for name in keep_columns]
    return pa.schema(fields)


def _takeable(kind: pa.DataType) -> pa.DataType:
    """The type a kept column is written as: view types (which `take` does not support) become plain ones."""
    if pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_binary_view(kind):
        return pa.binary()
    return kind


def _read_batches(
    reader: pq.ParquetFile, columns: list[str], in_path: Path, max_rows: int | None
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The shard's first `max_rows` rows (all when None) in record batches, with the row each starts at.

    A damaged file raises SourceError.
    """
    first_row = 0
    batches = reader.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns)
    while max_rows is None or first_row < max_rows:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read shard {in_path} near row {first_row}: {exc}") from exc
        if max_rows is not None and first_row + batch.num_rows > max_rows:
            batch = batch.slice(0, max_rows - first_row)
        yield first_row, batch
        first_row += batch.num_rows


def _texts(column: pa.Array, in_path: Path, first_row: int) -> list[str]:
    """The text column as Python strings (null → empty document), with the row of any invalid UTF-8."""
    try:
        values = column.to_pylist()
    except UnicodeDecodeError:
        bad = first_invalid_utf8(column)
        if bad is None:
            raise
        row, exc = bad
        raise SourceError(f"shard {in_path}: row {first_row + row} of column 'text' is not valid UTF-8") from exc
    if column.null_count:
        values = ["" if v is None else v for v in values]
    return values


def _bucket_edges(top: int) -> list[int]:
    """Powers of two below `top`, then `top`: [1, 2, 4, ..., top]."""
    edges = [1]
    while edges[-1] * 2 < top:
        edges.append(edges[-1] * 2)
    if edges[-1] != top:
        edges.append(top)
    return edges


def _bucket_labels(edges: list[int], open_top: bool) -> list[str]:
    labels = [str(lo) if hi - 1 == lo else f"{lo}-{hi - 1}" for lo, hi in pairwise(edges)]
    labels.append(f"{edges[-1]}+" if open_top else str(edges[-1]))
    return labels


class _ShardStats:
    """Counts and histograms of one chunk shard, accumulated batch by batch."""

    def __init__(self, size: int) -> None:
        self.documents = 0
        self.empty_documents = 0
        self.chunks = 0
        self.tokens = 0
        self.doc_tokens = 0
        self.tiny_chunks = 0
        self.token_edges = np.asarray(_bucket_edges(size), dtype=np.int64)
        self.token_counts = np.zeros(len(self.token_edges), dtype=np.int64)
        self.doc_edges = np.asarray([0, *_bucket_edges(CHUNKS_PER_DOC_TOP)], dtype=np.int64)
        self.doc_counts = np.zeros(len(self.doc_edges), dtype=np.int64)

    def add(self, cols: ChunkColumns, n_tokens: np.ndarray, doc_index: np.ndarray) -> None:
        self.documents += cols.documents
        self.empty_documents += cols.empty_documents
        self.chunks += len(cols)
        self.tokens += int(n_tokens.sum())
        self.doc_tokens += cols.doc_tokens
        self.tiny_chunks += int((n_tokens < TINY_CHUNK_TOKENS).sum())
        buckets = np.searchsorted(self.token_edges, n_tokens, side="right") - 1
        self.token_counts += np.bincount(buckets, minlength=len(self.token_edges))
        per_doc = np.bincount(doc_index, minlength=cols.documents)
        buckets = np.searchsorted(self.doc_edges, per_doc, side="right") - 1
        self.doc_counts += np.bincount(buckets, minlength=len(self.doc_edges))

    def as_dict(self) -> dict[str, Any]:
        token_labels = _bucket_labels(self.token_edges.tolist(), open_top=False)
        doc_labels = ["0", *_bucket_labels(self.doc_edges[1:].tolist(), open_top=True)]
        return {
            "documents": self.documents,
            "empty_documents": self.empty_documents,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "doc_tokens": self.doc_tokens,
            "tiny_chunks": self.tiny_chunks,
            "token_histogram": dict(zip(token_labels, self.token_counts.tolist(), strict=True)),
            "chunks_per_doc_histogram": dict(zip(doc_labels, self.doc_counts.tolist(), strict=True)),
        }


def chunk_shard(
    in_path: Path,
    out_path: Path,
    *,
    tokenizer_path: Path,
    size: int,
    overlap: int,
    keep_columns: list[str],
    max_rows: int | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Chunk one input shard (`id`, `text`, keep_columns; its first `max_rows` rows) into one chunk shard.

    Reads row-group batches and writes one row group per batch, so memory is bounded by the shard; written to a
    temporary name, renamed, then marked done (`store.write_shard`). Reruns write identical bytes.
    Null texts count as empty documents. Histogram keys are token / chunk-count ranges ("2-3", "256", "1024+").
    """
    check_window(size, overlap)
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
    tokenizer = _shard_tokenizer(Path(tokenizer_path))
    reader = _open_shard(Path(in_path), list(keep_columns))
    schema = _output_schema(reader.schema_arrow, list(keep_columns))
    columns = ["id", "text", *keep_columns]

    def write(tmp: Path) -> dict[str, Any]:
        stats = _ShardStats(size)
        with pq.ParquetWriter(str(tmp), schema, use_dictionary=["doc_id", *keep_columns], **_WRITER_OPTIONS) as out:
            for first_row, batch in _read_batches(reader, columns, Path(in_path), max_rows):
                texts = _texts(batch.column("text"), Path(in_path), first_row)
                cols = chunk_texts(tokenizer, texts, size, overlap, prefix=prefix)
                doc_index = np.asarray(cols.doc_index, dtype=np.int64)
                n_tokens = np.asarray(cols.n_tokens, dtype=np.int32)
                take = pa.array(doc_index, type=pa.int64())
                arrays = [
                    batch.column("id").take(take).cast(pa.string()),
                    pa.array(cols.chunk_index, type=pa.int32()),
                    pa.array(cols.char_start, type=pa.int64()),
                    pa.array(cols.char_end, type=pa.int64()),
                    pa.array(n_tokens, type=pa.int32()),
                    pa.array(cols.text, type=pa.string()),
                ]
                arrays += [batch.column(name).cast(schema.field(name).type).take(take) for name in keep_columns]
                out.write_table(pa.Table.from_arrays(arrays, schema=schema))
                stats.add(cols, n_tokens, doc_index)
        return stats.as_dict()

    return store.write_shard(Path(out_path), write)

