"""Download stage: a dataset's sources → bounded parquet shards on the volume, one writer per task, resumable.

One task per source file (see `sources.list_tasks`). `download_task` streams one source into
`shard-<task>-<part>.parquet` files (columns `id`, `text`, then the spec's keep_columns), each written atomically and
marked done, then a task marker listing them; `finalize` applies `limit` in shard order and writes `index.json`, the
shard list the chunk stage maps over. A Hub file is downloaded to this machine's (or container's) local disk and
deleted once its shards are written: only shards reach the volume.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
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
    store.remove_stale_temporaries(store.task_marker_path(folder, index))  # ... killed writing the task's marker


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
    """Apply `limit` in shard order, check that ids are unique, and write `index.json`: (shard id, rows to take or
    None for all) per shard used.

    `rows` in the index counts rows downloaded: with an integer limit each task stops after `limit` rows. Duplicate
    ids (within a file or across files) fail with their count and first examples, or, with `dataset.duplicate_ids:
    suffix`, later copies are renamed `<id>#2`, `<id>#3`… in the shards, and the index records how many.
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
    index: dict[str, Any] = {"shards": entries, "rows": total, "taken": wanted}
    duplicates = _duplicate_ids(folder, entries)
    if duplicates:
        if data.duplicate_ids == "error":
            raise SourceError(_duplicates_message(duplicates, data, tasks, entries))
        index["renamed_ids"] = _rename_duplicates(folder, duplicates)
    store.write_json_atomic(store.data_index_path(folder), index)
    return _index_list(entries)


def _id_hashes(ids: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each id (equal ids, equal hashes), to find candidates for duplicates in little memory."""
    digest = hashlib.blake2b
    return np.fromiter((int.from_bytes(digest(i.encode(), digest_size=8).digest(), "little") for i in ids),
                       dtype=np.uint64, count=len(ids))


def _shard_ids(folder: Path, entry: dict[str, Any]) -> list[str]:
    """The ids of the rows of one indexed shard that the limit takes."""
    column = pq.read_table(store.shard_path(folder, entry["id"]), columns=["id"]).column("id")
    return column.slice(0, entry["take"]).to_pylist()


def _duplicate_ids(folder: Path, entries: list[dict[str, Any]]) -> dict[str, list[tuple[str, int]]]:
    """Ids that occur more than once among the taken rows, each with its (shard, row) occurrences in shard order.

    One pass hashes every id (8 bytes a row held); only ids whose hash repeats are read back as text and compared.
    """
    hashes = [_id_hashes(_shard_ids(folder, e)) for e in entries]
    everything = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    ordered = np.sort(everything)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return {}
    seen: dict[str, list[tuple[str, int]]] = {}
    for entry, shard_hashes in zip(entries, hashes, strict=True):
        rows = np.flatnonzero(np.isin(shard_hashes, repeated))
        if len(rows):
            ids = _shard_ids(folder, entry)
            for row in rows.tolist():
                seen.setdefault(ids[row], []).append((entry["id"], row))
    return {doc_id: places for doc_id, places in seen.items() if len(places) > 1}


def _duplicates_message(duplicates: dict[str, list[tuple[str, int]]], data: DataSettings, tasks: list[SourceTask],
                        entries: list[dict[str, Any]]) -> str:
    """One line: how many ids repeat, the first few with the source file and row of each copy, and the fix."""
    sources_by_task = {t.index: t.source for t in tasks}
    first_row: dict[str, int] = {}  # a shard's first row within its source file
    offset: dict[int, int] = {}
    for e in entries:
        task = int(e["id"].split("-")[0])
        first_row[e["id"]] = offset.get(task, 0)
        offset[task] = offset.get(task, 0) + e["rows"]

    def where(shard: str, row: int) -> str:
        return f"{Path(sources_by_task[int(shard.split('-')[0])]).name} row {first_row[shard] + row + 1}"

    shown = "; ".join(f"{doc_id!r} at " + " and ".join(where(s, r) for s, r in places[:3])
                      for doc_id, places in list(duplicates.items())[:3])
    column = f"id_column {data.id_column!r}" if data.id_column else "default ids"
    return (f"{len(duplicates):,} id(s) occur more than once ({column}): {shown}; make them unique, or set "
            "dataset.duplicate_ids: suffix to rename later copies <id>#2, <id>#3")


def _rename_duplicates(folder: Path, duplicates: dict[str, list[tuple[str, int]]]) -> dict[str, Any]:
    """Rewrite the shards holding later copies of duplicate ids with `<id>#k` ids; returns what was renamed."""
    renames: dict[str, dict[int, str]] = {}
    for doc_id, places in duplicates.items():
        for k, (shard, row) in enumerate(places[1:], start=2):
            renames.setdefault(shard, {})[row] = f"{doc_id}#{k}"
    for shard, rows in renames.items():
        path = store.shard_path(folder, shard)
        table = pq.read_table(path)
        ids = table.column("id").to_pylist()
        for row, new_id in rows.items():
            ids[row] = new_id
        table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
        marker = store.read_marker(path)

        def write(tmp: Path, table: pa.Table = table, marker: dict[str, Any] = marker) -> dict[str, Any]:
            pq.write_table(table, tmp, compression="zstd")
            return marker

        store.write_shard(path, write)
    examples = {doc_id: [f"{doc_id}#{k}" for k in range(2, len(places) + 1)]
                for doc_id, places in list(duplicates.items())[:5]}
    return {"ids": len(duplicates), "copies": sum(len(p) - 1 for p in duplicates.values()), "examples": examples}


def read_index(root: Path, data: DataSettings) -> list[tuple[str, int | None]] | None:
    """The shard list `finalize` wrote for this data fingerprint, or None before the download finished."""
    index = store.read_json(store.data_index_path(store.data_dir(root, data.fingerprint)))
    return None if index is None else _index_list(index["shards"])


def renamed_ids(root: Path, data: DataSettings) -> dict[str, Any] | None:
    """What `duplicate_ids: suffix` renamed (count, copies, examples), or None when nothing was."""
    index = store.read_json(store.data_index_path(store.data_dir(root, data.fingerprint)))
    return None if index is None else index.get("renamed_ids")


def _index_list(entries: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    """Index entries as (shard id, rows to take, None when the whole shard is used)."""
    return [(e["id"], e["take"] if e["take"] < e["rows"] else None) for e in entries]


