"""`volembed-run fetch`: a run's chunks joined with their vectors, as one local file to inspect.

The embedding files are read from the local volume where they are, or downloaded from a Modal Volume through the
SDK; when they carry no text (`output.include_text: false`), the chunk shards are read too and joined on
(doc_id, chunk_index). Shard by shard, so memory holds one shard; the file is written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner import store
from volembed_runner.errors import BackendError, name_list
from volembed_runner.plan import Plan
from volembed_runner.results import (
    Entry,
    LocalVolume,
    VolumeFiles,
    by_chunk_shard,
    finished_files,
    read_outputs,
    shard_id,
)

FORMATS = ("parquet", "jsonl")
KEYS = ["doc_id", "chunk_index"]
Progress = Callable[[int, int], None]  # (bytes so far, bytes in all) of the files read off the volume


@dataclass(frozen=True)
class Fetched:
    """What `fetch` wrote: where, how many rows from how many shards, and how much it read off the volume."""

    path: str
    format: str
    rows: int
    shards: list[str]
    bytes_read: int
    joined_text: bool  # the text came from the chunk shards (the embedding files carry none)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form."""
        return asdict(self)


def pick_shard(value: str, shards: list[str]) -> str | None:
    """The shard the user names: its id as written (`00000-0003`), else its position in order (`3`)."""
    value = value.strip()
    if value in shards:
        return value
    if value.isdigit() and int(value) < len(shards):
        return shards[int(value)]
    return None


def default_path(plan: Plan, shards: list[str] | None, fmt: str) -> Path:
    """`<name>-shard-00000.parquet` for one shard, `<name>.parquet` for all of them (in the working folder)."""
    suffix = f"-shard-{shards[0]}" if shards and len(shards) == 1 else ""
    return Path(f"{plan.name}{suffix}.{fmt}")


class VolumeReader:
    """Hands out local paths of volume files: the file itself on a local volume, else a downloaded copy."""

    def __init__(self, files: VolumeFiles, scratch: Path, total: int, on_progress: Progress) -> None:
        self.files, self.scratch, self.total, self.on_progress = files, scratch, total, on_progress
        self.read = 0
        self._local: dict[str, Path] = {}

    def path(self, entry: Entry) -> Path:
        if entry.path in self._local:
            return self._local[entry.path]
        if isinstance(self.files, LocalVolume):
            local = self.files.root / PurePosixPath(entry.path)
            self._advance(entry.size)
        else:
            local = self.scratch / PurePosixPath(entry.path)
            local.parent.mkdir(parents=True, exist_ok=True)
            self.files.download(entry.path, local, self._advance)
        self._local[entry.path] = local
        return local

    def release(self) -> None:
        """Forget the files handed out so far, deleting downloaded copies (a shard at a time on disk)."""
        for local in self._local.values():
            if local.is_relative_to(self.scratch):
                local.unlink(missing_ok=True)
        self._local.clear()

    def _advance(self, n: int) -> None:
        self.read += n
        self.on_progress(self.read, self.total)


def _with_text(vectors: pa.Table, chunks: pa.Table, shard: str) -> pa.Table:
    """The vectors with each chunk's text (matched on doc id and chunk index), in the vectors' row order.

    Only the keys take part in the join (Acero joins no fixed_size_list column); the text is then put beside the
    vectors by row number.
    """
    keys = vectors.select(KEYS).append_column("__row", pa.array(range(vectors.num_rows), type=pa.int64()))
    matched = keys.join(chunks.select([*KEYS, "text"]), keys=KEYS, join_type="left outer").sort_by("__row")
    if matched.num_rows != vectors.num_rows:
        raise BackendError(f"shard {shard}: the chunk shard holds (doc_id, chunk_index) more than once; rerun the "
                           "spec")
    missing = matched["text"].null_count
    if missing:
        raise BackendError(f"shard {shard}: {missing} vector row(s) have no chunk in the chunk shard; the chunk and "
                           "embedding folders disagree (rerun the spec)")
    at = vectors.schema.get_field_index("embedding")
    return vectors.add_column(at, "text", matched["text"])


def _jsonl(table: pa.Table) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in table.to_pylist())


def fetch(plan: Plan, files: VolumeFiles, *, shard: str | None, every: bool, out: Path | None, fmt: str,
          on_progress: Progress) -> Fetched:
    """Write the chunks and vectors of one shard (the first, or `shard`), or of `every` shard, to `out`."""
    if fmt not in FORMATS:
        raise BackendError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    outputs = read_outputs(plan, files, "/")
    vector_files = finished_files(files, outputs.folders["embeddings"])
    if not vector_files:
        raise BackendError(f"{plan.name} has no finished embedding files in {files.where}/"
                           f"{outputs.folders['embeddings']}; run the spec first")
    chunk_files = {shard_id(e.path): e for e in finished_files(files, outputs.folders["chunks"])}
    by_shard = by_chunk_shard(vector_files, list(chunk_files))
    if every:
        wanted = sorted(by_shard)
    else:
        want = pick_shard(shard, sorted(by_shard)) if shard is not None else min(by_shard)
        if want is None:
            raise BackendError(f"{plan.name} has no finished embedding shard {shard!r}; it has "
                               f"{name_list(sorted(by_shard))} (name one, or give its position from 0)")
        wanted = [want]
    target = Path(out) if out is not None else default_path(plan, wanted if not every else None, fmt)

    rows = 0
    joined_text = False
    with (tempfile.TemporaryDirectory(prefix="volembed-fetch-") as scratch,
          store.atomic_path(target, mode=store.USER_FILE_MODE) as tmp):
        reader = VolumeReader(files, Path(scratch), sum(e.size for s in wanted for e in by_shard[s]), on_progress)
        if pq.read_schema(reader.path(by_shard[wanted[0]][0])).get_field_index("text") < 0:
            reader.total += sum(chunk_files[s].size for s in wanted if s in chunk_files)
        writer: pq.ParquetWriter | None = None
        with open(tmp, "wb") as sink:
            for s in wanted:
                table = pa.concat_tables([pq.read_table(reader.path(e)) for e in by_shard[s]])
                if "text" not in table.column_names:
                    if s not in chunk_files:
                        raise BackendError(f"shard {s}: the embedding files carry no text and chunk shard {s} is not "
                                           f"finished in {files.where}/{outputs.folders['chunks']}")
                    table = _with_text(table, pq.read_table(reader.path(chunk_files[s])), s)
                    joined_text = True
                if fmt == "parquet":
                    if writer is None:
                        writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
                    writer.write_table(table.cast(writer.schema))
                else:
                    sink.write(_jsonl(table))
                rows += table.num_rows
                reader.release()
            if writer is not None:
                writer.close()
    return Fetched(str(target), fmt, rows, wanted, reader.read, joined_text)
