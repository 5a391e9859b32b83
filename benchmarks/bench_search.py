"""Exact search's memory and speed over embedding files (prints figures, asserts nothing).

Files: `--files` parquet files of `--rows` random unit vectors each (384-dim float32, as the embed stage writes
them: doc_id, chunk_index, embedding as fixed_size_list, zstd). Each measurement runs in a fresh subprocess.

(a) peak RSS of `search.scan` (record batches + a top-k heap) over 1 file vs over all `--files` files — goal <= 1.1:
    memory does not grow with the run's size.
(b) its time vs the baseline of reading every file into one matrix (`pq.read_table`, numpy) and `argpartition` —
    scan / baseline, goal <= 1.5; the baseline's peak RSS is printed beside it.

    python benchmarks/bench_search.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIM = 384
K = 10


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_files(folder: Path, files: int, rows: int) -> list[Path]:
    """Random unit vectors in files laid out as embedding shards."""
    rng = np.random.default_rng(0)
    paths = []
    for f in range(files):
        v = rng.normal(size=(rows, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        column = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM)
        table = pa.table({"doc_id": [f"{f}:{i}" for i in range(rows)], "chunk_index": pa.array([0] * rows, pa.int32()),
                          "embedding": column})
        path = folder / f"shard-{f:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        paths.append(path)
    return paths


def child(mode: str, paths: list[str]) -> None:
    """One measurement: the scan or the baseline, with its time and peak RSS."""
    from volembed_runner.search import scan

    query = np.random.default_rng(1).normal(size=DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    before = peak_rss_mib()
    started = time.perf_counter()
    if mode == "scan":
        best, rows = scan(((f"{i:05d}", Path(p)) for i, p in enumerate(paths)), query, K, ["doc_id", "chunk_index"])
        top = [row["doc_id"] for _, row in best]
    else:
        table = pq.read_table(paths, columns=["doc_id", "embedding"])
        matrix = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
        scores = matrix @ query
        order = np.argpartition(-scores, K)[:K]
        order = order[np.argsort(-scores[order])]
        top, rows = [table["doc_id"][int(i)].as_py() for i in order], len(scores)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss_start_mib": before, "rss_peak_mib": peak_rss_mib(), "rows": rows,
                      "top": top}))


def measure(mode: str, paths: list[Path]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, *map(str, paths)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_files(Path(scratch), args.files, args.rows)
        size = sum(p.stat().st_size for p in paths) / 2**20
        one, every, base = measure("scan", paths[:1]), measure("scan", paths), measure("baseline", paths)
    assert every["top"] == base["top"], "scan and baseline disagree"
    print(f"{args.files} files × {args.rows:,} vectors ({DIM}-dim), {size:,.0f} MiB of parquet")
    grow = (one["rss_peak_mib"], every["rss_peak_mib"])
    print(f"(a) peak RSS scan, 1 file vs {args.files}: {grow[0]:,.0f} vs {grow[1]:,.0f} MiB -> ratio "
          f"{grow[1] / grow[0]:.2f} (goal <= 1.1)")
    print(f"(b) scan {every['seconds']:.2f} s vs read-all + matmul {base['seconds']:.2f} s -> ratio "
          f"{every['seconds'] / base['seconds']:.2f} (goal <= 1.5); baseline peak RSS {base['rss_peak_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
