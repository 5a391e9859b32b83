"""The volume layout and how files land on it: atomic writes, done-markers, manifests.

Every path the stages read or write is built here, so the local backend (a folder) and Modal (a mounted Volume)
share one layout:

    <root>/data/<data_fp>/shard-00000.parquet                        (+ .done marker)
    <root>/runs/<name>/chunks/<chunk_fp>/shard-00000.parquet         (+ .done marker)
    <root>/runs/<name>/embeddings/<embed_fp>/shard-00000.parquet     (+ .done marker; one file per embed unit:
    <root>/runs/<name>/embeddings/<embed_fp>/shard-00000.000000000-000004096.parquet    a shard, or rows of it)
    <root>/runs/<name>/index/<index_fp>/chunks.lance/                (+ chunks.lance.done; output.index: lancedb)
    <root>/runs/<name>/index/<index_fp>/                             (late interaction: PyLate's token index; a
                                                                       folder renamed into place, then index.done)
    <root>/runs/<name>/manifest.json, stats.json
    <root>/runs/<name>/current.json                                  (the fingerprints of the run's current outputs)
    <root>/runs/<name>/lease/00000003.json                           (the run's lease, local volumes)

A file is written under a temporary name, renamed into place, and only then marked done; a file without its
marker is never taken as finished, and a rerun rewrites it.

A late-interaction embedding file has the dense file's columns, but `embedding` holds a chunk's token vectors as
list<fixed_size_list<float16>[dim]> and `n_vectors` their count (`multivector_columns`, `read_multivectors`).

Each chunk and embeddings folder also keeps an index of its done-markers, `.index/<host>-<pid>.jsonl`: every
writer appends one line per marker it writes or clears (its own file, so writers on many machines never share one),
and `status` reads those few files instead of every marker of a huge run. The orchestrator, which lists the markers
anyway, repairs the index at each stage's start (a writer killed between marker and line leaves it one line short).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner.errors import OutputError, is_write_failure

DONE_SUFFIX = ".done"
# A source shard holds at most `dataset.shard_rows` documents and about this much text, so memory stays bounded.
MAX_SHARD_TEXT_BYTES = 128 * 2**20


def data_dir(root: Path, data_fp: str) -> Path:
    """Downloaded source shards for one data fingerprint (shared by every run on the volume)."""
    return root / "data" / data_fp


def task_marker_path(data_folder: Path, task: int) -> Path:
    """Written after a download task's last shard: the shards it produced (its done-marker)."""
    return data_folder / f"task-{task:05d}.json"


def data_index_path(data_folder: Path) -> Path:
    """The ordered shard list (with the rows the limit takes) that the chunk stage maps over."""
    return data_folder / "index.json"


def run_dir(root: Path, name: str) -> Path:
    """Everything one job (spec `name`) writes."""
    return root / "runs" / name


def chunks_dir(root: Path, name: str, chunk_fp: str) -> Path:
    """Chunk shards of a run for one chunk fingerprint."""
    return run_dir(root, name) / "chunks" / chunk_fp


def embeddings_dir(root: Path, name: str, embed_fp: str) -> Path:
    """Embedding shards of a run for one embed fingerprint."""
    return run_dir(root, name) / "embeddings" / embed_fp


def index_dir(root: Path, name: str, index_fp: str) -> Path:
    """A run's index for one index fingerprint: the LanceDB database (`stages/index.py`), or a late-interaction
    run's token index (`stages/late.py`: index shards `shard-NNNNN/` inside, done when `is_done_folder`)."""
    return run_dir(root, name) / "index" / index_fp


def multivector_columns(vectors: list[np.ndarray], dim: int) -> tuple[pa.ListArray, pa.Int32Array]:
    """Per-chunk token vectors as (`embedding`: list<fixed_size_list<float16>[dim]>, `n_vectors`: int32)."""
    counts = np.array([len(v) for v in vectors], dtype=np.int32)
    flat = np.concatenate(vectors).astype(np.float16) if vectors else np.zeros((0, dim), dtype=np.float16)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float16()), dim)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, tokens), pa.array(counts, type=pa.int32())


def read_multivectors(column: pa.ChunkedArray | pa.ListArray) -> list[np.ndarray]:
    """The `embedding` column of a late-interaction file back as one float16 array [n_vectors, dim] per chunk."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return []
    dim = column.type.value_type.list_size
    flat = column.flatten()
    values = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def lease_dir(root: Path, name: str) -> Path:
    """The run's lease records on a local volume (one writer per run)."""
    return run_dir(root, name) / "lease"


def manifest_path(root: Path, name: str) -> Path:
    """The run's manifest: resolved spec, fingerprints, shard states, counts, timings."""
    return run_dir(root, name) / "manifest.json"


def stats_path(root: Path, name: str) -> Path:
    """The run's merged statistics (token histograms, empty documents, tiny chunks)."""
    return run_dir(root, name) / "stats.json"


def current_path(root: Path, name: str) -> Path:
    """The run's pointer to its current outputs: the fingerprints its last pass wrote (`results.py`)."""
    return run_dir(root, name) / "current.json"


def shard_name(shard: str) -> str:
    """The parquet file name of a shard id (`00000` → `shard-00000.parquet`)."""
    return f"shard-{shard}.parquet"


def shard_path(folder: Path, shard: str) -> Path:
    """A shard's parquet file inside a stage folder."""
    return folder / shard_name(shard)


def marker_path(path: Path) -> Path:
    """The done-marker beside a finished file."""
    return path.with_name(path.name + DONE_SUFFIX)


def is_done(path: Path) -> bool:
    """True only when the file exists and its done-marker was written after it."""
    return path.is_file() and marker_path(path).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    """The stats recorded in a file's done-marker."""
    return orjson.loads(marker_path(path).read_bytes())


def is_done_folder(path: Path) -> bool:
    """True only when the folder exists and its done-marker (beside it) was written after it."""
    return path.is_dir() and marker_path(path).is_file()


def done_shards(folder: Path) -> list[str]:
    """Shard ids in `folder` whose file and marker both exist, sorted."""
    if not folder.is_dir():
        return []
    out = []
    for marker in folder.glob(f"shard-*.parquet{DONE_SUFFIX}"):
        data = marker.with_name(marker.name[: -len(DONE_SUFFIX)])
        if data.is_file():
            out.append(data.name[len("shard-") : -len(".parquet")])
    return sorted(out)


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def writer_tag() -> str:
    """Who writes a temporary file: `<host>-<pid>` (no dots), in its name so cleanup can tell a dead writer's."""
    return f"{_host()}-{os.getpid()}"


@contextmanager
def atomic_path(path: Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (named for its writer); on success rename it into place, on failure
    delete it. `mode` sets the file's permissions (mkstemp's are owner-only): for files handed to a user."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        if is_write_failure(exc):
            raise OutputError.of(path, exc) from exc
        raise
    tmp = Path(tmp_name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: the finished file keeps its old bytes, the torn temporary goes
        if is_write_failure(exc):
            raise OutputError.of(path, exc) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


USER_FILE_MODE = 0o644  # what the after-run verbs write for a user (a report, a fetched file)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write a whole file so readers see either the old content or the new, never a torn one."""
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def utc_stamp(seconds: float | None = None) -> str:
    """A time as manifests and run records write it, `2026-01-02T03:04:05Z` (now, without `seconds`)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_bytes_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


INDEX_DIR = ".index"


def mark_done(path: Path, stats: dict[str, Any]) -> None:
    """Record that `path` is finished, with its stats; written last, after the file is in place (then indexed)."""
    write_json_atomic(marker_path(path), stats)
    _index_append(path.parent, [{"name": path.name, "stats": stats}])


def clear_done(path: Path) -> None:
    """Forget that `path` was finished (before rewriting it): marker first, so no reader trusts a torn file."""
    marker = marker_path(path)
    if marker.exists():
        _index_append(path.parent, [{"name": path.name, "cleared": True}])
    marker.unlink(missing_ok=True)


def _indexed(folder: Path) -> bool:
    """Whether a folder keeps an index: a run's chunk and embedding folders (`status` counts them; the shared data
    folders are counted by their task markers)."""
    return folder.parent.name in ("chunks", "embeddings") and folder.parent.parent.parent.name == "runs"


def _index_append(folder: Path, events: list[dict[str, Any]]) -> None:
    """Append done/cleared events to this writer's index file of `folder` (one write, so a line is never torn)."""
    if not _indexed(folder):
        return
    index = folder / INDEX_DIR
    index.mkdir(exist_ok=True)
    now = time.time_ns()
    # each line starts a new line too, so one after a killed writer's torn line is still whole
    lines = b"".join(b"\n" + orjson.dumps({**event, "at": now}) + b"\n" for event in events)
    try:
        with open(index / f"{writer_tag()}.jsonl", "ab") as fh:
            fh.write(lines)
    except OSError as exc:
        if is_write_failure(exc):
            raise OutputError.of(index, exc) from exc
        raise


def indexed_done(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The finished files of a stage folder with their marker stats, from its index (None: the folder has no
    index, e.g. it was written before indexes existed). A torn last line (a killed writer) is skipped."""
    index = folder / INDEX_DIR
    if not index.is_dir():
        return None
    latest: dict[str, tuple[int, dict[str, Any] | None]] = {}
    for part in index.glob("*.jsonl"):
        for line in part.read_bytes().splitlines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            at = int(event.get("at", 0))
            name = str(event.get("name"))
            if name not in latest or at >= latest[name][0]:
                latest[name] = (at, None if event.get("cleared") else dict(event.get("stats") or {}))
    return {name: stats for name, (_, stats) in sorted(latest.items()) if stats is not None}


def repair_index(folder: Path, done: list[str]) -> None:
    """Make the index of `folder` agree with its markers (`done`: the shard ids `done_shards` found)."""
    indexed = indexed_done(folder) or {}
    names = {shard_name(s) for s in done}
    events: list[dict[str, Any]] = [{"name": n, "stats": orjson.loads(marker_path(folder / n).read_bytes())}
                                    for n in sorted(names - set(indexed))]
    events += [{"name": n, "cleared": True} for n in sorted(set(indexed) - names) if n.startswith("shard-")]
    if events:
        _index_append(folder, events)


def _writer_gone(tag: str) -> bool:
    """True when a temporary's writer (`host-pid`) ran on this machine and its process no longer exists."""
    host, _, pid = tag.rpartition("-")
    if host != _host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return is_zombie(int(pid))


def is_zombie(pid: int) -> bool:
    """True when `pid` has exited but is not yet reaped (Linux `/proc/<pid>/stat` state `Z`): a killed run's
    workers linger so until their new parent collects them, and they will never write again."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def remove_dead_temporaries(folder: Path, prefix: str) -> None:
    """Delete the temporary files (or folders) under names starting with `prefix` whose writer is provably gone (a
    killed process on this machine); a live writer's temporary, or another machine's, is never touched."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(f".{glob.escape(prefix)}*.tmp"):
        # `.{name}.{host}-{pid}.{random}.tmp`: the writer's tag sits between the file's name and mkstemp's suffix
        tag = tmp.name[:-len(".tmp")].rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if _writer_gone(tag):
            if tmp.is_dir():  # a folder being built (an index shard)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files dead writers of `path` left behind (see `remove_dead_temporaries`)."""
    remove_dead_temporaries(path.parent, f"{path.name}.")


def write_shard(path: Path, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run `write(tmp)` to produce a shard, rename it into place, then mark it done with the stats it returned."""
    clear_done(path)
    remove_stale_temporaries(path)
    with atomic_path(path) as tmp:
        stats = write(tmp)
    mark_done(path, stats)
    return stats


def keep_out_of_git(home: Path) -> None:
    """A `.gitignore` of `*` in the outputs' home, so `.volembed` at a repository's root never shows as changes."""
    ignore = home / ".gitignore"
    if not ignore.exists():
        with contextlib.suppress(OSError):
            ignore.write_text("# volembed-runner outputs (see `volembed-run files SPEC`)\n*\n")


def read_json(path: Path) -> Any:
    """Read a JSON file written by this module (None if it does not exist)."""
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of a keyed store of this machine (`{"version": 1, "entries": {key: entry}}`: calibrations, batch
    sweeps); an unreadable file counts as none."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def put_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add (or replace) one entry of a keyed store under `key`, atomically."""
    entries = read_entries(path)
    entries[key] = entry
    write_json_atomic(path, {"version": 1, "entries": entries})


def read_rows(path: Path, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows [start, stop) of a parquet file (only `columns`, where given), reading only the row groups that hold
    them."""
    reader = pq.ParquetFile(path)
    groups, first, at = [], 0, 0
    for g in range(reader.metadata.num_row_groups):
        n = reader.metadata.row_group(g).num_rows
        if at < stop and at + n > start:
            first = first if groups else at
            groups.append(g)
        at += n
    if not groups:
        empty = reader.schema_arrow.empty_table()
        return empty if columns is None else empty.select(columns)
    return reader.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
