"""Late interaction (ColBERT) facts the plan, the renderer and the stages share, with no torch or PyLate import.

The engine (`embedders/colbert.py`) and the index and search over its token vectors (`stages/late.py`) run PyLate;
this module only names the kind, the pinned PyLate release and the index settings, so the core package can plan,
estimate and render a late-interaction job without the `late` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass

LATE = "late_interaction"
PYLATE_VERSION = "1.6.0"  # the release the engine is tested against, here and in the Modal GPU image
VOYAGER_VERSION = "2.1.0"  # PyLate's HNSW token index (`pylate.indexes.Voyager`)
INDEX_KIND = "voyager"
DEFAULT_LATE_DIM = 128  # token vector width assumed for a ColBERT model the catalog does not know
# Voyager's HNSW settings: PyLate's defaults (pylate/indexes/voyager.py), recorded so the index fingerprint sees them.
INDEX_M = 64
INDEX_EF_CONSTRUCTION = 200
INDEX_EF_SEARCH = 200
# Token neighbours fetched per query token before MaxSim reranks the candidate chunks (PyLate's `k_token`).
K_TOKEN = 100

# The token index is built in index shards, each one Voyager index over consecutive chunks holding at most
# `index_shard_tokens` token vectors, so only one shard is in RAM while building or searching. Bytes a token vector
# costs a shard in RAM: its float32 copy (dim x 4) + its HNSW links on the base layer (M x 2 neighbours x 4 bytes)
# + INDEX_OVERHEAD_BYTES (Voyager's per-element bookkeeping and PyLate's id maps, pickled whole at every add).
# benchmarks/bench_late_index.py measured ~955 B of peak RSS per 128-dim vector (one 40,710-vector shard against
# shards of <= 10,000: 73.8 vs 45.8 MiB of growth); the formula's 1,424 B keeps a margin above that.
INDEX_OVERHEAD_BYTES = 400
# The share of the index container's memory one shard may take; the rest holds Python, torch, PyLate and the batch
# of embedding rows being read.
INDEX_MEMORY_SHARE = 0.5


def index_bytes_per_token(dim: int, m: int = INDEX_M) -> int:
    """RAM one token vector costs an index shard: dim x 4 + M x 2 x 4 + INDEX_OVERHEAD_BYTES."""
    return dim * 4 + m * 2 * 4 + INDEX_OVERHEAD_BYTES


def max_index_shard_tokens(memory_mib: int, dim: int, m: int = INDEX_M) -> int:
    """The most token vectors one index shard may hold in `memory_mib` of container memory (INDEX_MEMORY_SHARE)."""
    return int(memory_mib * 2**20 * INDEX_MEMORY_SHARE) // index_bytes_per_token(dim, m)


@dataclass(frozen=True)
class LateSettings:
    """A late-interaction run's resolved facts: the query side of the model and the index over the token vectors."""

    query_length: int | None  # tokens a query is padded/cut to (the catalog's), None: the model folder's own
    markers: tuple[str, ...]  # the query and document marker tokens, as the catalog records them
    build_base: str | None  # the demo: the packaged model PyLate builds the ColBERT from, else None
    build_seed: int | None
    index: str  # "voyager"
    index_m: int
    index_ef_construction: int
    index_ef_search: int
    k_token: int
    index_shard_tokens: int = 0  # the most token vectors one index shard holds (spec or derived from memory)
    index_bytes_per_token: int = 0  # RAM per token vector in a shard (`index_bytes_per_token`)
    index_memory_mib: int = 0  # the index container's memory the bound is derived from
    index_shard_source: str = ""  # where index_shard_tokens came from
    fingerprint: str = ""  # of the index: the embeddings it is built from + its settings
