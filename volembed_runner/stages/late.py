"""Late interaction (ColBERT) stages: token vectors per embed unit, PyLate's token index over them, MaxSim search.

* Embed: one unit → one file with the dense layout's columns, `embedding` as each chunk's token vectors
  (list<fixed_size_list<float16>[dim]>, `store.multivector_columns`) and `n_vectors`, written and marked done
  exactly as a dense file (temp name, rename, marker).
* Index: after embed, every done embedding file is added, one file at a time, to PyLate's Voyager index (HNSW over
  the token vectors) in a temporary folder that is renamed into `runs/<name>/index/<index_fp>/` and then marked
  done; a rerun of the same spec skips a done index, a killed build starts over. Memory: one embedding file's
  vectors plus the index itself, which Voyager keeps in RAM (tokens x dim x 4 bytes plus the graph).
* Search: the query is encoded as a query (PyLate's marker, padded to the query length); Voyager finds each query
  token's nearest token vectors, and PyLate's `retrieve.ColBERT` reranks the candidate chunks by MaxSim.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner import store
from volembed_runner.errors import StageError
from volembed_runner.plan import Plan, model_slug, volembed_home
from volembed_runner.stages.embed import _read_chunks, paths
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
    """The run's token index folder for the plan's index fingerprint."""
    return store.index_dir(root, plan.name, _late(plan).fingerprint)


def index_done(root: Path, plan: Plan) -> bool:
    """True when the plan's index was built and marked done."""
    folder = index_folder(root, plan)
    return store.is_done_folder(folder)


def build_index(root: Path, plan: Plan) -> dict[str, Any]:
    """Build PyLate's Voyager index over every done embedding file of the plan (skipped when already done)."""
    late, folder = _late(plan), index_folder(root, plan)
    if index_done(root, plan):
        return store.read_json(store.marker_path(folder))
    from pylate import indexes

    embed_folder = store.embeddings_dir(root, plan.name, plan.embed.fingerprint)
    units = store.done_shards(embed_folder)
    if not units:
        raise StageError(f"index: no finished embedding files in {embed_folder}; run the embed stage first")
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{store.writer_tag()}.", dir=folder.parent))
    try:
        index = indexes.Voyager(index_folder=str(tmp), index_name="voyager", override=True,
                                embedding_size=plan.embed.dim or 128, M=late.index_m,
                                ef_construction=late.index_ef_construction, ef_search=late.index_ef_search)
        rows: list[pa.Table] = []
        at = tokens = 0
        for unit in units:
            table = pq.read_table(store.shard_path(embed_folder, unit))
            vectors = [v.astype(np.float32) for v in store.read_multivectors(table["embedding"])]
            ids = [str(i) for i in range(at, at + len(vectors))]
            if vectors:
                with contextlib.redirect_stderr(io.StringIO()):  # PyLate's per-call progress bar
                    index.add_documents(documents_ids=ids, documents_embeddings=vectors)
            rows.append(_rows(root, plan, unit, table))
            at += len(vectors)
            tokens += sum(len(v) for v in vectors)
        pq.write_table(pa.concat_tables(rows) if rows else pa.table({}), tmp / ROWS_FILE)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {"chunks": at, "token_vectors": tokens, "units": len(units), "index": late.index,
             "seconds": round(time.monotonic() - started, 3)}
    store.write_json_atomic(store.marker_path(folder), stats)
    return stats


def _rows(root: Path, plan: Plan, unit: str, table: pa.Table) -> pa.Table:
    """The index's row table for one embedding file: ids, kept columns and a snippet of each chunk's text."""
    text = table["text"] if "text" in table.column_names else _read_chunks(paths(root, plan, unit)[0], unit)["text"]
    snippets = pa.array([t[:SNIPPET_CHARS] for t in text.to_pylist()], type=pa.string())
    kept = [c for c in ("doc_id", "chunk_index", "char_start", "char_end", *plan.embed.keep_columns)
            if c in table.column_names]
    shards = pa.array([parse_key(unit)[0]] * table.num_rows, type=pa.string())
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
    """The top-`k` chunks of the run's index for each query, best first, by MaxSim over the token vectors."""
    late, folder = _late(plan), index_folder(root, plan)
    if not index_done(root, plan):
        raise StageError(f"{plan.name} has no finished late-interaction index ({folder}); run the spec first")
    from pylate import indexes, retrieve

    embedder = embedder or engine(plan)
    index = indexes.Voyager(index_folder=str(folder), index_name="voyager", override=False,
                            embedding_size=plan.embed.dim or embedder.dim, M=late.index_m,
                            ef_construction=late.index_ef_construction, ef_search=late.index_ef_search)
    rows = pq.read_table(folder / ROWS_FILE).to_pylist()
    with contextlib.redirect_stderr(io.StringIO()):  # PyLate's per-call progress bar
        found = retrieve.ColBERT(index=index).retrieve(queries_embeddings=embedder.encode_queries(queries), k=k,
                                                       k_token=late.k_token, device="cpu")
    kept = plan.embed.keep_columns
    return [[_hit(rank, float(r["score"]), rows[int(r["id"])], kept) for rank, r in enumerate(result, 1)]
            for result in found]


def _hit(rank: int, score: float, row: dict[str, Any], kept: tuple[str, ...]) -> Hit:
    return Hit(rank=rank, score=round(score, 4), doc_id=str(row["doc_id"]), chunk_index=int(row["chunk_index"]),
               char_start=int(row["char_start"]), char_end=int(row["char_end"]),
               columns={c: row.get(c) for c in kept}, snippet=row["snippet"],
               shard=str(row.get("shard", "")))


def _late(plan: Plan) -> Any:
    if plan.late is None:
        raise StageError(f"{plan.name} is not a late-interaction run (embedding.kind is dense)")
    return plan.late
