"""Index stage (`output.index: lancedb`): the run's finished vectors as one LanceDB table, for `search`.

One input per run, after every embed unit is done: the embedding files are streamed into the table a record batch at
a time (bounded memory whatever the run's size), with every column they carry (ids, offsets, keep_columns, text when
`output.include_text`), the vectors as fixed_size_list<float32>[dim] and the chunk shard each row came from (so a
hit's text can be read from its chunk shard when the table holds none). A table of `ann_min_rows` rows or more then
gets an ANN index on `embedding` (`plan.ANN_INDEX`, cosine); a smaller one is searched exactly. The table is marked
done last, beside it (`chunks.lance.done`); a rerun rewrites a table without its marker.

The lancedb package is the `index` extra, imported only here, so a run without `output.index` never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner import store
from volembed_runner.errors import StageError
from volembed_runner.plan import Plan
from volembed_runner.units import parse_key

TABLE = "chunks"
KEY = "table"  # the stage's one input
BATCH_ROWS = 8192


def table_path(root: Path, plan: Plan) -> Path:
    """The run's LanceDB table folder (inside the index database folder)."""
    if plan.index is None:
        raise StageError("the spec has no output.index")
    return store.index_dir(root, plan.name, plan.index.fingerprint) / f"{TABLE}.lance"


def _lancedb() -> Any:
    os.environ.setdefault("LANCEDB_LOG", "error")  # its Rust log warns on every new table; errors still show
    try:
        import lancedb
    except ImportError:
        raise StageError("output.index: lancedb needs the `index` extra (pip install 'volembed-runner[index]')") \
            from None
    return lancedb


def open_table(database: Path) -> Any:
    """The finished table in a LanceDB database folder (for `search`)."""
    return _lancedb().connect(str(database)).open_table(TABLE)


def _batches(files: list[tuple[str, Path]], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for shard, path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            shards = pa.array([shard] * batch.num_rows, type=pa.string())
            yield pa.RecordBatch.from_arrays([*batch.columns, shards], schema=schema)


def build_index(root: Path, plan: Plan, key: str = KEY) -> dict[str, Any]:
    """Write the run's LanceDB table from its finished embedding files (in unit order); returns its stats."""
    if plan.index is None:
        raise StageError("the spec has no output.index")
    folder = store.embeddings_dir(root, plan.name, plan.embed.fingerprint)
    units = store.done_shards(folder)
    if not units:
        raise StageError(f"no finished embedding files in {folder}; run the embed stage first")
    files = [(parse_key(unit)[0], store.shard_path(folder, unit)) for unit in units]
    expected = sum(int(store.read_marker(path).get("rows", 0)) for _, path in files)
    first = pq.read_schema(files[0][1]).remove_metadata()
    schema = first.append(pa.field("shard", pa.string()))
    lancedb = _lancedb()
    out = table_path(root, plan)
    store.clear_done(out)
    database = lancedb.connect(str(out.parent))
    table = database.create_table(TABLE, data=pa.RecordBatchReader.from_batches(schema, _batches(files, schema)),
                                  mode="overwrite")
    rows = table.count_rows()
    if rows != expected:
        raise StageError(f"index: the table holds {rows} rows, the embedding files {expected}; not marked done")
    ann = rows >= plan.index.ann_min_rows
    if ann:
        from lancedb.index import IvfHnswSq

        table.create_index("embedding", config=IvfHnswSq(distance_type="cosine"), replace=True)
    stats = {"rows": rows, "dim": int(first.field("embedding").type.list_size),
             "ann_index": plan.index.ann_index if ann else None, "lancedb": lancedb.__version__}
    store.mark_done(out, stats)
    return stats
