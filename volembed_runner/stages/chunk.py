"""Chunk stage: one downloaded shard → one chunk shard of token windows, cut with the embedding model's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from volembed_runner import chunking, models, store
from volembed_runner.errors import StageError
from volembed_runner.plan import Plan


def paths(root: Path, plan: Plan, shard: str) -> tuple[Path, Path]:
    """The source shard read and the chunk shard written."""
    return (
        store.shard_path(store.data_dir(root, plan.data.fingerprint), shard),
        store.shard_path(store.chunks_dir(root, plan.name, plan.chunk.fingerprint), shard),
    )


def run_shard(root: Path, plan: Plan, shard: str, max_rows: int | None = None) -> dict[str, Any]:
    """Chunk the first `max_rows` documents (all when None) of one shard; a finished shard is left as it is."""
    src, out = paths(root, plan, shard)
    if store.is_done(out):
        return store.read_marker(out)
    if not store.is_done(src):
        raise StageError(f"source shard {shard} is not downloaded ({src}); run the download stage first")
    tokenizer = models.tokenizer_file(plan.chunk.model, plan.chunk.revision)
    return chunking.chunk_shard(
        src,
        out,
        tokenizer_path=tokenizer,
        size=plan.chunk.size,
        overlap=plan.chunk.overlap,
        keep_columns=list(plan.chunk.keep_columns),
        max_rows=max_rows,
    )
