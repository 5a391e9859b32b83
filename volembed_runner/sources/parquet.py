"""Parquet sources: streamed batch by batch (row groups are never loaded whole), only the columns needed."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner.errors import SourceError, first_line
from volembed_runner.sources.shape import Shape, guarded, shape_batch

READ_BATCH_ROWS = 1024


def read_parquet(path: Path, name: str, shape: Shape, task: int) -> Generator[pa.Table, None, None]:
    """Stream a parquet file batch by batch (row groups are never loaded whole), only the columns needed."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{name}: not a readable parquet file ({first_line(exc)})") from None
    shape.check_columns(name, pf.schema_arrow.names)
    batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=shape.needed, use_threads=False)
    on_error = lambda exc, row0: SourceError(  # noqa: E731
        f"{name}: corrupt parquet data after row {row0} ({first_line(exc)})"
    )
    for row0, batch in guarded(batches, on_error):
        yield shape_batch(batch, shape, name, task, row0)

