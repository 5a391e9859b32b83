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

from volembed_runner import batching, catalog
from volembed_runner.errors import ModelError, SpecError, SpecIssue
from volembed_runner.late import (
    DEFAULT_LATE_DIM,
    INDEX_EF_CONSTRUCTION,
    INDEX_EF_SEARCH,
    INDEX_KIND,
    INDEX_M,
    INDEX_MEMORY_SHARE,
    K_TOKEN,
    LATE,
    PYLATE_VERSION,
    LateSettings,
    index_bytes_per_token,
    max_index_shard_tokens,
)
from volembed_runner.machine import local_device, native_bf16, resolve_device_precision, resolve_runtime, usable_cores
from volembed_runner.models import resolve_model_dir, weights_fingerprint
from volembed_runner.redact import public_record, public_url
from volembed_runner.spec import Spec, local_only_error, prefix_tokens

PACKAGE_SCHEME = "package:"
MODAL_ROOT = "/vol"  # where the Volume is mounted in every Modal container (never /data: TEI's image uses it)
MODAL_MODELS_DIR = "/models"  # where the images hold the model's files
LOCAL_DOWNLOAD_WORKERS = 4
# The index stage's library, in its fingerprint: the version constraints.txt pins (the `index` extra and the rendered
# CPU image install it; tests/test_index.py holds the three alike).
LANCEDB_VERSION = "0.40.0"
# Under this many rows a LanceDB table gets no ANN index: "for datasets around 100K rows or fewer ... a vector index
# is usually unnecessary overhead" (https://docs.lancedb.com/oss/v0-41-0/indexing/vector-index); search scans it.
ANN_MIN_ROWS = 100_000
ANN_INDEX = "IVF_HNSW_SQ"  # no sub-vector count to fit the width (any `dimensions` works); cosine, as search scores
DEFAULT_SPECIAL_TOKENS = 2  # [CLS]/[SEP] or <s>/</s>: assumed for a model the catalog does not know


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able settings."""
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


HOME_DIR = ".volembed"


def volembed_home(spec_path: Path | str | None = None) -> Path:
    """Where local outputs live, the same whatever the current folder: $VOLEMBED_HOME; else `.volembed` at the
    root of the git repository holding the spec; else the per-user data folder ($XDG_DATA_HOME/volembed, by
    default ~/.local/share/volembed, as the XDG Base Directory specification places application data)."""
    env = os.environ.get("VOLEMBED_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if spec_path is not None:
        repo = repository_root(Path(spec_path).expanduser().resolve().parent)
        if repo is not None:
            return repo / HOME_DIR
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser().resolve() / "volembed"


def openvino_cache() -> Path:
    """Where the local engine keeps its OpenVINO exports: $VOLEMBED_CACHE/openvino, else $VOLEMBED_HOME's
    `openvino/` (`volembed_home()`). An export is keyed by the weights it was made from, so homes may share one."""
    env = os.environ.get("VOLEMBED_CACHE")
    return (Path(env).expanduser().resolve() if env else volembed_home()) / "openvino"


def local_batch(model: ModelSettings, runtime: str, precision: str, device: str, threads: int) -> batching.BatchBudget:
    """The local engine's batch budget: the sweep this machine stored for these weights, runtime, precision, device
    and threads, else the catalog's default (a model not on this machine yet gets the default)."""
    home = volembed_home()
    if batching.has_sweeps(home):
        try:
            folder = resolve_model_dir(model.location, model.revision, download=False)
        except ModelError:
            folder = None
        if folder is not None:
            key = batching.budget_key(weights_fingerprint(folder), runtime, precision, device, threads)
            found = batching.cached_budget(home, key)
            if found is not None:
                return found
    return batching.default_budget(device)


def repository_root(folder: Path) -> Path | None:
    """The nearest folder at or above `folder` holding `.git` (a repository or a worktree), else None."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


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
    duplicate_ids: str  # "error" | "suffix"
    num_rows: int | None  # the spec's size hints, for the dry run
    num_bytes: int | None
    fingerprint: str = ""


@dataclass(frozen=True)
class ModelSettings:
    """The embedding model, resolved once: which one, where the stages find its files, what the catalog knows."""

    ref: str  # a Hub id as written, or an absolute local folder
    revision: str | None
    files_dir: str | None  # where the stages read its files when the plan knows (on Modal: the images' copy)
    tokenizer_id: str  # models sharing a tokenizer share chunk outputs
    known: bool  # the catalog knows it; the facts below are the catalog's, else None / safe defaults
    dim: int | None
    max_input_tokens: int | None
    special_tokens: int
    params_m: float | None
    tokenizer_family: str | None
    known_issues: tuple[str, ...]
    revision_source: str | None = None  # why `revision` is what it is when the spec left it null (the catalog's pin)

    @property
    def location(self) -> str:
        """What the stages resolve the model's files from: its folder when the plan knows it, else the reference."""
        return self.files_dir or self.ref


@dataclass(frozen=True)
class ChunkSettings:
    """How chunk shards are cut (with the model's tokenizer, `Plan.model`)."""

    data_fingerprint: str
    size: int
    overlap: int
    keep_columns: tuple[str, ...]
    prefix: str  # what the engine puts before every chunk: chunks are cut so that prefix + chunk fits
    fingerprint: str = ""


@dataclass(frozen=True)
class EmbedSettings:
    """How chunk shards become vectors."""

    chunk_fingerprint: str
    engine: str  # "local" (in-process) or "tei" (a TEI server: on Modal, or embedding.endpoint)
    precision: str  # what the engine runs at: fp32 | bf16 locally (auto resolved for this CPU), float16 on TEI
    prefix: str
    normalize: bool
    dimensions: int | None
    endpoint: str | None
    dim: int | None  # the vectors' width when known before running: `dimensions`, else the catalog's
    include_text: bool
    keep_columns: tuple[str, ...]
    max_batch_tokens: int
    truncate: bool  # the engine may cut an over-long chunk (counted); off, such a chunk fails its shard
    input_overhead: int  # tokens the engine adds to every chunk: special tokens + the prefix's
    server: str  # what embeds: "local", "tei:<version>" (Modal's own TEI), or the endpoint's public URL
    query_prefix: str = ""  # what `search` puts before a query (not part of the fingerprint: no vector changes)
    fingerprint: str = ""
    # The dense local engine's runtime (openvino | torch) and batch budget (padded tokens and texts per forward pass):
    # this machine's measured sweep (`batching`) or the catalog's default; empty/None for other engines. Not in the
    # fingerprint: vectors do not depend on how texts are batched.
    runtime: str = ""
    batch_tokens: int | None = None
    batch_texts: int | None = None
    batch_measured: bool = False
    batch_source: str = ""


@dataclass(frozen=True)
class IndexSettings:
    """The optional index stage (`output.index`): the run's vectors as one LanceDB table, built in one container."""

    kind: str  # "lancedb"
    embed_fingerprint: str
    ann_min_rows: int  # the table gets an ANN index from this many rows on
    ann_index: str
    lancedb: str  # the library version that writes it
    cpu: float  # the Modal container that builds it (catalog `containers.yaml`)
    memory_mib: int
    fingerprint: str = ""


@dataclass(frozen=True)
class Container:
    """What one container of a stage requests: physical cores and memory."""

    cpu: float
    memory_mib: int

    @property
    def memory_gib(self) -> float:
        """Memory in GiB, as prices are quoted."""
        return self.memory_mib / 1024


@dataclass(frozen=True)
class ComputeSettings:
    """Fan-out, container sizes (catalog `containers.yaml`, GPU `embed_cpu`) and Modal settings."""

    gpu: str
    concurrency_limit: int
    allow_concurrent_inputs: int
    chunk_workers: int
    secrets: tuple[str, ...]
    max_cost: float | None
    timeout: int
    retries: int
    download: Container
    chunk: Container
    embed: Container
    orchestrator: Container
    download_max_containers: int
    embed_scaledown_s: int
    embed_startup_timeout_s: int


@dataclass(frozen=True)
class HubSettings:
    """Where the run is published on the Hub (`output.hub`, or `volembed-run push --repo`)."""

    repo: str
    private: bool = False
    secret: str | None = None  # the Modal Secret holding HF_TOKEN (Modal backend)
    license: str | None = None  # None: the source dataset's, read from its card when pushing


@dataclass(frozen=True)
class MachineFacts:
    """The machine that planned the run: what the local backend and its estimate run on."""

    cores: int
    native_bf16: bool
    device: str = "cpu"  # where the local engine runs: cuda when torch sees a GPU, else cpu


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
    model: ModelSettings
    chunk: ChunkSettings
    embed: EmbedSettings
    compute: ComputeSettings
    machine: MachineFacts
    warnings: tuple[str, ...] = field(default_factory=tuple)
    hub: HubSettings | None = None
    index: IndexSettings | None = None
    late: LateSettings | None = None  # set for `embedding.kind: late_interaction`

    def local_root(self) -> Path:
        """The folder standing in for the Volume on the local backend."""
        return volembed_home(self.spec_path) / "volumes" / self.volume

    @property
    def local_workers(self) -> int:
        """Processes the local backend runs CPU stages in: `chunking.workers`, capped by the machine's cores."""
        return max(1, min(self.compute.chunk_workers, self.machine.cores))

    @property
    def local_download_workers(self) -> int:
        """Sources the local backend reads at once: the Hub serves a few parallel downloads well, files gain little."""
        return min(self.local_workers, LOCAL_DOWNLOAD_WORKERS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for worker processes and the generated Modal app)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of `to_dict`."""
        def tuples(sub: dict[str, Any], *keys: str) -> dict[str, Any]:
            return {k: tuple(v) if k in keys else v for k, v in sub.items()}

        compute = dict(d["compute"])
        for kind in ("download", "chunk", "embed", "orchestrator"):
            compute[kind] = Container(**compute[kind])
        return cls(
            **{k: v for k, v in d.items() if k not in ("data", "model", "chunk", "embed", "compute", "machine",
                                                       "warnings", "hub", "index", "late")},
            data=DataSettings(**tuples(d["data"], "files", "keep_columns")),
            model=ModelSettings(**tuples(d["model"], "known_issues")),
            chunk=ChunkSettings(**tuples(d["chunk"], "keep_columns")),
            embed=EmbedSettings(**tuples(d["embed"], "keep_columns")),
            compute=ComputeSettings(**tuples(compute, "secrets")),
            machine=MachineFacts(**d["machine"]),
            warnings=tuple(d.get("warnings", ())),
            hub=HubSettings(**d["hub"]) if d.get("hub") else None,
            index=IndexSettings(**d["index"]) if d.get("index") else None,
            late=LateSettings(**tuples(d["late"], "markers")) if d.get("late") else None,
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


def model_slug(model: str) -> str:
    """A folder name for a model: `org/name` → `org--name`; a local folder → its name."""
    name = Path(model).name if model.startswith("/") else model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"


def is_commit(revision: str | None) -> bool:
    """True for a full 40-hex commit id (a branch or tag can move under a run)."""
    return re.fullmatch(r"[0-9a-f]{40}", revision or "") is not None


def tei_revision(ref: str, revision: str | None, backend: str, spec_path: Path) -> tuple[str | None, str | None]:
    """(revision, where it came from) of a model TEI will load on Modal: where the catalog knows the pinned TEI cannot
    load the Hub's main, a null revision becomes the catalog's known-good commit and a branch or tag is refused
    (SpecError naming embedding.revision), so the combination never reaches a GPU."""
    known = catalog.find_model(ref)
    if backend != "modal" or known is None or known.tei_revision is None or Path(ref).is_dir():
        return revision, None
    if revision is None:
        return known.tei_revision, f"catalog: {known.tei_revision_source}"
    if is_commit(revision):
        return revision, None
    issue = known.known_issues[0] if known.known_issues else "the pinned TEI cannot load it"
    raise SpecError([SpecIssue(str(spec_path), "embedding.revision",
                               f"{revision!r} is not a commit, and {issue}; leave embedding.revision null to use "
                               f"{known.tei_revision} (the catalog's known-good commit), or pin another")])


def resolve_model(ref: str, revision: str | None, backend: str, revision_source: str | None = None) -> ModelSettings:
    """The model's record: the catalog's facts, and where its files are (a local folder; the images' copy on Modal,
    where the weights are baked into the GPU image and the tokenizer into the CPU image)."""
    known = catalog.find_model(ref)
    if backend == "modal":
        files_dir: str | None = f"{MODAL_MODELS_DIR}/{model_slug(ref)}"
    else:
        files_dir = ref if Path(ref).is_dir() else None
    return ModelSettings(
        ref=ref,
        revision=revision,
        files_dir=files_dir,
        tokenizer_id=tokenizer_identity(ref, revision),
        known=known is not None,
        dim=known.dim if known else None,
        max_input_tokens=known.max_input_tokens if known else None,
        special_tokens=known.special_tokens if known else DEFAULT_SPECIAL_TOKENS,
        params_m=known.params_m if known else None,
        tokenizer_family=known.tokenizer if known else None,
        known_issues=known.known_issues if known else (),
        revision_source=revision_source,
    )


def resolve_compute(spec: Spec) -> ComputeSettings:
    """Fan-out from the spec; container sizes from the catalog (`containers.yaml`, the GPU's `embed_cpu`)."""
    gpu = catalog.gpus()[spec.compute.gpu]  # validated: spec.py maps aliases to the catalog's name
    sizes = catalog.containers()

    def container(kind: str, cpu: float | None = None) -> Container:
        return Container(cpu=float(cpu if cpu is not None else sizes[kind]["cpu"]),
                         memory_mib=int(sizes[kind]["memory_mib"]))

    return ComputeSettings(
        gpu=gpu.name,
        concurrency_limit=spec.compute.concurrency_limit,
        allow_concurrent_inputs=spec.compute.allow_concurrent_inputs,
        chunk_workers=spec.chunking.workers,
        secrets=tuple(spec.compute.secrets),
        max_cost=spec.compute.max_cost,
        timeout=spec.compute.timeout,
        retries=spec.compute.retries,
        download=container("download"),
        chunk=container("chunk"),
        embed=container("embed", gpu.embed_cpu),
        orchestrator=container("orchestrator"),
        download_max_containers=min(int(sizes["download"]["max_containers"]), spec.chunking.workers),
        embed_scaledown_s=int(sizes["embed"]["scaledown_seconds"]),
        embed_startup_timeout_s=int(sizes["embed"]["startup_timeout_seconds"]),
    )


def make_plan(spec: Spec, spec_path: Path, *, backend: str | None = None) -> Plan:
    """Resolve a validated spec into a Plan (local files are globbed and fingerprinted here)."""
    spec_path = Path(spec_path)
    backend = backend or spec.backend
    local_only = local_only_error(spec.embedding.model, backend)
    if local_only is not None:  # the spec's own backend was checked on load; this is a --backend override
        raise SpecError([SpecIssue(str(spec_path), "embedding.model", f"{local_only} (backend {backend} from the "
                                   "command line)")])
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
    if ds.duplicate_ids != "error":  # renaming changes the shards' bytes; refusing duplicates leaves them as they are
        data_key["duplicate_ids"] = ds.duplicate_ids
    data = DataSettings(
        **{**data_key, "files": tuple(str(f) for f in files), "keep_columns": tuple(ds.keep_columns),
           "duplicate_ids": ds.duplicate_ids},
        num_rows=ds.num_rows,
        num_bytes=ds.num_bytes,
        fingerprint=fingerprint(data_key),
    )

    emb = spec.embedding
    ref = model_ref(emb.model, spec_path)
    revision, revision_source = tei_revision(ref, emb.revision, backend, spec_path)
    model = resolve_model(ref, revision, backend, revision_source)
    chunk_key = {
        "data": data.fingerprint,
        "size": spec.chunking.chunk_size,
        "overlap": spec.chunking.overlap_tokens,
        "tokenizer": model.tokenizer_id,
        "keep_columns": ds.keep_columns,
    }
    if spec.prefix:  # the prefix's junction with a chunk's first word can change where a chunk must end
        chunk_key["prefix"] = spec.prefix
    chunk = ChunkSettings(
        data_fingerprint=data.fingerprint,
        size=spec.chunking.chunk_size,
        overlap=spec.chunking.overlap_tokens,
        keep_columns=tuple(ds.keep_columns),
        prefix=spec.prefix,
        fingerprint=fingerprint(chunk_key),
    )

    compute = resolve_compute(spec)
    late = emb.kind == LATE
    engine = "tei" if (backend == "modal" or emb.endpoint) else "local"
    if late:  # PyLate on both backends: in this process, or in Modal's GPU image (TEI serves no ColBERT)
        engine = "pylate" if backend == "modal" else "local"
    device = local_device() if engine == "local" else "cpu"
    precision = resolve_device_precision(emb.precision, device) if engine == "local" else "float16"
    cores = usable_cores()
    runtime = resolve_runtime("auto", device) if engine == "local" and not late else ""
    batch = local_batch(model, runtime, precision, device, cores) if runtime else None
    if emb.endpoint:
        server = public_url(emb.endpoint)
    else:
        server = f"tei:{catalog.gpu_table()['tei_version']}" if engine == "tei" else "local"
    if late:
        server = f"pylate:{PYLATE_VERSION}"
    embed_key = {
        "chunks": chunk.fingerprint,
        "engine": engine,
        "model": model.ref,
        "revision": revision,
        "prefix": spec.prefix,
        "normalize": emb.normalize,
        "dimensions": emb.dimensions,
        "precision": precision,
        "include_text": spec.output.include_text,
        "truncate": emb.truncate,
        "server": server,
    }
    if late:  # dense fingerprints stay as they were
        embed_key["kind"] = LATE
    embed = EmbedSettings(
        chunk_fingerprint=chunk.fingerprint,
        engine=engine,
        precision=precision,
        prefix=spec.prefix,
        normalize=emb.normalize,
        dimensions=emb.dimensions,
        endpoint=emb.endpoint,
        dim=emb.dimensions or model.dim,
        include_text=spec.output.include_text,
        keep_columns=tuple(ds.keep_columns),
        max_batch_tokens=spec.compute.max_batch_tokens or catalog.gpus()[compute.gpu].tei_max_batch_tokens,
        truncate=emb.truncate,
        input_overhead=model.special_tokens + prefix_tokens(spec.prefix, model.ref),
        server=server,
        fingerprint=fingerprint(embed_key),
        query_prefix=spec.query_prefix,
        runtime=runtime,
        batch_tokens=batch.tokens if batch else None,
        batch_texts=batch.texts if batch else None,
        batch_measured=batch.measured if batch else False,
        batch_source=batch.source if batch else "",
    )
    late_settings = resolve_late(spec, embed.fingerprint, embed.dim or DEFAULT_LATE_DIM,
                                 compute.embed.memory_mib) if late else None
    warnings = []
    if model.known and engine == "tei" and not is_commit(revision):
        warnings.extend(f"{model.ref}: {issue}" for issue in model.known_issues)
    resolved = spec.model_dump(mode="json")
    return Plan(
        name=spec.name,
        backend=backend,
        volume=spec.volume,
        spec_path=str(spec_path),
        spec=public_record(resolved, spec._variables),  # what the manifest and the dataset card show
        spec_hash=fingerprint(resolved),
        git=git_info(spec_path.resolve()),
        data=data,
        model=model,
        chunk=chunk,
        embed=embed,
        compute=compute,
        machine=MachineFacts(cores=cores, native_bf16=native_bf16(), device=device),
        warnings=tuple(warnings),
        hub=HubSettings(**spec.output.hub.model_dump()) if spec.output.hub else None,
        index=resolve_index(spec, embed.fingerprint),
        late=late_settings,
    )


def resolve_late(spec: Spec, embed_fingerprint: str, dim: int, memory_mib: int) -> LateSettings:
    """The query side of a ColBERT model (catalog) and the token index's settings, fingerprinted after embed. The
    index shard bound is the spec's `output.late.index_shard_tokens`, else what INDEX_MEMORY_SHARE of the index
    container's memory (`containers.yaml` embed: the PyLate image's container, which builds the index on Modal and
    bounds it locally too) holds at `index_bytes_per_token`."""
    known = catalog.find_model(spec.embedding.model)
    wanted = spec.output.late.index_shard_tokens if spec.output.late else None
    shard_tokens = wanted or max_index_shard_tokens(memory_mib, dim)
    source = ("output.late.index_shard_tokens" if wanted else
              f"derived: {INDEX_MEMORY_SHARE:.0%} of the index container's {memory_mib:,} MiB / "
              f"{index_bytes_per_token(dim)} B per token vector")
    settings = {"index": INDEX_KIND, "m": INDEX_M, "ef_construction": INDEX_EF_CONSTRUCTION,
                "shard_tokens": shard_tokens}
    return LateSettings(
        query_length=known.query_length if known else None,
        markers=known.markers if known else (),
        build_base=known.build.base if known and known.build else None,
        build_seed=known.build.seed if known and known.build else None,
        index=INDEX_KIND,
        index_m=INDEX_M,
        index_ef_construction=INDEX_EF_CONSTRUCTION,
        index_ef_search=INDEX_EF_SEARCH,
        k_token=K_TOKEN,
        index_shard_tokens=shard_tokens,
        index_bytes_per_token=index_bytes_per_token(dim),
        index_memory_mib=memory_mib,
        index_shard_source=source,
        fingerprint=fingerprint({"embeddings": embed_fingerprint, **settings}),
    )


def resolve_index(spec: Spec, embed_fingerprint: str) -> IndexSettings | None:
    """The index stage's settings, or None without `output.index`; its fingerprint follows the vectors it holds."""
    if spec.output.index is None:
        return None
    key = {"embeddings": embed_fingerprint, "kind": spec.output.index, "lancedb": LANCEDB_VERSION,
           "ann_min_rows": ANN_MIN_ROWS, "ann_index": ANN_INDEX, "include_text": spec.output.include_text}
    size = catalog.containers()["index"]
    return IndexSettings(kind=spec.output.index, embed_fingerprint=embed_fingerprint, ann_min_rows=ANN_MIN_ROWS,
                         ann_index=ANN_INDEX, lancedb=LANCEDB_VERSION, cpu=float(size["cpu"]),
                         memory_mib=int(size["memory_mib"]), fingerprint=fingerprint(key))


def model_ref(model: str, spec_path: Path) -> str:
    """A Hub id stays as written; a model folder (absolute, or relative to the spec) becomes an absolute path."""
    if model.startswith(("/", "~")):
        return str(Path(model).expanduser())
    if model.startswith(".") or (spec_path.parent / model).is_dir():
        return str((spec_path.parent / model).resolve())
    return model
