"""Embed stage: one unit (a chunk shard, or a range of its rows: `units.py`) → one embedding file, through any
embedder (local engine or a TEI server).

One code path, `embed_shard_async`; `embed_shard` runs it for an in-process engine. The output keeps the unit's row
order and columns, adds `embedding` as fixed_size_list<float32>[dim], and is only marked done after its row count
matches the unit's. A chunk shard's embeddings are the done files of its units, in row order.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from volembed_runner import store
from volembed_runner.embedders import AsyncEmbedder, Embedder, InProcess
from volembed_runner.embedders.tei import TEIClient
from volembed_runner.errors import StageError, TextsFailedError, VectorCheckError
from volembed_runner.plan import Plan
from volembed_runner.units import parse_key, unit_of

_CALL_INDEX = re.compile(r"\btexts? \d+(?:, \d+)*(?:, …)?(?: \(\d+ texts\))?")
BASE_COLUMNS = ("doc_id", "chunk_index", "char_start", "char_end", "n_tokens")


def paths(root: Path, plan: Plan, unit: str) -> tuple[Path, Path]:
    """The chunk shard a unit reads and the embedding file it writes."""
    shard = parse_key(unit)[0]
    return (
        store.shard_path(store.chunks_dir(root, plan.name, plan.chunk.fingerprint), shard),
        store.shard_path(store.embeddings_dir(root, plan.name, plan.embed.fingerprint), unit),
    )


def read_chunks(path: Path, unit: str) -> pa.Table:
    """The unit's rows of its chunk shard, reading only the row groups that hold them."""
    if not store.is_done(path):
        raise StageError(f"chunk shard {parse_key(unit)[0]} is not finished ({path}); run the chunk stage first")
    try:
        rows = unit_of(unit, pq.read_metadata(path).num_rows)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    return store.read_rows(path, rows.start, rows.end)


def _vectors_column(vectors: np.ndarray, rows: int, unit: str) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise StageError(f"embedding unit {unit}: got {vectors.shape[0] if vectors.ndim else 0} vectors "
                         f"for {rows} chunks; not written")
    if vectors.shape[1] < 1:
        raise StageError(f"embedding unit {unit}: the vectors' width is unknown or 0 (an empty shard of a model "
                         "the catalog does not know, or an engine answering empty vectors); not written")
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])


def _write(plan: Plan, chunks: pa.Table, vectors: np.ndarray, out: Path, unit: str,
           extra: dict[str, Any]) -> dict[str, Any]:
    column = _vectors_column(vectors, chunks.num_rows, unit)
    return write_unit_file(plan, chunks, {"embedding": column}, out, unit,
                           {"dim": int(column.type.list_size), **extra})


def _write_late(plan: Plan, chunks: pa.Table, vectors: list[np.ndarray], out: Path, unit: str,
                extra: dict[str, Any]) -> dict[str, Any]:
    """Write one unit's token vectors (late interaction: one entry per chunk, in row order) and mark it done."""
    if len(vectors) != chunks.num_rows:
        raise StageError(f"embedding unit {unit}: got token vectors for {len(vectors)} of {chunks.num_rows} chunks; "
                         "not written")
    dim = plan.embed.dim or (int(vectors[0].shape[1]) if vectors else 0)
    if dim < 1:
        raise StageError(f"embedding unit {unit}: the vectors' width is unknown; not written")
    wrong = next((i for i, v in enumerate(vectors) if v.ndim != 2 or v.shape[1] != dim), None)
    if wrong is not None:
        raise StageError(f"embedding unit {unit}: chunk {wrong} has vectors of shape {vectors[wrong].shape}, the "
                         f"run's are {dim}-dim; not written")
    column, counts = store.multivector_columns(vectors, dim)
    return write_unit_file(plan, chunks, {"n_vectors": counts, "embedding": column}, out, unit,
                           {"dim": dim, "vectors_total": int(pc.sum(counts).as_py() or 0), **extra},
                           {b"volembed.kind": b"late_interaction"})


def write_unit_file(plan: Plan, chunks: pa.Table, columns: dict[str, pa.Array], out: Path, unit: str,
                    stats: dict[str, Any], metadata: dict[bytes, bytes] | None = None) -> dict[str, Any]:
    """Write a unit's embedding file: its chunks' ids, kept columns (and text) plus `columns`, then mark it done."""
    names = [*BASE_COLUMNS, *plan.embed.keep_columns, *(["text"] if plan.embed.include_text else [])]
    table = chunks.select(list(dict.fromkeys(names)))
    for name, column in columns.items():
        table = table.append_column(name, column)
    table = table.replace_schema_metadata({b"volembed.model": plan.model.ref.encode(),
                                           b"volembed.fingerprint": plan.embed.fingerprint.encode(),
                                           **(metadata or {})})

    def write(tmp: Path) -> dict[str, Any]:
        pq.write_table(table, tmp, compression="zstd")
        written = pq.ParquetFile(tmp).metadata.num_rows
        if written != chunks.num_rows:
            raise StageError(f"embedding unit {unit}: wrote {written} rows for {chunks.num_rows} chunks")
        return {"rows": written, "tokens": int(pc.sum(chunks["n_tokens"]).as_py() or 0), **stats}

    return store.write_shard(out, write)


def _run_dim(plan: Plan, folder: Path) -> int | None:
    """The run's vector width: the plan's when known before running, else that of a shard already written."""
    if plan.embed.dim is not None:
        return plan.embed.dim
    done = store.done_shards(folder)
    return int(store.read_marker(store.shard_path(folder, done[0]))["dim"]) if done else None


def _failed_chunk(chunks: pa.Table, unit: str, exc: TextsFailedError | VectorCheckError) -> StageError:
    """The engine's failure, naming the first chunk it concerns by document id and chunk index."""
    if not exc.indices:
        return StageError(f"embedding unit {unit}: {exc}")
    i, n = exc.indices[0], len(exc.indices)
    where = f"document {chunks['doc_id'][i].as_py()!r} chunk {chunks['chunk_index'][i].as_py()}"
    more = f" (and {n - 1} more chunk(s))" if n > 1 else ""
    # the engine counts texts within its call ("text 19"); the user knows documents
    message = _CALL_INDEX.sub("it" if n == 1 else "them", str(exc))
    return StageError(f"embedding unit {unit}: {where}{more}: {message}")


async def embed_shard_async(root: Path, plan: Plan, unit: str, embedder: AsyncEmbedder) -> dict[str, Any]:
    """Embed one unit of a finished chunk shard into its embedding file; several units may share one embedder.

    The engines check every vector (count, width, finite, norm); here the width must also be the run's, so an
    embeddings folder never mixes widths, and a failure names the chunk. Nothing is written for a failed shard.
    """
    src, out = paths(root, plan, unit)
    chunks = read_chunks(src, unit)
    texts = chunks["text"].to_pylist()
    n_tokens = chunks["n_tokens"].to_pylist()
    run_dim = _run_dim(plan, out.parent)
    try:
        vectors = await embedder.embed(texts, n_tokens) if texts else None
    except (TextsFailedError, VectorCheckError) as exc:
        raise _failed_chunk(chunks, unit, exc) from exc
    if plan.late is not None:  # per-token vectors: the late-interaction layout
        return _write_late(plan, chunks, list(vectors or []), out, unit, {"truncated": embedder.truncations(n_tokens)})
    if vectors is None:
        vectors = np.zeros((0, int(run_dim or embedder.dim or 0)), dtype=np.float32)
    if run_dim is not None and vectors.shape[1] != run_dim:
        raise StageError(f"embedding unit {unit}: the engine answered {vectors.shape[1]}-dim vectors, the run's "
                         f"are {run_dim}-dim; not written (a changed server or model: check embedding.model)")
    return _write(plan, chunks, vectors, out, unit, {"truncated": embedder.truncations(n_tokens)})


def tei_client(plan: Plan, base_url: str, **limits: Any) -> TEIClient:
    """The TEI client for the plan: its prefix, normalization, dimensions, the run's width, the model it expects
    `/info` to name, and whether it may truncate. `limits` are the client's sizing (payload, requests in flight)."""
    e, model = plan.embed, plan.model
    return TEIClient(base_url=base_url, prefix=e.prefix, normalize=e.normalize, dimensions=e.dimensions, dim=e.dim,
                     expected_model=model.ref, expected_revision=model.revision, truncate=e.truncate,
                     input_overhead=e.input_overhead, **limits)


def embed_shard(root: Path, plan: Plan, unit: str, engine: Embedder) -> dict[str, Any]:
    """`embed_shard_async` for an in-process engine, from synchronous code."""
    return asyncio.run(embed_shard_async(root, plan, unit, InProcess(engine)))
