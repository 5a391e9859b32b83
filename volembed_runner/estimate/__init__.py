"""The dry run: what a job will cost and how long it will take, before anything starts.

Sizes come from metadata, never from downloading the data (`sizes`); tokens and chunks per document from sampling
the real chunker (`sampling`); time and money from a throughput per (model, GPU) (`rates`) and Modal's per-second
prices (`prices`) through the cost model (`cost`). Every figure's source lands in `assumptions`; what cannot be
known is `None` ("unknown"), never 0. `calibrate` (measuring a rate by running the engine) is apart.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from volembed_runner import catalog, store
from volembed_runner.estimate.cost import (
    Job,
    Priced,
    Stage,
    modal_assumptions,
    modal_warnings,
    other_gpus,
    price,
    time_cost_interval,
)
from volembed_runner.estimate.prices import load_prices
from volembed_runner.estimate.rates import (
    Rate,
    calibration_key,
    load_calibrations,
    local_rate,
    quality_line,
    tei_rate,
)
from volembed_runner.estimate.sampling import (
    SAMPLE_CAP,
    CountingTokenizer,
    added_tokens,
    bytes_per_token,
    counting_tokenizer,
)
from volembed_runner.estimate.sizes import (
    HUB_TIMEOUT_S,
    Counts,
    Sizes,
    catalog_sizes,
    count_totals,
    hint_sizes,
    hub_sizes,
    local_sizes,
)
from volembed_runner.late import INDEX_OVERHEAD_BYTES
from volembed_runner.plan import Plan
from volembed_runner.units import UNIT_TIMEOUT_SHARE, fleet_of


@dataclass
class Estimate:
    """The dry run's answer. `to_dict` is the `--json` form; None means unknown (see `unknown` for why)."""

    name: str
    backend: str
    gpu: str
    model: str
    documents: int | None
    tokens: int | None
    chunks: int | None
    embedded_tokens: int | None
    processed_tokens: int | None
    stages: list[Stage]
    gpu_seconds: float | None
    wall_seconds: float | None
    cost_usd: float | None
    effective_gpus: int | None
    throughput: dict[str, Any] | None
    alternatives: list[dict[str, Any]]
    assumptions: list[str]
    warnings: list[str]
    unknown: list[str]
    sample: dict[str, Any]
    interval: dict[str, list[float] | None]
    prices: str
    gpu_usd_per_hour: float | None = None
    seconds_taken: float = 0.0
    # With a calibrated rate: the same job at the rate the dry run would use without it (catalog table or scaled).
    uncalibrated: dict[str, Any] | None = None
    quality: str | None = None  # Modal: how TEI's vectors compared with the reference library's in the GPU probe

    @property
    def gpu_hours(self) -> float | None:
        """GPU-hours of the embed stage (start, model load and scale-down idle included)."""
        return None if self.gpu_seconds is None else self.gpu_seconds / 3600

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: counts, per-stage figures, totals, alternatives, assumptions, warnings."""
        out = asdict(self)
        out["gpu_hours"] = self.gpu_hours
        out["cost_note"] = "local: no spend" if self.backend == "local" else None
        return out


def rounded(value: float | None) -> int | None:
    return None if value is None else round(value)


def estimate(plan: Plan, *, prices: Path | None = None, sample_cap: int = SAMPLE_CAP,
             hub_timeout: float = HUB_TIMEOUT_S) -> Estimate:
    """Estimate documents, tokens, chunks, time and cost of `plan` without starting or downloading anything."""
    started = time.monotonic()
    price_table = load_prices(prices)
    assumptions: list[str] = []
    warnings: list[str] = list(plan.warnings)
    unknown: list[str] = []
    tok = counting_tokenizer(plan)
    if tok is None:
        warnings.append(f"no tokenizer for {plan.model.ref} on this machine: documents are not sampled")
    sizes = source_sizes(plan, tok, sample_cap, hub_timeout)
    assumptions.extend(sizes.notes)
    warnings.extend(sizes.warnings)
    counts = count_totals(plan, sizes, assumptions, unknown, warnings)

    calibrations = load_calibrations()
    model = plan.model.ref
    job = job_of(plan, sizes, counts, tok, assumptions)
    dim = plan.embed.dim or 768
    if plan.embed.dim is None:
        assumptions.append("vector size: 768 dimensions assumed (model not in the catalog)")

    rate: Rate | None
    priced: Priced | None = None
    quality = None
    if plan.backend == "local":
        rate = local_rate(plan, calibrations) if plan.embed.engine == "local" else None
        if rate is None:
            unknown.append("embed time: the spec embeds through its own TEI server (embedding.endpoint), whose speed "
                           "is not known here")
        elif job is not None:
            priced = price(plan, job, rate.tokens_per_second, rate, price_table, dim, sizes.remote)
        assumptions.append("cost: local: no spend (this machine, no cloud account)")
        local = catalog.throughput()["local"]
        assumptions.append(f"local run overhead: {local['overhead_seconds']} s ({local['overhead_source']})")
    else:
        rate = tei_rate(model, plan.compute.gpu, calibrations)
        quality, low = quality_line(model, plan.compute.gpu,
                                    calibrations.get(calibration_key("modal", model, plan.compute.gpu, "tei")))
        if low:
            warnings.append(quality)
        fleet = fleet_of(plan, rate.tokens_per_second)
        if job is not None:
            priced = price(plan, job, rate.tokens_per_second, rate, price_table, dim, sizes.remote)
            modal_warnings(plan, job, priced, warnings)
            unit = job.processed / max(priced.units, 1)
            assumptions.append(
                f"embed units: {priced.units:,} of ≈{unit:,.0f} tokens, ≈{fleet.unit_seconds(unit) or 0:,.0f} s each "
                f"in a container with {fleet.inputs} in flight (≤ {UNIT_TIMEOUT_SHARE:.0%} of compute.timeout "
                f"{plan.compute.timeout:,} s), for {fleet.containers} × {fleet.inputs} input slots "
                "(volembed_runner/units.py)")
    if rate is not None:
        assumptions.append(f"throughput: {rate.source}")
    if plan.late is not None:
        late = plan.late
        assumptions.append(
            f"token index: {catalog.throughput()['late_index']['source']}, scaled by cores; built in index shards of "
            f"≤ {late.index_shard_tokens:,} token vectors ({late.index_shard_source}; {late.index_bytes_per_token} B "
            f"per vector = dim × 4 + M {late.index_m} × 2 × 4 + {INDEX_OVERHEAD_BYTES} overhead), one in RAM at a time")
    if plan.backend == "modal" or job is not None:
        assumptions.extend(modal_assumptions(plan, price_table))
    alternatives = other_gpus(plan, job, price_table, calibrations, dim, sizes.remote)

    interval = {k: [lo, hi] for k, (lo, hi) in counts.interval.items()}
    if priced is not None and rate is not None and job is not None and priced.wall_seconds is not None:
        interval.update(time_cost_interval(plan, job, counts, rate, price_table, dim, sizes.remote))
    uncalibrated = None
    if rate is not None and rate.kind == "calibrated" and job is not None:
        base = local_rate(plan, {}) if plan.backend == "local" else tei_rate(model, plan.compute.gpu, {})
        at_base = price(plan, job, base.tokens_per_second, base, price_table, dim, sizes.remote)
        uncalibrated = {"tokens_per_second": base.tokens_per_second, "kind": base.kind, "source": base.source,
                        "wall_seconds": at_base.wall_seconds, "gpu_seconds": at_base.gpu_seconds,
                        "cost_usd": 0.0 if plan.backend == "local" else at_base.cost_usd}
    cost = 0.0 if plan.backend == "local" else (priced.cost_usd if priced else None)
    if plan.backend != "local" and cost is None and priced is not None:
        unknown.append("cost: a price is unknown (set it with --prices FILE)")
    sample = sizes.sample
    est = Estimate(
        name=plan.name,
        backend=plan.backend,
        gpu=plan.compute.gpu,
        model=model,
        documents=rounded(counts.documents),
        tokens=rounded(counts.tokens),
        chunks=rounded(counts.chunks),
        embedded_tokens=rounded(counts.embedded),
        processed_tokens=rounded(job.processed) if job else None,
        stages=priced.stages if priced else [],
        gpu_seconds=priced.gpu_seconds if priced else None,
        wall_seconds=priced.wall_seconds if priced else None,
        cost_usd=cost,
        effective_gpus=priced.effective_gpus if priced and plan.backend == "modal" else None,
        throughput=None if rate is None else {"tokens_per_second": rate.tokens_per_second, "low": rate.low,
                                              "high": rate.high, "kind": rate.kind, "source": rate.source},
        alternatives=alternatives,
        assumptions=assumptions,
        warnings=warnings,
        unknown=unknown,
        sample={"documents": sample.n if sample else 0, "complete": bool(sample and sample.complete),
                "converged": bool(sample and sample.converged), "cap": sample_cap,
                "tokenizer": sample.note if sample else None},
        interval=interval,
        prices=price_table.source,
        gpu_usd_per_hour=None if price_table.gpu.get(plan.compute.gpu) is None
        else float(price_table.gpu[plan.compute.gpu] or 0.0) * 3600,
        uncalibrated=uncalibrated,
        quality=quality,
    )
    est.seconds_taken = time.monotonic() - started
    return est


def source_sizes(plan: Plan, tok: CountingTokenizer | None, sample_cap: int, hub_timeout: float) -> Sizes:
    """Local files are read directly; a Hub source is consulted only for what the size hints leave open."""
    if plan.data.kind == "files":
        sizes = local_sizes(plan, tok, sample_cap)
    else:
        known = catalog.find_dataset(plan.data.hf or "", plan.data.config, plan.data.split)
        if plan.data.num_rows and plan.data.num_bytes:
            sizes = Sizes(remote=True)
            sizes.notes.append("sizes from the spec's hints; the Hub was not consulted (no network call)")
        elif known is not None:
            sizes = Sizes(remote=True)
            sizes.notes.append("sizes from the catalog (volembed_runner/catalog/datasets.yaml); the Hub was not "
                               "consulted (no network call)")
            hint_sizes(plan, sizes)
            catalog_sizes(plan, sizes, known)
        else:
            sizes = hub_sizes(plan, tok, sample_cap, hub_timeout)
    hint_sizes(plan, sizes)
    return sizes


def job_of(
    plan: Plan, sizes: Sizes, counts: Counts, tok: CountingTokenizer | None, assumptions: list[str]
) -> Job | None:
    """The cost model's inputs, or None while tokens are unknown."""
    if counts.embedded is None or counts.tokens is None or counts.chunks is None:
        return None
    special, prefix = added_tokens(plan)
    processed = counts.embedded + counts.chunks * (special + prefix)
    assumptions.append(f"GPU work: chunk tokens + {special} special and {prefix} prefix token(s) per chunk = "
                       f"{processed:,.0f} processed tokens")
    docs = counts.documents or counts.chunks
    text_bytes = counts.text_bytes or counts.tokens * bytes_per_token(plan)[0]
    download = catalog.throughput()["download"]
    download_bytes = sizes.download_bytes
    if download_bytes is None:
        download_bytes = text_bytes * download["parquet_ratio"]
        assumptions.append(f"download: {download_bytes / 1e9:,.2f} GB ({download['parquet_source']})")
    files = sizes.files
    if files is None:
        files = max(1, math.ceil(download_bytes / download["hub_file_bytes"]))
        assumptions.append(f"download tasks: {files} ({download['hub_file_source']})")
    shard_bytes = store.MAX_SHARD_TEXT_BYTES
    shards = max(files, math.ceil(docs / plan.data.shard_rows), math.ceil(text_bytes / shard_bytes))
    assumptions.append(f"shards: {shards:,} (≥ one per source file, ≤ {plan.data.shard_rows:,} documents and "
                       f"≤ {shard_bytes >> 20} MiB of text each)")
    return Job(docs, counts.tokens, processed, counts.chunks, text_bytes, download_bytes, files, shards)


__all__ = ["Estimate", "Rate", "Stage", "estimate", "local_rate", "tei_rate"]
