"""Late interaction (ColBERT) stages: token vectors per embed unit, PyLate's token index over them, MaxSim search.

* Embed: one unit → one file with the dense layout's columns, `embedding` as each chunk's token vectors
  (list<fixed_size_list<float16>[dim]>, `store.multivector_columns`) and `n_vectors`, written and marked done
  exactly as a dense file (temp name, rename, marker).
* Index: after embed, the run's chunks (in unit and row order) are cut into index shards of at most
  `plan.late.index_shard_tokens` token vectors; each shard is PyLate's Voyager index (HNSW over the token vectors)
  with its rows.parquet, built in a temporary folder renamed into `runs/<name>/index/<index_fp>/shard-NNNNN/` and
  marked done, and the index folder is marked done after the last. A rerun skips done shards, so a killed build
  resumes per shard. Memory: one shard (token vectors x `index_bytes_per_token`, bounded by the plan) plus one row
  group of an embedding file.
* Search: the query is encoded as a query (PyLate's marker, padded to the query length); in each shard Voyager finds
  each query token's nearest token vectors and PyLate's `retrieve.ColBERT` reranks those chunks by exact MaxSim; the
  shards' top chunks are merged by that score.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner import store
from volembed_runner.errors import StageError
from volembed_runner.plan import Plan, model_slug, volembed_home
from volembed_runner.stages.embed import paths
from volembed_runner.units import parse_key

if TYPE_CHECKING:
    from volembed_runner.embedders.colbert import ColbertEmbedder

ROWS_FILE = "rows.parquet"  # index position → the chunk's ids, columns, a snippet and its chunk shard
SNIPPET_CHARS = 240


def demo_model_dir(plan: Plan) -> Path:
    """Where this machine keeps the demo ColBERT the plan's model is built from (under $VOLEMBED_HOME/models)."""
    late = _late(plan)
    return volembed_home() / "models" / f"{model_slug(plan.model.ref)}-seed{late.build_seed}"


def engine(plan: Plan, *, threads: int | None = None, device: str = "cpu") -> ColbertEmbedder:
    """The plan's PyLate engine: its model (built here for the demo), precision and query length."""
    from volembed_runner.embedders.colbert import ColbertEmbedder

    late, model = _late(plan), plan.model
    build = (demo_model_dir(plan), late.build_base, late.build_seed or 0) if late.build_base else None
    return ColbertEmbedder(model.location, revision=model.revision, precision=plan.embed.precision,  # type: ignore[arg-type]
                           threads=threads, build=build, query_length=late.query_length, device=device)


def index_folder(root: Path, plan: Plan) -> Path:
    """The run's token index folder for the plan's index fingerprint (its index shards inside)."""
    return store.index_dir(root, plan.name, _late(plan).fingerprint)


def index_done(root: Path, plan: Plan) -> bool:
    """True when every index shard of the plan's index was built and the index marked done."""
    folder = index_folder(root, plan)
    return store.is_done_folder(folder)


@dataclass(frozen=True)
class Segment:
    """Consecutive rows [start, stop) of one embedding file, holding `tokens` token vectors."""

    unit: str
    start: int
    stop: int
    tokens: int


def shard_layout(embed_folder: Path, units: list[str], bound: int) -> list[list[Segment]]:
    """The run's chunks, in unit and row order, cut greedily into index shards of at most `bound` token vectors.
    Only each file's `n_vectors` column is read, so the layout is the same on every rerun over the same files."""
    shards: list[list[Segment]] = []
    current: list[Segment] = []
    held = 0  # token vectors in the shard being cut, its open segment included
    for unit in units:
        path = store.shard_path(embed_folder, unit)
        counts = pq.read_table(path, columns=["n_vectors"])["n_vectors"].to_pylist()
        start = tokens = 0
        for row, n in enumerate(counts):
            if n > bound:
                raise StageError(f"index: {path.name} row {row} has {n} token vectors, more than one index shard "
                                 f"holds ({bound}); raise output.late.index_shard_tokens")
            if held + n > bound:
                if row > start:
                    current.append(Segment(unit, start, row, tokens))
                shards.append(current)
                current, held, start, tokens = [], 0, row, 0
            held += n
            tokens += n
        if len(counts) > start:
            current.append(Segment(unit, start, len(counts), tokens))
    if current:
        shards.append(current)
    return shards


def shard_dir(folder: Path, number: int) -> Path:
    """One index shard's folder inside the index folder (its Voyager index and rows.parquet)."""
    return folder / f"shard-{number:05d}"


def build_index(root: Path, plan: Plan, on_shard: Callable[[], None] | None = None) -> dict[str, Any]:
    """Build the run's token index over every done embedding file, one index shard at a time (skipped when done).

    Each shard is a Voyager index over consecutive chunks holding at most `plan.late.index_shard_tokens` token
    vectors; only it is in RAM while it is built. It is written to a temporary folder, renamed into place and marked
    done, so a rerun after a kill builds only the shards that are not done. The index is marked done last.
    `on_shard` runs after each shard is marked (on Modal: the Volume commit that makes the shard survive a lost
    container)."""
    late, folder = _late(plan), index_folder(root, plan)
    if index_done(root, plan):
        return store.read_json(store.marker_path(folder))
    embed_folder = store.embeddings_dir(root, plan.name, plan.embed.fingerprint)
    units = store.done_shards(embed_folder)
    if not units:
        raise StageError(f"index: no finished embedding files in {embed_folder}; run the embed stage first")
    started = time.monotonic()
    layout = shard_layout(embed_folder, units, late.index_shard_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    built = 0
    chunks = 0
    stats: list[dict[str, Any]] = []
    for number, segments in enumerate(layout):
        target = shard_dir(folder, number)
        if not store.is_done_folder(target):
            _build_shard(root, plan, embed_folder, segments, target, first_id=chunks)
            built += 1
            if on_shard is not None:
                on_shard()
        stats.append(store.read_json(store.marker_path(target)))
        chunks += stats[-1]["chunks"]
    summary = {"chunks": chunks, "token_vectors": sum(s["token_vectors"] for s in stats), "units": len(units),
               "index": late.index, "index_shards": len(layout), "index_shards_built": built,
               "index_shard_tokens": late.index_shard_tokens,
               "largest_shard_tokens": max(s["token_vectors"] for s in stats),
               "seconds": round(time.monotonic() - started, 3)}
    store.write_json_atomic(store.marker_path(folder), summary)
    return summary


def _build_shard(root: Path, plan: Plan, embed_folder: Path, segments: list[Segment], target: Path,
                 first_id: int) -> None:
    """Add the segments' token vectors to a new Voyager index in a temporary folder, rename it to `target` and
    mark it done. Ids are the chunks' positions in the whole index, so rows.parquet answers for any shard."""
    from pylate import indexes

    late = _late(plan)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)  # a shard renamed into place but killed before its marker
    store.remove_dead_temporaries(target.parent, f"{target.name}.")  # a killed build's half-written shard
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{store.writer_tag()}.", suffix=".tmp", dir=target.parent))
    try:
        index = indexes.Voyager(index_folder=str(tmp), index_name="voyager", override=True,
                                embedding_size=plan.embed.dim or 128, M=late.index_m,
                                ef_construction=late.index_ef_construction, ef_search=late.index_ef_search)
        rows: list[pa.Table] = []
        at, tokens = first_id, 0
        for segment in segments:
            table = store.read_rows(store.shard_path(embed_folder, segment.unit), segment.start, segment.stop)
            vectors = [v.astype(np.float32) for v in store.read_multivectors(table["embedding"])]
            ids = [str(i) for i in range(at, at + len(vectors))]
            if vectors:
                with contextlib.redirect_stderr(io.StringIO()):  # PyLate's per-call progress bar
                    index.add_documents(documents_ids=ids, documents_embeddings=vectors)
            rows.append(_rows(root, plan, segment, table))
            at += len(vectors)
            tokens += sum(len(v) for v in vectors)
        pq.write_table(pa.concat_tables(rows), tmp / ROWS_FILE)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store.write_json_atomic(store.marker_path(target), {"chunks": at - first_id, "token_vectors": tokens,
                                                        "first_id": first_id})


def _rows(root: Path, plan: Plan, segment: Segment, table: pa.Table) -> pa.Table:
    """An index shard's row table for one segment: ids, kept columns and a snippet of each chunk's text."""
    if "text" in table.column_names:
        text = table["text"]
    else:  # the segment's rows of the unit's chunk shard, whose rows the unit's start offsets
        at = parse_key(segment.unit)[1] or 0
        text = store.read_rows(paths(root, plan, segment.unit)[0], at + segment.start, at + segment.stop,
                               columns=["text"])["text"]
    snippets = pa.array([t[:SNIPPET_CHARS] for t in text.to_pylist()], type=pa.string())
    kept = [c for c in ("doc_id", "chunk_index", "char_start", "char_end", *plan.embed.keep_columns)
            if c in table.column_names]
    shards = pa.array([parse_key(segment.unit)[0]] * table.num_rows, type=pa.string())
    return table.select(kept).append_column("snippet", snippets).append_column("shard", shards)


@dataclass(frozen=True)
class Hit:
    """One search result: the chunk's MaxSim score, its ids, kept columns and the start of its text."""

    rank: int
    score: float
    doc_id: str
    chunk_index: int
    char_start: int
    char_end: int
    columns: dict[str, Any]
    snippet: str
    shard: str  # the chunk shard holding it

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form."""
        return dict(self.__dict__)


def search(root: Path, plan: Plan, queries: list[str], k: int = 10,
           embedder: ColbertEmbedder | None = None) -> list[list[Hit]]:
    """The top-`k` chunks of the run's index for each query, best first, by MaxSim over the token vectors.

    Every index shard is searched in turn (one in RAM at a time) for its own top `k`, reranked by exact MaxSim over
    the candidates' token vectors; the shards' candidates are then merged by that score."""
    late, folder = _late(plan), index_folder(root, plan)
    if not index_done(root, plan):
        raise StageError(f"{plan.name} has no finished late-interaction index ({folder}); run the spec first")
    from pylate import indexes, retrieve

    embedder = embedder or engine(plan)
    encoded = embedder.encode_queries(queries)
    stats = store.read_json(store.marker_path(folder))
    found: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in queries]
    for number in range(int(stats["index_shards"])):
        target = shard_dir(folder, number)
        first = int(store.read_json(store.marker_path(target))["first_id"])
        index = indexes.Voyager(index_folder=str(target), index_name="voyager", override=False,
                                embedding_size=plan.embed.dim or embedder.dim, M=late.index_m,
                                ef_construction=late.index_ef_construction, ef_search=late.index_ef_search)
        rows = pq.read_table(target / ROWS_FILE).to_pylist()
        with contextlib.redirect_stderr(io.StringIO()):  # PyLate's per-call progress bar
            results = retrieve.ColBERT(index=index).retrieve(queries_embeddings=encoded, k=k,
                                                             k_token=late.k_token, device="cpu")
        for merged, result in zip(found, results, strict=True):
            merged.extend((float(r["score"]), rows[int(r["id"]) - first]) for r in result)
    kept = plan.embed.keep_columns
    ranked = [sorted(merged, key=lambda hit: -hit[0])[:k] for merged in found]
    return [[_hit(rank, score, row, kept) for rank, (score, row) in enumerate(hits, 1)] for hits in ranked]


def _hit(rank: int, score: float, row: dict[str, Any], kept: tuple[str, ...]) -> Hit:
    return Hit(rank=rank, score=round(score, 4), doc_id=str(row["doc_id"]), chunk_index=int(row["chunk_index"]),
               char_start=int(row["char_start"]), char_end=int(row["char_end"]),
               columns={c: row.get(c) for c in kept}, snippet=row["snippet"],
               shard=str(row.get("shard", "")))


def _late(plan: Plan) -> Any:
    if plan.late is None:
        raise StageError(f"{plan.name} is not a late-interaction run (embedding.kind is dense)")
    return plan.late
