"""A run's current outputs, and its stale ones: what `files`, `fetch`, `report`, `push` and `gc` read.

Each pass of a run ends by writing `runs/<name>/current.json` (`write_current`, from the manifest's close), naming
the fingerprints it wrote. That file, not a glob over `embeddings/*`, says which folders are the run's outputs: a
rerun with other settings writes new folders beside the old ones, and only the pointer moves. `current_outputs`
resolves it on a filesystem root (the local volume, or `/vol` inside a Modal container); `read_outputs` does the
same through any `VolumeFiles` (a local folder, or a Modal Volume read through the SDK from this machine).

Folders no current run names are stale; `stale_folders` lists them with their sizes and `remove_stale` deletes
them. A run's own folders are this run's to judge; a data folder is shared by every run on the volume, so it is
stale only when no run names it (in its current.json or the manifest of a pass under way) and nothing in it
changed recently.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import orjson

from volembed_runner import store
from volembed_runner.errors import BackendError
from volembed_runner.plan import MODAL_ROOT, Plan
from volembed_runner.units import parse_key

STAGES = ("data", "chunks", "embeddings")
CURRENT_VERSION = 1
# A data folder with a file newer than this may belong to a download under way: gc leaves it alone.
DATA_QUIET_S = 3600.0
UPLOADS = "uploads"  # where the Modal backend uploads local dataset files (`render.UPLOADS_DIR`), per data fp


@dataclass(frozen=True)
class Entry:
    """One file or folder of a volume, at its path relative to the volume's root (posix)."""

    path: str
    size: int
    is_dir: bool
    mtime: float = 0.0


class VolumeFiles(Protocol):
    """A volume's files as the after-run verbs see them: a local folder, or a Modal Volume through the SDK."""

    where: str  # how messages name the volume

    def list(self, path: str, *, recursive: bool = True) -> list[Entry]:
        """The files and folders under `path` (all levels, or its direct children); [] when it does not exist."""
        ...

    def read(self, path: str) -> bytes | None:
        """A small file's bytes, or None when it does not exist."""
        ...

    def download(self, path: str, dest: Path, on_bytes: Callable[[int], None]) -> None:
        """Copy a file to `dest` on this machine, reporting bytes as they arrive."""
        ...

    def remove(self, path: str) -> None:
        """Delete a folder and everything under it."""
        ...


class LocalVolume:
    """`VolumeFiles` over a folder on this machine (the local backend's volume)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.where = str(self.root)

    def list(self, path: str, *, recursive: bool = True) -> list[Entry]:
        base = self.root / path
        if not base.is_dir():
            return []
        found = base.rglob("*") if recursive else base.iterdir()
        return [self._entry(p) for p in sorted(found)]

    def _entry(self, full: Path) -> Entry:
        st = full.stat()
        is_dir = full.is_dir()
        return Entry(full.relative_to(self.root).as_posix(), 0 if is_dir else st.st_size, is_dir, st.st_mtime)

    def read(self, path: str) -> bytes | None:
        full = self.root / path
        return full.read_bytes() if full.is_file() else None

    def download(self, path: str, dest: Path, on_bytes: Callable[[int], None]) -> None:
        shutil.copyfile(self.root / path, dest)
        on_bytes((self.root / path).stat().st_size)

    def remove(self, path: str) -> None:
        shutil.rmtree(self.root / path)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def current_record(plan: Plan, root: Path, *, status: str) -> dict[str, Any]:
    """What current.json says about a pass of `plan` on `root` that ended with `status`."""
    folders = {
        "data": _rel(root, store.data_dir(root, plan.data.fingerprint)),
        "chunks": _rel(root, store.chunks_dir(root, plan.name, plan.chunk.fingerprint)),
        "embeddings": _rel(root, store.embeddings_dir(root, plan.name, plan.embed.fingerprint)),
    }
    fingerprints = {"data": plan.data.fingerprint, "chunks": plan.chunk.fingerprint,
                    "embeddings": plan.embed.fingerprint}
    if plan.index is not None:  # output.index: the LanceDB database folder (`stages/index.py`)
        folders["index"] = _rel(root, store.index_dir(root, plan.name, plan.index.fingerprint))
        fingerprints["index"] = plan.index.fingerprint
    return {
        "version": CURRENT_VERSION,
        "name": plan.name,
        "spec_hash": plan.spec_hash,
        "fingerprints": fingerprints,
        "folders": folders,
        "status": status,
        "updated_at": store.utc_stamp(),
    }


def write_current(root: Path, plan: Plan, *, status: str) -> None:
    """Point the run at the outputs of the pass that just ended (called when the manifest closes)."""
    store.write_json_atomic(store.current_path(root, plan.name), current_record(plan, root, status=status))


@dataclass(frozen=True)
class Outputs:
    """A run's current output folders, relative to `root` (the volume's root as the reader sees it)."""

    name: str
    root: str
    fingerprints: dict[str, str]
    folders: dict[str, str]  # stage → folder relative to the root
    recorded: bool  # True: named by current.json; False: the plan's (no pass of this run has ended yet)
    status: str | None = None
    updated_at: str | None = None
    index: str | None = None  # the index stage's output, relative to the root, when the run has one
    differs_from_spec: tuple[str, ...] = field(default_factory=tuple)  # stages whose fingerprint the spec changed

    def folder(self, stage: str) -> str:
        """A stage's folder as a path under the root."""
        return f"{self.root.rstrip('/')}/{self.folders[stage]}"

    def glob(self, stage: str) -> str:
        """A stage's parquet files as one glob (DuckDB, pyarrow and `datasets` take it as written)."""
        return f"{self.folder(stage)}/*.parquet"

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form, with the folders and globs spelled out."""
        d = asdict(self)
        d["paths"] = {stage: {"folder": self.folder(stage), "glob": self.glob(stage)} for stage in self.folders}
        if self.index is not None:
            d["paths"]["index"] = {"folder": f"{self.root.rstrip('/')}/{self.index}"}
        return d


def outputs_from(plan: Plan, record: dict[str, Any] | None, root: str) -> Outputs:
    """The run's outputs as current.json `record` names them, or the plan's when there is none yet."""
    own = current_record(plan, Path("/"), status="planned")
    if record is None:
        return Outputs(plan.name, root, {s: own["fingerprints"][s] for s in STAGES},
                       {s: own["folders"][s] for s in STAGES}, recorded=False, index=own["folders"].get("index"))
    fps = {stage: str(record["fingerprints"][stage]) for stage in STAGES}
    folders = {stage: str(record["folders"][stage]) for stage in STAGES}
    differs = tuple(stage for stage in STAGES if fps[stage] != own["fingerprints"][stage])
    index = record.get("folders", {}).get("index")
    return Outputs(plan.name, root, fps, folders, recorded=True, status=record.get("status"),
                   updated_at=record.get("updated_at"), index=str(index) if index else None,
                   differs_from_spec=differs)


def planned_outputs(plan: Plan) -> dict[str, str]:
    """The folders the spec writes (data, chunks, embeddings, and index with `output.index`), on the local volume or
    in the Modal Volume."""
    root = MODAL_ROOT if plan.backend == "modal" else str(plan.local_root())
    outputs = outputs_from(plan, None, root)
    folders = {stage: outputs.folder(stage) for stage in outputs.folders}
    if outputs.index is not None:
        folders["index"] = f"{root.rstrip('/')}/{outputs.index}"
    return folders


def _parse(raw: bytes | None, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        record = orjson.loads(raw)
        if not isinstance(record, dict) or not all(s in record.get("fingerprints", {}) for s in STAGES):
            raise ValueError("it names no fingerprints")
    except ValueError as exc:
        raise BackendError(f"{where} is not a current.json this version reads ({exc}); rerun the spec to rewrite "
                           "it") from None
    return record


def read_outputs(plan: Plan, files: VolumeFiles, root: str) -> Outputs:
    """The run's current outputs, read through `files` (`root` is how the printed paths start)."""
    rel = _rel(Path("/"), store.current_path(Path("/"), plan.name))
    return outputs_from(plan, _parse(files.read(rel), f"{files.where}/{rel}"), root)


def current_outputs(plan: Plan, root: Path) -> Outputs:
    """The run's current outputs on a filesystem root: the local volume, or `/vol` inside a Modal container."""
    return read_outputs(plan, LocalVolume(root), str(root))


def finished_files(files: VolumeFiles, folder: str) -> list[Entry]:
    """The finished parquet files of a stage folder (each beside its done-marker), sorted by name.

    Globbing `*.parquet` also finds nothing half-written: temporaries are dot-files ending in `.tmp`.
    """
    entries = {e.path: e for e in files.list(folder) if not e.is_dir}
    done = [e for path, e in entries.items()
            if path.endswith(".parquet") and path + store.DONE_SUFFIX in entries
            and not PurePosixPath(path).name.startswith(".")]
    return sorted(done, key=lambda e: e.path)


def shard_id(path: str) -> str:
    """A stage file's shard id: `…/shard-00003-0001.parquet` → `00003-0001`."""
    return PurePosixPath(path).name.removesuffix(".parquet").removeprefix("shard-")


def by_chunk_shard(vector_files: list[Entry], chunk_ids: list[str]) -> dict[str, list[Entry]]:
    """Embedding files grouped by the chunk shard they embed (one file, or the files of its embed units, `units.py`),
    each group in row order; a file of no known chunk shard keeps its own id."""
    known = set(chunk_ids)
    groups: dict[str, list[Entry]] = {}
    for entry in vector_files:
        shard, _, _ = parse_key(shard_id(entry.path))
        groups.setdefault(shard if shard in known else shard_id(entry.path), []).append(entry)
    for entries in groups.values():
        entries.sort(key=lambda e: parse_key(shard_id(e.path))[1] or 0)
    return groups


# ── gc ───────────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Stale:
    """A folder no current output needs: its path under the volume root, what it held, and its size."""

    path: str
    kind: str  # chunks | embeddings | index | data | uploads
    fingerprint: str
    bytes: int
    files: int


@dataclass
class GcPlan:
    """What `gc` would remove, what it keeps, and why it leaves shared folders alone when it does."""

    stale: list[Stale] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """The space removing every stale folder frees."""
        return sum(s.bytes for s in self.stale)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form."""
        return {"stale": [asdict(s) for s in self.stale], "bytes": self.bytes, "kept": self.kept,
                "notes": self.notes}


def _by_folder(entries: Iterable[Entry], prefix: str) -> dict[str, list[Entry]]:
    """Entries under `prefix/<fp>/…`, grouped by fingerprint folder."""
    out: dict[str, list[Entry]] = {}
    for e in entries:
        rest = PurePosixPath(e.path).relative_to(prefix).parts if e.path.startswith(prefix + "/") else ()
        if rest:
            out.setdefault(rest[0], [])
            if len(rest) > 1:
                out[rest[0]].append(e)
    return out


def _stale(kind: str, prefix: str, groups: dict[str, list[Entry]], keep: set[str]) -> list[Stale]:
    return [Stale(f"{prefix}/{fp}", kind, fp, sum(e.size for e in es if not e.is_dir),
                  sum(1 for e in es if not e.is_dir))
            for fp, es in sorted(groups.items()) if fp not in keep]


def _named_data(files: VolumeFiles, runs: list[str]) -> tuple[set[str], list[str]]:
    """The data fingerprints some run on the volume names, and the runs whose records can't say."""
    named: set[str] = set()
    unknown: list[str] = []
    for run in runs:
        found = False
        for record in ("current.json", "manifest.json"):
            raw = files.read(f"runs/{run}/{record}")
            if raw is None:
                continue
            try:
                named.add(str(orjson.loads(raw)["fingerprints"]["data"]))
                found = True
            except (ValueError, KeyError, TypeError):
                pass
        if not found:
            unknown.append(run)
    return named, unknown


def stale_folders(plan: Plan, files: VolumeFiles, *, now: float | None = None) -> GcPlan:
    """The run's fingerprint folders that neither its current.json nor the spec as written names, and the data
    (and uploaded-file) folders no run on the volume names and nothing recently wrote."""
    outputs = read_outputs(plan, files, "/")
    spec = current_record(plan, Path("/"), status="planned")["fingerprints"]
    result = GcPlan()
    run = f"runs/{plan.name}"
    for kind in ("chunks", "embeddings", "index"):
        if kind == "index":  # the index stage's databases: the current one and the spec's are kept
            keep = {PurePosixPath(outputs.index).name} if outputs.index else set()
            keep |= {spec["index"]} if "index" in spec else set()
        else:
            keep = {outputs.fingerprints[kind], spec[kind]}
        result.kept += [f"{run}/{kind}/{fp}" for fp in sorted(keep)]
        result.stale += _stale(kind, f"{run}/{kind}", _by_folder(files.list(f"{run}/{kind}"), f"{run}/{kind}"), keep)

    runs = sorted(PurePosixPath(e.path).name for e in files.list("runs", recursive=False) if e.is_dir)
    named, unknown = _named_data(files, runs)
    if unknown:
        result.notes.append(f"data folders left alone: run(s) {', '.join(unknown)} on this volume have neither "
                            "current.json nor manifest.json, so which data they use is unknown")
        return result
    named |= {outputs.fingerprints["data"], spec["data"]}
    cutoff = (time.time() if now is None else now) - DATA_QUIET_S
    for kind, prefix in (("data", "data"), ("uploads", UPLOADS)):
        groups = _by_folder(files.list(prefix), prefix)
        busy = {fp for fp, es in groups.items() if any(e.mtime > cutoff for e in es)}
        if busy - named:
            result.notes.append(f"{prefix}/ folders written to in the last {DATA_QUIET_S / 3600:.0f} h left alone "
                                f"(a download may be under way): {', '.join(sorted(busy - named))}")
        result.stale += _stale(kind, prefix, groups, named | busy)
    return result


def remove_stale(files: VolumeFiles, stale: Iterable[Stale]) -> None:
    """Delete the stale folders, one at a time."""
    for item in stale:
        files.remove(item.path)
