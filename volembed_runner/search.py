"""`volembed-run search`: the run's chunks nearest a query, by cosine similarity of their vectors.

The query is embedded with the run's model (its dimensions and normalization) after the model's *query-side*
prefix (`plan.embed.query_prefix`: the catalog's, e.g. bge's retrieval instruction, nomic's "search_query: ", e5's
"query: "), never the document prefix: through the spec's TEI endpoint when it has one, else with the local engine
(the `local` extra), which finds the model on this machine (folder, HF cache, package) or fetches it from the Hub.

Where the run has a LanceDB table (`output.index: lancedb`, `stages/index.py`) on this machine, the table answers
(with its ANN index when it has one). Otherwise the search is exact: the current embedding files are streamed in
record batches, a file at a time (a Modal run's through the SDK, each downloaded copy deleted after it is scanned),
and a heap keeps the best k, so memory holds one batch and k hits whatever the run's size.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner import store
from volembed_runner.errors import BackendError, EmbedderError
from volembed_runner.fetch import KEYS, VolumeReader
from volembed_runner.plan import Plan
from volembed_runner.results import (
    Entry,
    LocalVolume,
    Outputs,
    VolumeFiles,
    by_chunk_shard,
    finished_files,
    read_outputs,
    shard_id,
)
from volembed_runner.stages.index import TABLE, open_table

BATCH_ROWS = 8192  # vectors scored at a time: 8,192 × 1,024 float32 is 32 MiB
MAX_K = 10_000  # the heap holds k rows with their text


@dataclass(frozen=True)
class Hit:
    """One chunk of the run and how close it is to the query."""

    score: float  # cosine similarity
    doc_id: str
    chunk_index: int
    shard: str  # the chunk shard holding it
    columns: dict[str, Any]  # the spec's keep_columns
    text: str | None


@dataclass(frozen=True)
class SearchResult:
    """What `search` found, and how: the query as embedded, the engine, exact or through the LanceDB table."""

    query: str
    query_prefix: str
    model: str
    engine: str  # "local engine" or the endpoint's public URL
    method: str  # "exact" | "lancedb" (exact scan of the table) | "lancedb ANN" | "voyager" (late interaction)
    scanned: int  # vectors scored (the table's rows when it answered; a token index's token vectors)
    hits: list[Hit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    read_from: str | None = None  # the remote volume the files were downloaded from (a Modal Volume), else None
    bytes_read: int = 0  # what was downloaded from it
    measure: str = "cosine"  # "MaxSim" for a late-interaction run (the sum of each query token's best match)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form."""
        return asdict(self)


QueryEmbedder = Callable[[str], np.ndarray]


def query_embedder(plan: Plan) -> tuple[QueryEmbedder, str]:
    """A function from query to its vector (the run's width, unit norm), and how the query is embedded."""
    e, model = plan.embed, plan.model
    if e.endpoint:
        from volembed_runner.stages.embed import tei_client

        query_plan = replace(plan, embed=replace(e, prefix=e.query_prefix, truncate=True))

        async def through_tei(query: str) -> np.ndarray:
            async with tei_client(query_plan, e.endpoint or "") as client:
                return await client.embed([query], [len(query.split())])

        return (lambda query: asyncio.run(through_tei(query))[0]), e.server
    try:
        from volembed_runner.embedders.local import LocalEmbedder
    except ImportError:  # the `local` extra is not installed
        raise EmbedderError("search embeds the query with the local engine, which needs the `local` extra "
                            "(pip install 'volembed-runner[local]'), or set embedding.endpoint to a TEI server "
                            "serving the model") from None
    location = model.location if plan.backend == "local" else model.ref  # a Modal plan names the images' copy
    precision = e.precision if e.engine == "local" else "auto"
    engine = LocalEmbedder(model=location, revision=model.revision, prefix=e.query_prefix, normalize=True,
                           precision=precision, dimensions=e.dimensions, truncate=True)
    return (lambda query: engine.embed([query], [len(query.split())])[0]), "local engine"


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise EmbedderError("the query's vector is zero or not finite; try another query")
    return vector / norm


def _vectors(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed_size_list<float32> column as a [rows, dim] array (offsets and chunks respected)."""
    arrays = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.asarray(a.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
             for a in arrays]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


class TopK:
    """The k best-scoring rows seen so far (a min-heap of size k); ties keep the row seen first."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, dict[str, Any]]] = []
        self._seq = itertools.count()

    def floor(self) -> float:
        """The score a row must beat to enter (−inf until k rows are held)."""
        return self._heap[0][0] if len(self._heap) == self.k else -np.inf

    def admits(self, score: float) -> bool:
        """Whether a row of this score would be kept (so its columns are read only then)."""
        return len(self._heap) < self.k or score > self._heap[0][0]

    def push(self, score: float, row: dict[str, Any]) -> None:
        """Keep the row, dropping the worst held when k are held (call after `admits`)."""
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, (score, -next(self._seq), row))
        else:
            heapq.heapreplace(self._heap, (score, -next(self._seq), row))

    def best(self) -> list[tuple[float, dict[str, Any]]]:
        """The rows held, best first."""
        return [(score, row) for score, _, row in sorted(self._heap, reverse=True)]


def scan(paths: Iterable[tuple[str, Path]], query: np.ndarray, k: int, columns: list[str],
         on_file: Callable[[], None] = lambda: None) -> tuple[list[tuple[float, dict[str, Any]]], int]:
    """Exact cosine top-k over embedding files, batch by batch: (best rows with their chunk shard, rows scored).

    `paths` are (chunk shard, local file), taken one at a time; `on_file` runs after each file is scanned (to delete
    a downloaded copy). A file whose vectors are not the query's width is refused.
    """
    top = TopK(k)
    scanned = 0
    for shard, path in paths:
        parquet = pq.ParquetFile(path)
        width = parquet.schema_arrow.field("embedding").type.list_size
        if width != query.shape[0]:
            raise BackendError(f"{path.name}: the run's vectors are {width}-dim but the query's is "
                               f"{query.shape[0]}-dim (embedding.dimensions changed?); rerun the spec")
        wanted = [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[*wanted, "embedding"]):
            vectors = _vectors(batch.column("embedding"), query.shape[0])
            norms = np.linalg.norm(vectors, axis=1)
            scores = (vectors @ query) / np.where(norms > 0, norms, 1.0)
            scanned += len(scores)
            candidates = np.flatnonzero(scores > top.floor())
            if len(candidates) > k:
                candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
            for i in candidates[np.argsort(-scores[candidates], kind="stable")]:
                if top.admits(float(scores[i])):
                    row = {c: batch.column(c)[int(i)].as_py() for c in wanted}
                    top.push(float(scores[i]), {**row, "__shard": shard})
        on_file()
    return top.best(), scanned


def _texts(reader: VolumeReader, chunk_files: dict[str, Entry], rows: list[dict[str, Any]]) -> None:
    """Fill each row's `text` from its chunk shard (the embedding files carry none), matched on the keys."""
    wanted: dict[str, set[tuple[str, int]]] = {}
    for row in rows:
        wanted.setdefault(row["__shard"], set()).add((row["doc_id"], row["chunk_index"]))
    found: dict[tuple[str, int], str] = {}
    for shard, keys in wanted.items():
        if shard not in chunk_files:
            continue
        ids = sorted({doc for doc, _ in keys})
        table = pq.read_table(reader.path(chunk_files[shard]), columns=[*KEYS, "text"],
                              filters=[("doc_id", "in", ids)])
        for doc, index, text in zip(*(table[c].to_pylist() for c in (*KEYS, "text")), strict=True):
            if (doc, index) in keys:
                found[(doc, index)] = text
        reader.release()
    for row in rows:
        row.setdefault("text", found.get((row["doc_id"], row["chunk_index"])))


def _hits(plan: Plan, best: list[tuple[float, dict[str, Any]]]) -> list[Hit]:
    return [Hit(score=round(score, 6), doc_id=str(row["doc_id"]), chunk_index=int(row["chunk_index"]),
                shard=str(row["__shard"]), columns={c: row.get(c) for c in plan.embed.keep_columns},
                text=row.get("text"))
            for score, row in best]


def search(plan: Plan, files: VolumeFiles, query: str, *, k: int = 10,
           embed_query: QueryEmbedder | None = None, engine: str | None = None) -> SearchResult:
    """The `k` chunks (1 to MAX_K) of the run's current vectors nearest `query` (`embed_query` defaults to
    `query_embedder`)."""
    if plan.late is not None:
        return _search_late(plan, files, query, k)
    outputs = read_outputs(plan, files, "/")
    vector_files = finished_files(files, outputs.folders["embeddings"])
    if not vector_files:
        raise BackendError(f"{plan.name} has no finished embedding files in {files.where}/"
                           f"{outputs.folders['embeddings']}; run the spec first")
    if embed_query is None:
        embed_query, engine = query_embedder(plan)
    vector = _unit(embed_query(query))
    result = SearchResult(query=query, query_prefix=plan.embed.query_prefix, model=plan.model.ref,
                          engine=engine or "given", method="exact", scanned=0)
    table = index_table(files, outputs)
    if table is not None:
        return _search_table(plan, files, outputs, table, vector, k, result)
    if outputs.index is not None and not isinstance(files, LocalVolume):
        result.notes.append("the run's LanceDB table is on the Modal Volume, which only the app's containers "
                            "mount; this search is exact, over the vectors read through the SDK")
    chunk_files = {shard_id(e.path): e for e in finished_files(files, outputs.folders["chunks"])}
    groups = by_chunk_shard(vector_files, list(chunk_files))
    columns = [*KEYS, *plan.embed.keep_columns, "text"]
    with tempfile.TemporaryDirectory(prefix="volembed-search-") as scratch:
        reader = VolumeReader(files, Path(scratch), sum(e.size for e in vector_files), lambda done, total: None)
        paths = ((shard, reader.path(entry)) for shard, entries in sorted(groups.items()) for entry in entries)
        best, scanned = scan(paths, vector, k, columns, on_file=reader.release)
        rows = [row for _, row in best]
        if any("text" not in row for row in rows):
            _texts(reader, chunk_files, rows)
    remote = None if isinstance(files, LocalVolume) else files.where
    return replace(result, scanned=scanned, hits=_hits(plan, best), read_from=remote,
                   bytes_read=reader.read if remote else 0)


def _search_late(plan: Plan, files: VolumeFiles, query: str, k: int) -> SearchResult:
    """Top-k of a late-interaction run by MaxSim, through its token index (`stages/late.py`) on this machine."""
    if not isinstance(files, LocalVolume):
        raise BackendError(f"{plan.name}: searching a late-interaction run reads its token index on this machine "
                           f"(backend: local); this run's is on the Modal Volume {files.where}")
    from volembed_runner.stages import late

    (found,) = late.search(files.root, plan, [query], k=k)
    stats = store.read_json(store.marker_path(late.index_folder(files.root, plan)))
    hits = [Hit(score=h.score, doc_id=h.doc_id, chunk_index=h.chunk_index, shard=h.shard, columns=h.columns,
                text=h.snippet) for h in found]
    markers = plan.late.markers if plan.late else ()
    return SearchResult(query=query, query_prefix=markers[0] if markers else "", model=plan.model.ref,
                        engine="local engine (PyLate)", method="voyager", scanned=int(stats["token_vectors"]),
                        hits=hits, measure="MaxSim")


# ── the LanceDB table (output.index: lancedb) ─────────────────────────────────────────────────────────────────────
def index_table(files: VolumeFiles, outputs: Outputs) -> Path | None:
    """The run's finished LanceDB table on this machine, or None (no index stage, unfinished, or on Modal)."""
    if outputs.index is None or not isinstance(files, LocalVolume):
        return None
    table = files.root / PurePosixPath(outputs.index) / f"{TABLE}.lance"
    return table if store.is_done_folder(table) else None


def _search_table(plan: Plan, files: VolumeFiles, outputs: Outputs, table_dir: Path, vector: np.ndarray, k: int,
                  result: SearchResult) -> SearchResult:
    """Top-k through LanceDB: its ANN index where the table has one, else its own exact scan."""
    table = open_table(table_dir.parent)
    indexed = any(ix.columns == ["embedding"] for ix in table.list_indices())
    found = table.search(vector, vector_column_name="embedding").distance_type("cosine").limit(k).to_arrow()
    rows = found.drop_columns(["embedding"]).to_pylist()
    best = [(1.0 - float(row.pop("_distance")), {**row, "__shard": row.pop("shard")}) for row in rows]
    if any("text" not in row for _, row in best):
        chunk_files = {shard_id(e.path): e for e in finished_files(files, outputs.folders["chunks"])}
        with tempfile.TemporaryDirectory(prefix="volembed-search-") as scratch:
            _texts(VolumeReader(files, Path(scratch), 0, lambda done, total: None), chunk_files,
                   [row for _, row in best])
    return replace(result, method="lancedb ANN" if indexed else "lancedb", scanned=table.count_rows(),
                   hits=_hits(plan, best))
