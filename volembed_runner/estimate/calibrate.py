"""`volembed-run calibrate`: measure tokens/s on the plan's backend over a sample of the job's own chunks, and store
it where the dry run reads rates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from volembed_runner import chunking, sources
from volembed_runner.errors import BackendError, SourceError, SpecError, SpecIssue
from volembed_runner.estimate.rates import calibration_key, local_device_key, store_calibration
from volembed_runner.estimate.sampling import CountingTokenizer, added_tokens, counting_tokenizer
from volembed_runner.estimate.sizes import text_readers
from volembed_runner.plan import Plan, volembed_home


def calibrate(plan: Plan, *, sample_chunks: int = 256,
              runner: Callable[[list[str], list[int]], float] | None = None) -> dict[str, Any]:
    """Measure tokens/s on the plan's backend over a small sample of the job's own chunks and store it.

    Local: embeds the chunks with the in-process engine (model load timed separately). Modal: needs Modal
    credentials, so only an injected `runner(texts, n_tokens) -> seconds` can measure it here.
    """
    if sample_chunks < 1:
        raise SpecError([SpecIssue("", "--chunks", f"must be at least 1, got {sample_chunks}")])
    if plan.backend == "modal" and runner is None:
        raise BackendError("calibrate on modal needs Modal credentials (run it where `modal token` is set up)")
    if plan.backend == "local" and plan.embed.engine != "local" and runner is None:
        raise BackendError("calibrate measures the local engine; this spec embeds through embedding.endpoint")
    tok = counting_tokenizer(plan)
    if tok is None:
        raise BackendError(f"calibrate needs {plan.model.ref}'s tokenizer on this machine to cut sample chunks")
    texts, n_tokens = job_chunks(plan, tok, sample_chunks)
    processed = sum(n_tokens) + len(texts) * sum(added_tokens(plan))
    load_seconds = None
    if runner is None:
        from volembed_runner.embedders.local import LocalEmbedder

        e, model = plan.embed, plan.model
        t0 = time.perf_counter()
        engine = LocalEmbedder(model=model.location, revision=model.revision, prefix=e.prefix, normalize=e.normalize,
                               precision=e.precision, dimensions=e.dimensions, threads=plan.machine.cores,
                               cache_dir=volembed_home() / "openvino", device=plan.machine.device)
        load_seconds = time.perf_counter() - t0
        engine.embed(texts[:8], n_tokens[:8])
        t0 = time.perf_counter()
        engine.embed(texts, n_tokens)
        seconds = time.perf_counter() - t0
        backend, device, engine_name = "local", local_device_key(plan.machine.device, engine.precision), "local"
    else:
        seconds = float(runner(texts, n_tokens))
        backend = plan.backend
        device = plan.compute.gpu if backend == "modal" else plan.embed.precision
        engine_name = plan.embed.engine
    if seconds <= 0:
        raise BackendError(f"calibration measured {seconds} s for {len(texts)} chunks; cannot derive a rate")
    entry = {
        "key": calibration_key(backend, plan.model.ref, device, engine_name),
        "backend": backend,
        "model": plan.model.ref,
        "device": device,
        "engine": engine_name,
        "tokens_per_second": processed / seconds,
        "seconds": seconds,
        "chunks": len(texts),
        "chunk_tokens": sum(n_tokens),
        "processed_tokens": processed,
        "chunk_size": plan.chunk.size,
        "cores": plan.machine.cores,
        "model_load_seconds": load_seconds,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    entry["path"] = str(store_calibration(entry))
    return entry


def job_chunks(plan: Plan, tok: CountingTokenizer, want: int) -> tuple[list[str], list[int]]:
    """The first `want` chunks of the job (its first documents, cut by the real chunker)."""
    if plan.data.kind != "files":
        raise BackendError("calibrate samples the job's documents from local files; for a Hub dataset, run it on a "
                           "spec with dataset.files pointing at a few of its parquet files")
    tasks = sources.list_tasks(plan.data)
    readers = text_readers(sources.Shape.of(plan.data), tasks, [None] * len(tasks))
    batches = (b for reader in readers for b in reader)
    texts: list[str] = []
    n_tokens: list[int] = []
    for batch in islice(batches, 10_000):
        cols = chunking.chunk_texts(tok.tok, batch, plan.chunk.size, plan.chunk.overlap)
        texts.extend(cols.text)
        n_tokens.extend(cols.n_tokens)
        if len(texts) >= want:
            break
    if not texts:
        raise SourceError("calibrate found no text to embed in the dataset")
    return texts[:want], n_tokens[:want]

