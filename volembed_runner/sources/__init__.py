"""Where documents come from: a dataset's sources listed as download tasks, each read as tables of shard columns.

    hub.py        a Hub dataset's parquet files (config, split, pinned commit) and their download
    files.py      a `files` dataset's local files and folders, and their formats
    shape.py      source rows → `id`, `text`, keep_columns, with one-line errors naming the row
    parquet.py, csv.py, jsonl.py, documents.py    one reader per format
    text.py       UTF-8 and string-type helpers the readers share

`list_tasks` names one task per source file (a folder is one task), in shard order; `read_task` streams one task's
rows as shaped tables. Nothing here writes to the volume: the download stage does.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from volembed_runner.errors import SourceError
from volembed_runner.sources import csv, documents, hub, jsonl, parquet
from volembed_runner.sources.files import file_format, folder_documents
from volembed_runner.sources.shape import Shape

if TYPE_CHECKING:
    from volembed_runner.plan import DataSettings

__all__ = ["Shape", "SourceTask", "describe", "limit_rows", "list_tasks", "read_task"]


@dataclass(frozen=True)
class SourceTask:
    """One unit of download work: a source file (or folder) and its position in shard order."""

    index: int
    source: str  # a local path, or hf://datasets/<repo>@<commit>/<path in repo>
    fmt: str  # parquet | jsonl | json | csv | text | pdf
    size: int | None  # bytes, when known

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for Modal function inputs and worker processes."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceTask:
        """Inverse of `to_dict`."""
        size = d.get("size")
        return cls(int(d["index"]), str(d["source"]), str(d["fmt"]), None if size is None else int(size))


def list_tasks(data: DataSettings) -> list[SourceTask]:
    """The download tasks of a dataset, in shard order: one per local file or folder, or per Hub parquet file."""
    if data.kind == "hf":
        return [SourceTask(index=i, source=uri, fmt="parquet", size=size) for i, (uri, size) in
                enumerate(hub.list_hf(data))]
    if not data.files:
        raise SourceError("dataset.files lists no file")
    tasks = []
    for index, source in enumerate(data.files):
        path = Path(source)
        if not path.exists():
            raise SourceError(f"{source}: no such file or folder")
        if path.is_dir():
            docs = folder_documents(path)
            if not docs:
                raise SourceError(
                    f"{path}: folder holds no .txt, .md or .pdf file (for other files, list them by glob)"
                )
            fmt = "pdf" if all(p.suffix.lower() == ".pdf" for _, p in docs) else "text"
            size = sum(p.stat().st_size for _, p in docs)
        else:
            fmt, size = file_format(path), path.stat().st_size
        tasks.append(SourceTask(index=index, source=source, fmt=fmt, size=size))
    return tasks


def read_task(
    task: SourceTask, shape: Shape, download_dir: Path | None = None
) -> Generator[pa.Table, None, None]:
    """The shaped tables of one source, in order; a Hub file is first downloaded into `download_dir`."""
    if task.source.startswith(hub.HF_SCHEME):
        if download_dir is None:
            raise ValueError(f"{task.source} is a Hub file: read_task needs a download_dir")
        repo, _, path_in_repo = hub.parse_hf_uri(task.source)
        return parquet.read_parquet(hub.download_file(task.source, download_dir), f"{repo}/{path_in_repo}", shape,
                                    task.index)
    path, name = Path(task.source), task.source
    if not path.exists():
        raise SourceError(f"{name}: no such file or folder")
    gz = path.name.lower().endswith(".gz")
    match task.fmt:
        case "parquet":
            return parquet.read_parquet(path, name, shape, task.index)
        case "jsonl":
            return jsonl.read_jsonl(path, name, shape, task.index, gz)
        case "json":
            return jsonl.read_json(path, name, shape, task.index, gz)
        case "csv":
            return csv.read_csv(path, name, shape, task.index, gz)
        case "text" | "pdf":
            return documents.read_documents(path, name, shape)
    raise SourceError(f"{name}: unknown source format '{task.fmt}'")


def describe(data: DataSettings) -> str:
    """The dataset as an error message names it."""
    if data.kind == "hf":
        return f"{data.hf} ({hub.selection(data)})"
    first = data.files[0] if data.files else "(none)"
    return first if len(data.files) == 1 else f"{len(data.files)} files ({first}, …)"


def limit_rows(limit: int | float | None, total: int) -> int:
    """Rows kept: all, the first N, or ceil(fraction × total), computed in decimal so 0.1 × 30 is exactly 3."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return min(total, max(1, math.ceil(Decimal(repr(limit)) * total)))
    return min(total, int(limit))

