"""Tokens/s the TEI client sustains on one core against a loopback server that answers at once; prints, asserts nothing.

The server runs in its own process (pinned to another core where there is one) and sends precomputed 768-dim answers
in TEI's float format, so the figure is the client's cost: packing, JSON encoding, HTTP, orjson parsing, scattering
rows, and the vector checks every answer goes through. Also prints the parse rate of one such answer: stdlib json,
orjson, and orjson with those checks (the numbers-only byte scan, count, dimension, finite, unit norm).

    python benchmarks/bench_tei_client.py [--texts 16384]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection

import numpy as np
import orjson

from volembed_runner.embedders.tei import TEIClient
from volembed_runner.embedders.vectors import check_vectors, parse_vectors_json

DIM = 768
TOKENS_PER_TEXT = 512
CHARS_PER_TEXT = 2300  # about 512 tokens of English for a BERT WordPiece tokenizer
GOAL = 1_000_000  # tokens/s on one client core

# (name, max_client_batch_size, max_batch_tokens, max_concurrent_requests, payload_limit)
CONFIGS = [
    ("TEI defaults (32 texts, 16384 tokens, 512 permits, 2 MB)", 32, 16384, 512, 2_000_000),
    ("launch recipe (256 texts, 65536 tokens, 2048 permits, 8 MB)", 256, 65536, 2048, 8_000_000),
]


def vectors_json(n: int, seed: int = 0) -> bytes:
    """n unit vectors as TEI writes them: shortest float32 representations in a JSON list of lists."""
    vecs = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return orjson.dumps(vecs, option=orjson.OPT_SERIALIZE_NUMPY)


def make_texts(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    words = ["".join(chr(c) for c in rng.integers(97, 123, int(k))) for k in rng.integers(2, 10, 5000)]
    texts = []
    for i in range(n):
        picks = rng.integers(0, len(words), CHARS_PER_TEXT // 5)
        texts.append(f"{i} " + " ".join(words[j] for j in picks)[:CHARS_PER_TEXT])
    return texts


def serve(conn: Connection, max_batch: int, max_tokens: int, permits: int, core: int | None) -> None:
    """Answer /info and /embed with precomputed responses until the parent closes the pipe."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    info = orjson.dumps(
        {
            "model_id": "bench/bge-base",
            "max_client_batch_size": max_batch,
            "max_batch_tokens": max_tokens,
            "max_input_length": 512,
            "max_concurrent_requests": permits,
            "version": "1.9.3",
        }
    )
    answers: dict[int, bytes] = {}

    def answer(n: int) -> bytes:
        if n not in answers:
            body = vectors_json(n, seed=n)
            head = (
                f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-compute-tokens: {n * TOKENS_PER_TEXT}\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            )
            answers[n] = head.encode() + body
        return answers[n]

    for n in {max_batch, min(max_batch, max_tokens // TOKENS_PER_TEXT)}:
        answer(n)
    info_answer = f"HTTP/1.1 200 OK\r\ncontent-length: {len(info)}\r\n\r\n".encode() + info

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                if head.startswith(b"GET /info"):
                    writer.write(info_answer)
                else:
                    writer.write(answer(len(orjson.loads(body)["inputs"])))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        server.close()

    asyncio.run(main())


async def run_client(url: str, texts: list[str], payload_limit: int) -> tuple[float, float, int]:
    n_tokens = [TOKENS_PER_TEXT] * len(texts)
    async with TEIClient(url, payload_limit=payload_limit) as client:
        await client.embed(texts[:512], n_tokens[:512])
        warm_requests = client.stats.requests
        wall, cpu = time.perf_counter(), time.process_time()
        vectors = await client.embed(texts, n_tokens)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if vectors.shape != (len(texts), DIM):
        raise RuntimeError(f"unexpected result shape {vectors.shape}")
    return wall, cpu, client.stats.requests - warm_requests


def bench_client(texts: list[str]) -> None:
    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = (cores[0], cores[1]) if len(cores) > 1 else (None, None)
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
    print(f"client core: {client_core}, server core: {server_core} (of {len(cores)} available)")
    ctx = mp.get_context("spawn")
    for name, max_batch, max_tokens, permits, payload in CONFIGS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(child, max_batch, max_tokens, permits, server_core), daemon=True)
        proc.start()
        port = parent.recv()
        try:
            wall, cpu, requests = asyncio.run(run_client(f"http://127.0.0.1:{port}", texts, payload))
        finally:
            parent.send(None)
            proc.join(timeout=10)
        tokens = len(texts) * TOKENS_PER_TEXT
        rate = tokens / wall
        print(f"\n{name}")
        print(f"  {len(texts)} texts x {TOKENS_PER_TEXT} tokens -> {DIM}-dim, {requests} requests, {wall:.2f} s wall")
        print(f"  {rate:,.0f} tokens/s  ({rate / GOAL:.2f}x the 1M tokens/s goal)")
        print(f"  client CPU {cpu:.2f} s ({cpu / wall:.0%} of one core): {tokens / cpu:,.0f} tokens per CPU-second")


def parse_checked(body: bytes) -> np.ndarray:
    """What the client does with a 200 answer."""
    vectors = parse_vectors_json(body, source="bench", where="one answer")
    return check_vectors(vectors, rows=vectors.shape[0], dim=DIM, normalize=True, source="bench", where="one answer")


def bench_parse(n: int = 32, repeat: int = 20) -> None:
    body = vectors_json(n)
    print(f"\nparse one /embed answer: {n} x {DIM} floats, {len(body) / 1e6:.2f} MB")
    parsers = (
        ("json (stdlib) + numpy", lambda b: np.asarray(json.loads(b), dtype=np.float32)),
        ("orjson + numpy", lambda b: np.asarray(orjson.loads(b), dtype=np.float32)),
        ("orjson + numpy + checks", parse_checked),
    )
    bests = {}
    for label, parse in parsers:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            parse(body)
            best = min(best, time.perf_counter() - start)
        bests[label] = best
        rate = n * TOKENS_PER_TEXT / best
        mbs = len(body) / best / 1e6
        print(f"  {label:24s}: {mbs:6.1f} MB/s, {rate:,.0f} tokens/s ({rate / GOAL:.1f}x goal)")
    ratio = bests["orjson + numpy"] / bests["orjson + numpy + checks"]
    print(f"  with checks: {ratio:.2f}x the unchecked orjson + numpy rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=16384, help="texts of 512 tokens to embed per configuration")
    args = parser.parse_args()
    texts = make_texts(args.texts)
    bench_client(texts)
    bench_parse()


if __name__ == "__main__":
    main()
