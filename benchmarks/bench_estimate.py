"""Print how fast and how right the dry run is (prints figures, asserts nothing).

1. The dry run's own duration on a spec with size hints (goal <= 5 s), imports included, with every network
   connection refused and counted (goal: none attempted).
2. If the local backend exists: calibrate on a small local job, estimate it, run it, and print estimated vs measured
   wall time (goal within ±25%) and estimated vs produced documents, chunks and tokens.

    python benchmarks/bench_estimate.py [--docs 600] [--chunks 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WIKIPEDIA = """\
version: 1
name: bench-wikipedia
backend: modal
volume: bench
dataset:
  hf: wikimedia/wikipedia
  config: 20231101.en
  num_rows: 6458670
  num_bytes: 19560538957
  shard_rows: 20000
chunking: {size: 510, overlap: 0}
embedding: {model: BAAI/bge-base-en-v1.5}
compute: {gpu: A10G, concurrency_limit: 50, allow_concurrent_inputs: 4}
"""


def refuse_network() -> list[Any]:
    """Make every socket connection fail, recording where it tried to go."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network refused by bench_estimate")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    return attempts


def bench_dry_run(folder: Path) -> None:
    """Time load → plan → estimate → render of a hinted spec in this (fresh) process, imports included."""
    os.environ.pop("HF_HUB_OFFLINE", None)  # the hinted spec must avoid the network by itself, not by this flag
    attempts = refuse_network()
    spec = folder / "wikipedia.yaml"
    spec.write_text(WIKIPEDIA, encoding="utf-8")
    started = time.perf_counter()
    from rich.console import Console

    from volembed_runner import estimate
    from volembed_runner.cli import _load
    from volembed_runner.ui.estimate import render

    imported = time.perf_counter()
    est = estimate.estimate(_load(spec, None))
    render(est, Console(file=io.StringIO(), width=120))
    done = time.perf_counter()
    print("dry run on a spec with size hints (English Wikipedia, bge-base, 50 x A10):")
    print(f"  total {done - started:.2f} s (imports {imported - started:.2f} s, estimate+render "
          f"{done - imported:.2f} s)   goal <= 5 s")
    print(f"  network connections attempted: {len(attempts)}   goal 0")
    embed = next(s for s in est.stages if s.name == "embed")
    print(f"  figures: {est.documents:,} documents, {est.tokens:,} tokens, {est.chunks:,} chunks, "
          f"{est.embedded_tokens:,} chunk tokens; embed {embed.seconds / 60:.1f} min on {est.effective_gpus} GPUs, "
          f"wall {est.wall_seconds / 60:.1f} min, {est.gpu_hours:.1f} GPU-h, ${est.cost_usd:,.2f}")


def cli(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "volembed_runner", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    return time.perf_counter() - started, proc


def bench_local(folder: Path, docs: int, chunks: int) -> None:
    """Calibrate, estimate and run a small local job (the demo spec, first `docs` documents)."""
    if importlib.util.find_spec("volembed_runner.backends.local") is None:
        print("local backend not installed: skipping estimated-vs-measured")
        return
    env = {**os.environ, "VOLEMBED_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1"}
    sets = ["--set", f"dataset.limit={docs}", "--set", "volume=bench-estimate", "--set", "name=bench-estimate"]
    spec = str(REPO / "pipelines" / "local-demo.yaml")
    seconds, proc = cli(["calibrate", spec, *sets, "--chunks", str(chunks), "--json"], env)
    if proc.returncode != 0:
        print(f"calibrate failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return
    entry = json.loads(proc.stdout)
    print(f"calibrate: {entry['tokens_per_second']:,.0f} tokens/s ({entry['device']}, {entry['chunks']} chunks, "
          f"model load {entry['model_load_seconds']:.1f} s) in {seconds:.1f} s")
    seconds, proc = cli([spec, *sets, "--dry-run", "--json"], env)
    if proc.returncode != 0:
        print(f"dry run failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return
    est = json.loads(proc.stdout)
    per_stage = ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in est["stages"])
    print(f"estimate (took {seconds:.1f} s): {est['documents']:,} documents, {est['chunks']:,} chunks, "
          f"{est['embedded_tokens']:,} chunk tokens, wall {est['wall_seconds']:.1f} s ({per_stage})")
    seconds, proc = cli([spec, *sets, "--json"], env)
    if proc.returncode != 0:
        print(f"local run failed (exit {proc.returncode}) after {seconds:.1f} s: {proc.stderr.strip()[-500:]}")
        return
    run = json.loads(proc.stdout)
    ratio = est["wall_seconds"] / seconds if seconds else float("nan")
    print(f"local run: {seconds:.1f} s measured (command wall, {run.get('seconds')} s inside the run) vs "
          f"{est['wall_seconds']:.1f} s estimated: estimate/measured = {ratio:.2f}   goal 0.75-1.25")
    for key, produced in (("documents", run.get("documents")), ("chunks", run.get("chunks")),
                          ("embedded_tokens", run.get("tokens"))):
        if produced:
            print(f"  {key}: estimated {est[key]:,} vs produced {produced:,} ({est[key] / produced - 1:+.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=600, help="documents of the local job")
    parser.add_argument("--chunks", type=int, default=128, help="chunks embedded by calibrate")
    parser.add_argument("--only", choices=["dry-run", "local"], help="run one part")
    parser.add_argument("--dry-run-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.dry_run_child:
            bench_dry_run(folder)
            return
        if args.only in (None, "dry-run"):
            # A fresh interpreter, so the imports are counted as a user's `volembed-run --dry-run` pays them.
            subprocess.run([sys.executable, __file__, "--dry-run-child"], cwd=REPO, check=False)
        if args.only in (None, "local"):
            bench_local(folder, args.docs, args.chunks)


if __name__ == "__main__":
    main()
