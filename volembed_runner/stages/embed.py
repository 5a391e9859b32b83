"""Embed stage: one chunk shard → one embedding shard, through any embedder (local engine or a TEI server).

One code path, `embed_shard_async`; `embed_shard` runs it for an in-process engine. The output keeps the chunk
shard's row order and columns, adds `embedding` as fixed_size_list<float32>[dim], and is only marked done after its
row count matches the chunk shard's.
"""

from __future__ import annotations

import asyncio
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

BASE_COLUMNS = ("doc_id", "chunk_index", "char_start", "char_end", "n_tokens")


def paths(root: Path, plan: Plan, shard: str) -> tuple[Path, Path]:
    """The chunk shard read and the embedding shard written."""
    return (
        store.shard_path(store.chunks_dir(root, plan.name, plan.chunk.fingerprint), shard),
        store.shard_path(store.embeddings_dir(root, plan.name, plan.embed.fingerprint), shard),
    )


def _read_chunks(path: Path, shard: str) -> pa.Table:
    if not store.is_done(path):
        raise StageError(f"chunk shard {shard} is not finished ({path}); run the chunk stage first")
    return pq.read_table(path)


def _vectors_column(vectors: np.ndarray, rows: int, shard: str) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise StageError(f"embedding shard {shard}: got {vectors.shape[0] if vectors.ndim else 0} vectors "
                         f"for {rows} chunks; not written")
    if vectors.shape[1] < 1:
        raise StageError(f"embedding shard {shard}: the vectors' width is unknown or 0 (an empty shard of a model "
                         "the catalog does not know, or an engine answering empty vectors); not written")
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])


def _write(plan: Plan, chunks: pa.Table, vectors: np.ndarray, out: Path, shard: str,
           extra: dict[str, Any]) -> dict[str, Any]:
    column = _vectors_column(vectors, chunks.num_rows, shard)
    names = [*BASE_COLUMNS, *plan.embed.keep_columns, *(["text"] if plan.embed.include_text else [])]
    table = chunks.select(list(dict.fromkeys(names))).append_column("embedding", column)
    metadata = {b"volembed.model": plan.model.ref.encode(), b"volembed.fingerprint": plan.embed.fingerprint.encode()}
    table = table.replace_schema_metadata(metadata)

    def write(tmp: Path) -> dict[str, Any]:
        pq.write_table(table, tmp, compression="zstd")
        written = pq.ParquetFile(tmp).metadata.num_rows
        if written != chunks.num_rows:
            raise StageError(f"embedding shard {shard}: wrote {written} rows for {chunks.num_rows} chunks")
        return {"rows": written, "dim": int(column.type.list_size),
                "tokens": int(pc.sum(chunks["n_tokens"]).as_py() or 0), **extra}

    return store.write_shard(out, write)


def _run_dim(plan: Plan, folder: Path) -> int | None:
    """The run's vector width: the plan's when known before running, else that of a shard already written."""
    if plan.embed.dim is not None:
        return plan.embed.dim
    done = store.done_shards(folder)
    return int(store.read_marker(store.shard_path(folder, done[0]))["dim"]) if done else None


def _failed_chunk(chunks: pa.Table, shard: str, exc: TextsFailedError | VectorCheckError) -> StageError:
    """The engine's failure, naming the first chunk it concerns by document id and chunk index."""
    if not exc.indices:
        return StageError(f"embedding shard {shard}: {exc}")
    i = exc.indices[0]
    chunk = f"{chunks['doc_id'][i].as_py()}#{chunks['chunk_index'][i].as_py()}"
    return StageError(f"embedding shard {shard}: chunk {chunk}: {exc}")


async def embed_shard_async(root: Path, plan: Plan, shard: str, embedder: AsyncEmbedder) -> dict[str, Any]:
    """Embed one finished chunk shard into its embedding shard; several shards may share one embedder.

    The engines check every vector (count, width, finite, norm); here the width must also be the run's, so an
    embeddings folder never mixes widths, and a failure names the chunk. Nothing is written for a failed shard.
    """
    src, out = paths(root, plan, shard)
    chunks = _read_chunks(src, shard)
    texts = chunks["text"].to_pylist()
    n_tokens = chunks["n_tokens"].to_pylist()
    run_dim = _run_dim(plan, out.parent)
    try:
        vectors = await embedder.embed(texts, n_tokens) if texts else None
    except (TextsFailedError, VectorCheckError) as exc:
        raise _failed_chunk(chunks, shard, exc) from exc
    if vectors is None:
        vectors = np.zeros((0, int(run_dim or embedder.dim or 0)), dtype=np.float32)
    if run_dim is not None and vectors.shape[1] != run_dim:
        raise StageError(f"embedding shard {shard}: the engine answered {vectors.shape[1]}-dim vectors, the run's "
                         f"are {run_dim}-dim; not written (a changed server or model: check embedding.model)")
    return _write(plan, chunks, vectors, out, shard, {"truncated": embedder.truncations(n_tokens)})


def tei_client(plan: Plan, base_url: str, **limits: Any) -> TEIClient:
    """The TEI client for the plan: its prefix, normalization, dimensions, the run's width, the model it expects
    `/info` to name, and whether it may truncate. `limits` are the client's sizing (payload, requests in flight)."""
    e, model = plan.embed, plan.model
    return TEIClient(base_url=base_url, prefix=e.prefix, normalize=e.normalize, dimensions=e.dimensions, dim=e.dim,
                     expected_model=model.ref, expected_revision=model.revision, truncate=e.truncate,
                     input_overhead=e.input_overhead, **limits)


def embed_shard(root: Path, plan: Plan, shard: str, engine: Embedder) -> dict[str, Any]:
    """`embed_shard_async` for an in-process engine, from synchronous code."""
    return asyncio.run(embed_shard_async(root, plan, shard, InProcess(engine)))
