"""`volembed-run calibrate`: measure tokens/s on the plan's backend over a sample of the job's own chunks, and store
it where the dry run reads rates.

On Modal the measurement is the GPU probe: the job's own Embedder (its TEI image for the GPU's architecture, weights
baked in) runs once on the sample, on the spec's GPU and on any other GPU asked for (`probe_gpus`). Its cost is
priced before it starts (`cost.probe_cost`) and confirmed under the run's rules; the backend's runner is passed in
(`probe=`), so this module stays below the backends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from volembed_runner import batching, chunking, sources
from volembed_runner.errors import BackendError, SourceError, SpecError, SpecIssue, VolembedError, describe
from volembed_runner.estimate.cost import PROBE_RETRIES, ProbeCost, probe_cost, probe_timeout
from volembed_runner.estimate.prices import Prices
from volembed_runner.estimate.rates import (
    calibration_key,
    local_device_key,
    quality_threshold,
    store_calibration,
    tei_rate,
)
from volembed_runner.estimate.sampling import CountingTokenizer, added_tokens, counting_tokenizer
from volembed_runner.estimate.sizes import text_readers
from volembed_runner.models import weights_fingerprint
from volembed_runner.plan import Plan, openvino_cache, volembed_home

PROBE_VECTORS = 16  # vectors the GPU probe sends back, of the sample's first chunks


@dataclass(frozen=True)
class ProbeLimits:
    """The probe call's own timeout and retries, as priced (`cost.probe_cost`)."""

    timeout_s: int
    retries: int


# A GPU probe: (plan, texts, token counts, vectors to keep, its call's limits) -> its result
# (`backends.modal.launch.probe`).
Probe = Callable[[Plan, list[str], list[int], int, ProbeLimits], dict[str, Any]]


@dataclass(frozen=True)
class Sample:
    """The job's first chunks, cut by the real chunker, and the tokens a GPU processes for them."""

    texts: list[str]
    n_tokens: list[int]
    processed: int  # chunk tokens + special and prefix tokens per chunk


def sample_of(plan: Plan, sample_chunks: int) -> Sample:
    """The first `sample_chunks` chunks of the job (SpecError for a count under 1)."""
    if sample_chunks < 1:
        raise SpecError([SpecIssue("", "--chunks", f"must be at least 1, got {sample_chunks}")])
    tok = counting_tokenizer(plan)
    if tok is None:
        raise BackendError(f"calibrate needs {plan.model.ref}'s tokenizer on this machine to cut sample chunks")
    texts, n_tokens = job_chunks(plan, tok, sample_chunks)
    return Sample(texts, n_tokens, sum(n_tokens) + len(texts) * sum(added_tokens(plan)))


def calibrate(plan: Plan, *, sample_chunks: int = 256,
              runner: Callable[[list[str], list[int]], float] | None = None,
              probe: Probe | None = None, sample: Sample | None = None,
              limits: ProbeLimits | None = None, clock: Callable[[], float] | None = None) -> dict[str, Any]:
    """Measure tokens/s on the plan's backend over a small sample of the job's own chunks and store it.

    Local: embeds the chunks with the in-process engine (model load timed separately) at each candidate batch
    budget (`batch_sweep`), and the rate is the fastest one's. Modal: runs the GPU `probe` (or an injected
    `runner(texts, n_tokens) -> seconds`) under `limits` (by default those `cost.probe_cost` prices at the dry run's
    rate). `clock` times it (time.perf_counter).
    """
    clock = clock or time.perf_counter
    if plan.backend == "modal" and runner is None and probe is None:
        raise BackendError("calibrate on modal needs Modal credentials (run it where `modal token` is set up)")
    if plan.backend == "local" and plan.embed.engine != "local" and runner is None:
        raise BackendError("calibrate measures the local engine; this spec embeds through embedding.endpoint")
    sample = sample or sample_of(plan, sample_chunks)
    texts, n_tokens, processed = sample.texts, sample.n_tokens, sample.processed
    load_seconds = None
    extra: dict[str, Any] = {}
    if plan.backend == "modal" and runner is None and probe is not None:
        if limits is None:
            limits = ProbeLimits(probe_timeout(processed, tei_rate(plan.model.ref, plan.compute.gpu)), PROBE_RETRIES)
        result = probe(plan, texts, n_tokens, PROBE_VECTORS, limits)
        seconds = float(result["seconds"])
        inside = float(result.get("router_start_seconds") or 0) + float(result.get("warmup_seconds") or 0) + seconds
        extra = {"probe": True, "image": result.get("image"), "timeout_s": limits.timeout_s,
                 "retries": limits.retries,
                 "warmup_seconds": result.get("warmup_seconds"), "model_load_seconds": None,
                 "router_start_seconds": result.get("router_start_seconds"),
                 "cold_start_seconds": None if result.get("call_seconds") is None
                 else max(0.0, float(result["call_seconds"]) - inside)}
        extra["quality"] = quality(plan, texts[:PROBE_VECTORS], n_tokens[:PROBE_VECTORS], result.get("vectors"))
        backend, device, engine_name = "modal", plan.compute.gpu, "tei"
    elif runner is None:
        from volembed_runner.embedders.local import LocalEmbedder

        e, model = plan.embed, plan.model
        t0 = clock()
        engine = LocalEmbedder(model=model.location, revision=model.revision, prefix=e.prefix, normalize=e.normalize,
                               precision=e.precision, dimensions=e.dimensions, batch_tokens=e.batch_tokens,
                               max_batch_size=e.batch_texts, threads=plan.machine.cores, runtime=e.runtime or "auto",
                               cache_dir=openvino_cache(), device=plan.machine.device)
        load_seconds = clock() - t0
        engine.embed(texts[:8], n_tokens[:8])
        if e.runtime:  # the dense engine: its batch budget is measured here, and the rate at the fastest
            extra = {"batch": batch_sweep(engine, texts, n_tokens, processed=processed, clock=clock)}
            seconds = extra["batch"]["seconds"][str(extra["batch"]["batch_tokens"])]
        else:
            t0 = clock()
            engine.embed(texts, n_tokens)
            seconds = clock() - t0
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
        **extra,
    }
    entry["path"] = str(store_calibration(entry))
    return entry


@dataclass(frozen=True)
class ProbeSpend:
    """The GPU probe's price over every GPU type it runs on (what `run.check_spend` weighs)."""

    costs: list[ProbeCost]

    @property
    def cost_usd(self) -> float | None:
        """The expected total; None when a price is unknown."""
        values = [c.cost_usd for c in self.costs]
        return None if any(v is None for v in values) else float(sum(v or 0.0 for v in values))


def batch_sweep(engine: Any, texts: list[str], n_tokens: list[int], *, processed: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time the local engine on the sample at each candidate batch budget (catalog `local.batch`), store the fastest
    for this machine's key (weights, runtime, precision, device, threads) beside the calibrations, and leave the
    engine on it; returns the stored entry (`processed`: the tokens the model sees for the sample, its rate's)."""
    def run(tokens: int) -> None:
        engine.batch_tokens, engine.max_batch_size = tokens, batching.texts_for(tokens, engine.device)
        engine.embed(texts, n_tokens)

    result = batching.sweep(run, batching.candidates(engine.device), clock=clock)
    engine.batch_tokens, engine.max_batch_size = result.best, batching.texts_for(result.best, engine.device)
    key = batching.budget_key(weights_fingerprint(Path(engine.path)), engine.runtime, engine.precision, engine.device,
                              engine.threads)
    return batching.store_sweep(volembed_home(), key, result, device=engine.device, chunks=len(texts),
                                tokens=processed)


def reference_vectors(plan: Plan, texts: list[str], n_tokens: list[int]) -> tuple[Any, str]:
    """The reference library's vectors for `texts`: sentence-transformers in fp32 through the local engine, where
    it and the model resolve on this machine (ImportError, OSError or VolembedError where they do not)."""
    import importlib.metadata

    from volembed_runner.embedders.local import LocalEmbedder

    e, model = plan.embed, plan.model
    # The model as this machine finds it (a package or the Hub cache), not the image's copy a Modal plan names.
    engine = LocalEmbedder(model=model.ref, revision=model.revision, prefix=e.prefix, normalize=e.normalize,
                           precision="fp32", dimensions=e.dimensions, threads=plan.machine.cores, download=False)
    return engine.embed(texts, n_tokens), f"sentence-transformers {importlib.metadata.version('sentence-transformers')}"


def quality(plan: Plan, texts: list[str], n_tokens: list[int], vectors: list[list[float]] | None) -> dict[str, Any]:
    """Cosine between the probe's TEI vectors and the reference library's for the same chunks (min and mean), or
    why it was not checked."""
    import numpy as np

    if not vectors:
        return {"checked": False, "why": "the probe returned no vectors"}
    try:
        reference, library = reference_vectors(plan, texts[:len(vectors)], n_tokens[:len(vectors)])
    except (ImportError, OSError, VolembedError) as exc:
        return {"checked": False, "why": f"the reference library cannot encode {plan.model.ref} here: "
                                         f"{describe(exc)}"}
    tei = np.asarray(vectors, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    threshold, _ = quality_threshold(plan.model.ref)
    if tei.shape != ref.shape:
        return {"checked": True, "min_cosine": 0.0, "mean_cosine": 0.0, "chunks": len(tei), "reference": library,
                "threshold": threshold, "note": f"TEI answered {tei.shape[1]}-dim vectors, "
                                                f"{library} {ref.shape[1]}-dim"}
    cos = (tei * ref).sum(axis=1) / (np.linalg.norm(tei, axis=1) * np.linalg.norm(ref, axis=1))
    return {"checked": True, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "chunks": len(tei),
            "reference": library, "threshold": threshold}


def probe_costs(plans: Sequence[Plan], sample: Sample, prices: Prices) -> list[ProbeCost]:
    """What the GPU probe of each plan's GPU will cost, at the rate the dry run would use for it."""
    return [probe_cost(p, sample.processed, tei_rate(p.model.ref, p.compute.gpu), prices) for p in plans]


def probe_gpus(plans: Sequence[Plan], sample: Sample, probe: Probe, *, prices: Prices,
               approve: Callable[[ProbeSpend], None]) -> list[dict[str, Any]]:
    """Price the GPU probe of every plan (one per GPU type), let `approve` see (and refuse) it, then run each and
    store its rate; the first plan is the job's own."""
    costs = probe_costs(plans, sample, prices)
    approve(ProbeSpend(costs))
    return [{**calibrate(p, sample=sample, probe=probe, limits=ProbeLimits(c.timeout_s, c.retries)),
             "cost": c.to_dict()} for p, c in zip(plans, costs, strict=True)]


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
        cols = chunking.chunk_texts(tok.tok, batch, plan.chunk.size, plan.chunk.overlap,
                                    prefix=plan.chunk.prefix)
        texts.extend(cols.text)
        n_tokens.extend(cols.n_tokens)
        if len(texts) >= want:
            break
    if not texts:
        raise SourceError("calibrate found no text to embed in the dataset")
    return texts[:want], n_tokens[:want]

