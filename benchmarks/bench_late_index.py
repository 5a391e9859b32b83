"""The token index in index shards: build rate, shards built and peak memory, one shard vs a tiny bound.

Writes synthetic embedding files (unit-norm float16 token vectors, 128-dim, 20-180 per chunk, as the demo ColBERT's
shards hold them) for a late-interaction plan, then runs the index stage (`stages.late.build_index`) in a fresh child
process per bound: the default one (the whole run in one shard) and `--shards` times smaller. Each child prints the
token vectors/s of the build, the shards it built, its peak RSS (resource.getrusage) and the RSS it had before the
build, so the growth per token vector can be compared with `late.index_bytes_per_token`. Asserts nothing.
Run: `python benchmarks/bench_late_index.py [--tokens 16000] [--shards 4]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SPEC = """\
version: 1
name: bench
volume: bench
dataset: {{files: [docs.jsonl]}}
chunking: {{size: 177}}
embedding: {{kind: late_interaction, model: volembed/colbert-minilm-demo}}
output:
  include_text: true
{extra}"""


def write_run(folder: Path, tokens: int, extra: str) -> Path:
    """A spec and synthetic embedding files of about `tokens` token vectors in 8 units."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from volembed_runner import store
    from volembed_runner.loading import load_spec
    from volembed_runner.plan import make_plan

    (folder / "docs.jsonl").write_text('{"text": "x"}\n')
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(extra=extra))
    plan = make_plan(load_spec(spec), spec)
    embed = store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint)
    embed.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_unit = tokens // 8
    for unit in range(8):
        counts: list[int] = []
        while sum(counts) < per_unit:
            counts.append(int(rng.integers(20, 181)))
        vectors = []
        for n in counts:
            v = rng.standard_normal((n, 128)).astype(np.float32)
            vectors.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        column, n_vectors = store.multivector_columns(vectors, 128)
        rows = len(counts)
        table = pa.table({"doc_id": [f"d{unit}-{i}" for i in range(rows)], "chunk_index": [0] * rows,
                          "char_start": [0] * rows, "char_end": [1] * rows, "n_tokens": counts,
                          "text": ["chunk text"] * rows, "embedding": column, "n_vectors": n_vectors})
        path = store.shard_path(embed, f"{unit:05d}")
        pq.write_table(table, path)
        store.mark_done(path, {"rows": rows})
    return spec


def child(spec: Path) -> None:
    """Build the index of `spec`'s run in this process and print its figures as JSON."""
    import pylate.indexes  # noqa: F401  (imported before the baseline, as the stage imports it)

    from volembed_runner.loading import load_spec
    from volembed_runner.plan import make_plan
    from volembed_runner.stages import late

    plan = make_plan(load_spec(spec), spec)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = late.build_index(plan.local_root(), plan)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({**stats, "rss_before": before, "rss_peak": peak,
                      "bytes_per_token_formula": plan.late.index_bytes_per_token if plan.late else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--child", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    bound = args.tokens // args.shards
    for label, extra in (("one shard (default bound)", ""),
                         (f"bound {bound:,}", f"  late: {{index_shard_tokens: {bound}}}\n")):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "VOLEMBED_HOME": str(Path(tmp) / "home")}
            os.environ["VOLEMBED_HOME"] = env["VOLEMBED_HOME"]
            spec = write_run(Path(tmp), args.tokens, extra)
            out = subprocess.run([sys.executable, __file__, "--child", str(spec)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            s = json.loads(out.strip().splitlines()[-1])
        growth = s["rss_peak"] - s["rss_before"]
        print(f"{label:28s} {s['token_vectors']:,} token vectors, {s['index_shards_built']} shard(s) built "
              f"(largest {s['largest_shard_tokens']:,}), {s['token_vectors'] / s['seconds']:,.0f} token vectors/s; "
              f"peak RSS {s['rss_peak'] / 2**20:,.0f} MiB, +{growth / 2**20:,.1f} MiB during the build "
              f"({growth / s['largest_shard_tokens']:,.0f} B per vector of the largest shard; formula "
              f"{s['bytes_per_token_formula']} B)")


if __name__ == "__main__":
    main()
