"""Download stage: a dataset's sources → bounded parquet shards on the volume, one writer per task, resumable.

One task per source file (see `sources.list_tasks`). `download_task` streams one source into
`shard-<task>-<part>.parquet` files (columns `id`, `text`, then the spec's keep_columns), each written atomically and
marked done, then a task marker listing them; `finalize` applies `limit` in shard order and writes `index.json`, the
shard list the chunk stage maps over. A Hub file is downloaded to this machine's (or container's) local disk and
deleted once its shards are written: only shards reach the volume.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from volembed_runner import sources, store
from volembed_runner.errors import SourceError, StageError, first_line
from volembed_runner.plan import DataSettings
from volembed_runner.sources import Shape, SourceTask


class _ShardWriter:
    """Cuts a stream of shaped tables into shards of at most `max_rows` rows and about `max_bytes` of text."""

    def __init__(self, folder: Path, task: int, max_rows: int, max_bytes: int) -> None:
        self.folder, self.task, self.max_rows, self.max_bytes = folder, task, max_rows, max_bytes
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.bytes = 0
        self.written: list[str] = []

    def add(self, table: pa.Table) -> None:
        """Append rows, writing a shard each time the row or byte bound is reached."""
        while table.num_rows:
            sizes = pc.cumulative_sum(pc.binary_length(table.column("text")).cast(pa.int64()))
            fit = pc.sum(pc.less_equal(sizes, self.max_bytes - self.bytes)).as_py() or 0
            n = min(self.max_rows - self.rows, fit)
            if n == 0 and self.rows == 0:
                n = 1  # one document larger than the byte bound gets a shard of its own
            if n == 0:
                self.flush()
                continue
            self.pending.append(table.slice(0, n))
            self.rows += n
            self.bytes += sizes[n - 1].as_py()
            table = table.slice(n)
            if table.num_rows or self.rows >= self.max_rows:
                self.flush()

    def flush(self) -> None:
        """Write the pending rows as the next shard of the task (tmp file, rename, done-marker)."""
        if not self.pending:
            return
        try:
            table = pa.concat_tables(self.pending, promote_options="permissive").combine_chunks()
        except (pa.ArrowException, TypeError) as exc:
            raise SourceError(f"task {self.task}: keep columns change type between rows ({first_line(exc)})") from None
        shard = f"{self.task:05d}-{len(self.written):04d}"
        stats = {"rows": table.num_rows, "bytes": self.bytes}

        def write(tmp: Path) -> dict[str, Any]:
            pq.write_table(table, tmp, compression="zstd")
            return stats

        store.write_shard(store.shard_path(self.folder, shard), write)
        self.written.append(shard)
        self.pending, self.rows, self.bytes = [], 0, 0

    def discard(self) -> None:
        """Remove what this attempt wrote, so a failed task leaves nothing that looks finished."""
        for shard in self.written:
            path = store.shard_path(self.folder, shard)
            store.clear_done(path)
            path.unlink(missing_ok=True)


def finished_shards(root: Path, data: DataSettings, task: SourceTask) -> list[str] | None:
    """The task's shard ids if its marker exists and every shard is done; None if the task must run."""
    folder = store.data_dir(root, data.fingerprint)
    marker = store.read_json(store.task_marker_path(folder, task.index))
    if marker is None:
        return None
    shards = [str(s) for s in marker.get("shards", [])]
    return shards if all(store.is_done(store.shard_path(folder, s)) for s in shards) else None


def _clear_task(folder: Path, index: int) -> None:
    """Forget an unfinished earlier attempt of a task: its marker, then its shards' markers and files."""
    store.task_marker_path(folder, index).unlink(missing_ok=True)
    for path in folder.glob(f"shard-{index:05d}-*.parquet"):
        store.clear_done(path)
        path.unlink(missing_ok=True)
    store.remove_dead_temporaries(folder, f"shard-{index:05d}-")  # left by a killed writer


def download_task(root: Path, data: DataSettings, task: SourceTask) -> list[str]:
    """Read one source into done-marked shards `<task>-<part>` (an earlier attempt's are cleared); returns their ids."""
    folder = store.data_dir(root, data.fingerprint)
    _clear_task(folder, task.index)
    writer = _ShardWriter(folder, task.index, data.shard_rows, store.MAX_SHARD_TEXT_BYTES)
    # With a row-count limit no task can contribute more than `limit` rows to the first N, so it stops there.
    cap = data.limit if isinstance(data.limit, int) else None
    scratch = Path(tempfile.mkdtemp(prefix="volembed-download-"))
    tables = sources.read_task(task, Shape.of(data), download_dir=scratch)
    read = 0
    try:
        for table in tables:
            if cap is not None:
                table = table.slice(0, max(0, cap - read))
            writer.add(table)
            read += table.num_rows
            if cap is not None and read >= cap:
                break
        writer.flush()
    except BaseException:
        writer.discard()
        raise
    finally:
        tables.close()  # a source left early (limit) releases its file now
        shutil.rmtree(scratch, ignore_errors=True)
    record = {"source": task.source, "shards": writer.written}
    store.write_json_atomic(store.task_marker_path(folder, task.index), record)
    return list(writer.written)


# ---------------------------------------------------------------------------------------------------------- finalizing


def finalize(root: Path, data: DataSettings, tasks: list[SourceTask]) -> list[tuple[str, int | None]]:
    """Apply `limit` in shard order and write `index.json`: (shard id, rows to take or None for all) per shard used.

    `rows` in the index counts rows downloaded: with an integer limit each task stops after `limit` rows.
    """
    folder = store.data_dir(root, data.fingerprint)
    shards: list[tuple[str, int]] = []
    for task in sorted(tasks, key=lambda t: t.index):
        ids = finished_shards(root, data, task)
        if ids is None:
            raise StageError(f"download of {task.source} did not finish; rerun to resume")
        shards.extend((s, int(store.read_marker(store.shard_path(folder, s))["rows"])) for s in ids)
    total = sum(rows for _, rows in shards)
    if total == 0:
        raise SourceError(f"dataset is empty: {sources.describe(data)} holds no rows")
    wanted = sources.limit_rows(data.limit, total)
    entries, left = [], wanted
    for shard, rows in shards:
        if left == 0:
            break
        take = min(rows, left)
        entries.append({"id": shard, "rows": rows, "take": take})
        left -= take
    store.write_json_atomic(store.data_index_path(folder), {"shards": entries, "rows": total, "taken": wanted})
    return _index_list(entries)


def read_index(root: Path, data: DataSettings) -> list[tuple[str, int | None]] | None:
    """The shard list `finalize` wrote for this data fingerprint, or None before the download finished."""
    index = store.read_json(store.data_index_path(store.data_dir(root, data.fingerprint)))
    return None if index is None else _index_list(index["shards"])


def _index_list(entries: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    """Index entries as (shard id, rows to take, None when the whole shard is used)."""
    return [(e["id"], e["take"] if e["take"] < e["rows"] else None) for e in entries]


