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
# Voyager's HNSW settings: PyLate's defaults (pylate/indexes/voyager.py), recorded so the index fingerprint sees them.
INDEX_M = 64
INDEX_EF_CONSTRUCTION = 200
INDEX_EF_SEARCH = 200
# Token neighbours fetched per query token before MaxSim reranks the candidate chunks (PyLate's `k_token`).
K_TOKEN = 100


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
    fingerprint: str = ""  # of the index: the embeddings it is built from + its settings
