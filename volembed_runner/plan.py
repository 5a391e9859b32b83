"""Spec → Plan: the resolved settings of every stage, their fingerprints, and where outputs go.

The Plan is plain data (JSON round-trips through `to_dict`/`from_dict`), so the local backend hands it to worker
processes and the Modal backend bakes it into the generated app as a literal. Fingerprints name output folders by
a hash of everything that changes their bytes: change nothing and nothing reruns; switch to a model with the same
tokenizer and only the embeddings rerun.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from volembed_runner import catalog
from volembed_runner.embedders.local import resolve_precision
from volembed_runner.errors import SpecError, SpecIssue
from volembed_runner.spec import Spec

PACKAGE_SCHEME = "package:"
MODAL_ROOT = "/vol"


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able settings."""
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def volembed_home() -> Path:
    """Where local outputs live: $VOLEMBED_HOME, default ./.volembed."""
    return Path(os.environ.get("VOLEMBED_HOME", ".volembed")).expanduser().resolve()


@dataclass(frozen=True)
class DataSettings:
    """What the download stage reads and how it shapes shards."""

    kind: str  # "hf" or "files"
    hf: str | None
    config: str | None
    split: str
    revision: str | None
    files: tuple[str, ...]  # absolute paths, sorted, globs expanded (kind "files")
    text_column: str | None
    text_template: str | None
    id_column: str | None
    keep_columns: tuple[str, ...]
    limit: int | float | None
    shard_rows: int
    fingerprint: str = ""


@dataclass(frozen=True)
class ChunkSettings:
    """How chunk shards are cut, and with which tokenizer."""

    data_fingerprint: str
    size: int
    overlap: int
    model: str
    revision: str | None
    tokenizer_id: str
    keep_columns: tuple[str, ...]
    fingerprint: str = ""


@dataclass(frozen=True)
class EmbedSettings:
    """How chunk shards become vectors."""

    chunk_fingerprint: str
    engine: str  # "local" (in-process) or "tei" (a TEI server: on Modal, or embedding.endpoint)
    precision: str  # what the engine runs at: fp32 | bf16 locally (auto resolved for this CPU), float16 on TEI
    model: str
    revision: str | None
    prefix: str
    normalize: bool
    dimensions: int | None
    endpoint: str | None
    dim: int | None  # from the catalog when known; the engine reports the truth
    include_text: bool
    keep_columns: tuple[str, ...]
    max_batch_tokens: int
    fingerprint: str = ""


@dataclass(frozen=True)
class ComputeSettings:
    """Fan-out and Modal settings."""

    gpu: str
    concurrency_limit: int
    allow_concurrent_inputs: int
    chunk_workers: int
    secrets: tuple[str, ...]
    max_cost: float | None
    timeout: int
    retries: int


@dataclass(frozen=True)
class Plan:
    """Everything the stages and backends need, resolved from one spec."""

    name: str
    backend: str
    volume: str
    spec_path: str
    spec: dict[str, Any]
    spec_hash: str
    git: dict[str, Any]
    data: DataSettings
    chunk: ChunkSettings
    embed: EmbedSettings
    compute: ComputeSettings
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def local_root(self) -> Path:
        """The folder standing in for the Volume on the local backend."""
        return volembed_home() / "volumes" / self.volume

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for worker processes and the generated Modal app)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of `to_dict`."""
        def tuples(sub: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
            return {k: tuple(v) if k in keys else v for k, v in sub.items()}

        return cls(
            **{k: v for k, v in d.items() if k not in ("data", "chunk", "embed", "compute", "warnings")},
            data=DataSettings(**tuples(d["data"], ("files", "keep_columns"))),
            chunk=ChunkSettings(**tuples(d["chunk"], ("keep_columns",))),
            embed=EmbedSettings(**tuples(d["embed"], ("keep_columns",))),
            compute=ComputeSettings(**tuples(d["compute"], ("secrets",))),
            warnings=tuple(d.get("warnings", ())),
        )


def resolve_package_path(ref: str) -> Path:
    """`package:<module>/<path>` → the file inside the installed package, located without importing it."""
    module, _, inner = ref[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module or '(none)'} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / inner


def expand_files(patterns: list[str], base: Path) -> list[Path]:
    """Spec `dataset.files` → sorted absolute paths (globs expanded, relative to the spec, `package:` resolved)."""
    out: list[Path] = []
    for pattern in patterns:
        if pattern.startswith(PACKAGE_SCHEME):
            path = resolve_package_path(pattern)
            matches = [path] if path.exists() else []
        else:
            full = Path(pattern).expanduser()
            full = full if full.is_absolute() else base / full
            matches = [Path(p) for p in sorted(glob.glob(str(full), recursive=True))]
        if not matches:
            raise FileNotFoundError(f"{pattern} matches no file")
        out.extend(m.resolve() for m in matches)
    return list(dict.fromkeys(out))


def _file_identity(path: Path) -> list[Any]:
    """What makes a source file's bytes distinct without reading it: path, size, modification time."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path), [[str(p.relative_to(path)), *_size_mtime(p)] for p in files]]
    return [str(path), *_size_mtime(path)]


def _size_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def git_info(path: Path) -> dict[str, Any]:
    """The commit of the repository holding the spec, and whether it has uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--", path.name))}


def tokenizer_identity(model: str, revision: str | None) -> str:
    """Models the catalog says share a tokenizer share chunk outputs; others are keyed by model and revision."""
    known = catalog.find_model(model)
    if known is not None and not Path(model).is_dir():
        return f"{known.id}@{revision}" if revision else f"family:{known.tokenizer}"
    return f"{model}@{revision or 'main'}"


def make_plan(spec: Spec, spec_path: Path, *, backend: str | None = None) -> Plan:
    """Resolve a validated spec into a Plan (local files are globbed and fingerprinted here)."""
    spec_path = Path(spec_path)
    backend = backend or spec.backend
    ds = spec.dataset
    files: list[Path] = []
    if ds.files is not None:
        try:
            files = expand_files(ds.files, spec_path.parent)
        except FileNotFoundError as exc:
            raise SpecError([SpecIssue(str(spec_path), "dataset.files", str(exc))]) from None
    data_key = {
        "kind": "hf" if ds.hf else "files",
        "hf": ds.hf,
        "config": ds.config,
        "split": ds.split,
        "revision": ds.revision,
        "files": [_file_identity(f) for f in files],
        "text_column": ds.text_column,
        "text_template": ds.text_template,
        "id_column": ds.id_column,
        "keep_columns": ds.keep_columns,
        "limit": ds.limit,
        "shard_rows": ds.shard_rows,
    }
    data = DataSettings(
        **{**data_key, "files": tuple(str(f) for f in files), "keep_columns": tuple(ds.keep_columns)},
        fingerprint=fingerprint(data_key),
    )

    emb = spec.embedding
    model = model_ref(emb.model, spec_path)
    chunk_key = {
        "data": data.fingerprint,
        "size": spec.chunking.size,
        "overlap": spec.chunking.overlap_tokens,
        "tokenizer": tokenizer_identity(model, emb.revision),
        "keep_columns": ds.keep_columns,
    }
    chunk = ChunkSettings(
        data_fingerprint=data.fingerprint,
        size=spec.chunking.size,
        overlap=spec.chunking.overlap_tokens,
        model=model,
        revision=emb.revision,
        tokenizer_id=chunk_key["tokenizer"],
        keep_columns=tuple(ds.keep_columns),
        fingerprint=fingerprint(chunk_key),
    )

    gpu = catalog.find_gpu(spec.compute.gpu)
    if gpu is None:
        raise SpecError([SpecIssue(str(spec_path), "compute.gpu", f"unknown GPU {spec.compute.gpu!r}")])
    engine = "tei" if (backend == "modal" or emb.endpoint) else "local"
    precision = resolve_precision(emb.precision) if engine == "local" else "float16"
    known = catalog.find_model(emb.model)
    embed_key = {
        "chunks": chunk.fingerprint,
        "engine": engine,
        "model": model,
        "revision": emb.revision,
        "prefix": spec.prefix,
        "normalize": emb.normalize,
        "dimensions": emb.dimensions,
        "precision": precision,
        "include_text": spec.output.include_text,
    }
    embed = EmbedSettings(
        chunk_fingerprint=chunk.fingerprint,
        engine=engine,
        model=model,
        revision=emb.revision,
        prefix=spec.prefix,
        normalize=emb.normalize,
        dimensions=emb.dimensions,
        precision=precision,
        endpoint=emb.endpoint,
        dim=emb.dimensions or (known.dim if known else None),
        include_text=spec.output.include_text,
        keep_columns=tuple(ds.keep_columns),
        max_batch_tokens=spec.compute.max_batch_tokens or gpu.tei_max_batch_tokens,
        fingerprint=fingerprint(embed_key),
    )
    compute = ComputeSettings(
        gpu=gpu.name,
        concurrency_limit=spec.compute.concurrency_limit,
        allow_concurrent_inputs=spec.compute.allow_concurrent_inputs,
        chunk_workers=spec.chunking.workers,
        secrets=tuple(spec.compute.secrets),
        max_cost=spec.compute.max_cost,
        timeout=spec.compute.timeout,
        retries=spec.compute.retries,
    )
    warnings = []
    if known is not None and engine == "tei" and not re.fullmatch(r"[0-9a-f]{40}", emb.revision or ""):
        warnings.extend(f"{known.id}: {issue}" for issue in known.known_issues)
    resolved = spec.model_dump(mode="json")
    return Plan(
        name=spec.name,
        backend=backend,
        volume=spec.volume,
        spec_path=str(spec_path),
        spec=resolved,
        spec_hash=fingerprint(resolved),
        git=git_info(spec_path.resolve()),
        data=data,
        chunk=chunk,
        embed=embed,
        compute=compute,
        warnings=tuple(warnings),
    )


def model_ref(model: str, spec_path: Path) -> str:
    """A Hub id stays as written; a model folder (absolute, or relative to the spec) becomes an absolute path."""
    if model.startswith(("/", "~")):
        return str(Path(model).expanduser())
    if model.startswith(".") or (spec_path.parent / model).is_dir():
        return str((spec_path.parent / model).resolve())
    return model
