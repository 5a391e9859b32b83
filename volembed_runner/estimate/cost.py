"""The cost model: each stage's containers, wall time, CPU/GPU hours and dollars, on Modal or on this machine.

Container sizes come from the plan (the same figures the generated app requests); start-up, storage and chunking
rates from the catalog's throughput table; the embed stage's work units from the rule the orchestrator cuts them by
(`units.plan_units`), so the GPUs and the tail modelled here are the ones the run gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from volembed_runner import catalog
from volembed_runner.budget import Budget, StagePrice
from volembed_runner.estimate.prices import Prices
from volembed_runner.estimate.rates import Rate, tei_rate
from volembed_runner.estimate.sizes import Counts
from volembed_runner.plan import Plan
from volembed_runner.units import Fleet, ShardSize, fleet_of, plan_units


@dataclass
class Stage:
    """One stage of the job: how many containers, for how long, at what price."""

    name: str
    containers: int
    resources: str
    seconds: float | None  # wall time of the stage
    cpu_hours: float | None
    gpu_hours: float | None
    cost_usd: float | None
    gpu_cost_usd: float | None = None
    note: str = ""


@dataclass
class Job:
    """What the cost model needs from the counts."""

    documents: float
    tokens: float
    processed: float  # chunk tokens + special and prefix tokens per chunk: what the GPU runs
    chunks: float
    text_bytes: float
    download_bytes: float
    files: int
    shards: int


@dataclass
class Priced:
    """The job priced on one backend and GPU: its stages, wall time, cost and GPU-seconds."""

    stages: list[Stage]
    wall_seconds: float | None
    cost_usd: float | None
    gpu_seconds: float | None
    effective_gpus: int
    units: int = 0


# The GPU probe's own limits (`Cls.with_options` on its one call), so its worst case is that of a small sample, not of
# the job's units: one attempt (a failed probe is rerun by hand), and a timeout of PROBE_TIMEOUT_FACTOR x the sample's
# two passes at the low end of the rate, at least PROBE_TIMEOUT_FLOOR_S.
PROBE_RETRIES = 0
PROBE_TIMEOUT_FACTOR = 10.0
PROBE_TIMEOUT_FLOOR_S = 300  # (assumption) the call's own overhead and TEI's first batches of a small sample fit


@dataclass(frozen=True)
class ProbeCost:
    """The GPU probe on one GPU type: its expected container-seconds and cost, the most it can cost, and the limits
    its call runs under (what bounds that most)."""

    gpu: str
    seconds: float
    cost_usd: float | None
    max_cost_usd: float | None
    note: str
    timeout_s: int = PROBE_TIMEOUT_FLOOR_S
    retries: int = PROBE_RETRIES

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dict(self.__dict__)


def probe_timeout(processed: float, rate: Rate) -> int:
    """The probe call's timeout: PROBE_TIMEOUT_FACTOR x the sample's two passes at the rate's low end, at least
    PROBE_TIMEOUT_FLOOR_S and at most Modal's 24 h."""
    work = 2 * processed / max(rate.low, 1.0)
    return min(86_400, max(PROBE_TIMEOUT_FLOOR_S, math.ceil(PROBE_TIMEOUT_FACTOR * work)))


def probe_cost(plan: Plan, processed: float, rate: Rate, prices: Prices) -> ProbeCost:
    """The GPU probe's cost model: one container of the plan's GPU, billed from its start until the ephemeral app
    stops right after the call: start + model load + the sample twice (warm-up, then timed) at `rate`, at the
    container's per-second price (GPU + cores + memory). At most: every attempt of the probe's own limits
    (PROBE_RETRIES + 1) running to the Embedder's startup timeout and the probe's timeout (`probe_timeout`)."""
    consts = catalog.throughput()["modal"]
    c = plan.compute
    start = float(consts["gpu_container_start_seconds"] + consts["tei_model_load_seconds"])
    work = 2 * processed / rate.tokens_per_second
    seconds = start + work
    timeout = probe_timeout(processed, rate)
    attempts = PROBE_RETRIES + 1
    worst = attempts * float(c.embed_startup_timeout_s + timeout)
    per_second = prices.container(1.0, c.embed.cpu, c.embed.memory_gib, c.gpu)
    note = (f"1 × {c.gpu} ({describe_resources(c.embed.cpu, c.embed.memory_gib)}): start {start:g} s + 2 × "
            f"{processed:,.0f} tokens at {rate.tokens_per_second:,.0f} tokens/s ({rate.kind}) ≈ {seconds:,.0f} s; "
            f"at most {attempts} attempt(s) × (startup {c.embed_startup_timeout_s:,} s + the probe's timeout "
            f"{timeout:,} s)")
    return ProbeCost(c.gpu, seconds, None if per_second is None else seconds * per_second,
                     None if per_second is None else worst * per_second, note, timeout, PROBE_RETRIES)


# (assumption) a rate measured once (a probe's sample, an earlier run) holds within 25% on the next run: the budget
# commits units at this share of a point figure that has no interval of its own.
POINT_RATE_FACTOR = 0.75


def budget_of(plan: Plan, prices: Prices, rate: Rate, image: str | None = None) -> Budget:
    """`compute.max_cost` as the orchestrator holds it (None: counted, never refused): each stage's containers at
    their per-second prices, with the starts `modal_job` counts (a GPU container: start, model load and scale-down
    idle); units committed at the low end of `rate`'s interval (at most POINT_RATE_FACTOR of its figure); and, for
    a TEI run, the (model, GPU, `image`) its measured rate is of. A stage whose price is unknown is counted at $0
    (the source says so), so its containers are still timed."""
    consts = catalog.throughput()["modal"]
    c = plan.compute
    cpu_start = float(consts["cpu_container_start_seconds"])
    gpu_start = float(consts["gpu_container_start_seconds"] + consts["tei_model_load_seconds"] + c.embed_scaledown_s)
    shapes = {
        "download": (c.download.cpu, c.download.memory_gib, None, cpu_start, c.download_max_containers, 1),
        "chunk": (c.chunk.cpu, c.chunk.memory_gib, None, cpu_start, c.chunk_workers, 1),
        "embed": (c.embed.cpu, c.embed.memory_gib, c.gpu, gpu_start, c.concurrency_limit, c.allow_concurrent_inputs),
    }
    if plan.late is not None:  # the token index: one CPU container of the embed size, as the app requests it
        shapes["index"] = (c.embed.cpu, c.embed.memory_gib, None, cpu_start, 1, 1)
    elif plan.index is not None:  # the LanceDB table
        shapes["index"] = (plan.index.cpu, plan.index.memory_mib / 1024, None, cpu_start, 1, 1)
    stages: dict[str, StagePrice] = {}
    missing = []
    for name, (cores, gib, gpu, start, containers, inputs) in shapes.items():
        per_second = prices.container(1.0, cores, gib, gpu)
        if per_second is None:
            missing.append(name)
        stages[name] = StagePrice(per_second or 0.0, start, containers, inputs)
    source = prices.source + (f"; not counted (price unknown): {', '.join(missing)}" if missing else "")
    low = min(rate.low, POINT_RATE_FACTOR * rate.tokens_per_second)
    rate_of = None if image is None else {"model": plan.model.ref, "gpu": c.gpu, "image": image}
    return Budget(None if c.max_cost is None else float(c.max_cost), stages, rate.tokens_per_second,
                  source + "; the orchestrator and storage not counted", low, rate_of)


def total(values: list[float | None]) -> float | None:
    """The sum, or None (unknown) when any part is unknown."""
    return None if any(v is None for v in values) else float(sum(v for v in values if v is not None))


def describe_resources(cores: float, gib: float, gpu: str | None = None) -> str:
    """A container's size as the tables show it: `A10, 4 CPU, 8 GiB`."""
    return (f"{gpu}, " if gpu else "") + f"{cores:g} CPU, {gib:g} GiB"


def bandwidth(remote: bool) -> float:
    """Bytes/s one download worker reads: from the Hub, or parsing local files."""
    consts = catalog.throughput()["download"]
    return float(consts["hub_bytes_per_second"] if remote else consts["local_bytes_per_second"])


def modal_job(plan: Plan, job: Job, gpu: str, rate: float, prices: Prices, dim: int, remote: bool) -> Priced:
    """Modal: download, chunk and embed containers plus the orchestrator and a month of Volume storage."""
    consts = catalog.throughput()["modal"]
    compute = plan.compute  # container sizes as the generated app requests them
    cpu_start, gpu_start = consts["cpu_container_start_seconds"], consts["gpu_container_start_seconds"]
    load, idle = consts["tei_model_load_seconds"], compute.embed_scaledown_s
    stages: list[Stage] = []

    cores, gib = compute.download.cpu, compute.download.memory_gib
    n = max(1, min(job.files, compute.download_max_containers))
    per_second = bandwidth(remote)
    busy = job.download_bytes / per_second
    wall = cpu_start + busy / n + (job.download_bytes / job.files / per_second if job.files > n else 0.0)
    container_s = n * cpu_start + busy
    stages.append(Stage("download", n, describe_resources(cores, gib), wall, container_s * cores / 3600, 0.0,
                        prices.container(container_s, cores, gib), note=f"{job.files} source file(s)"))

    cores, gib = compute.chunk.cpu, compute.chunk.memory_gib
    n = max(1, min(plan.compute.chunk_workers, job.shards))
    per_shard = job.tokens / job.shards / (catalog.throughput()["chunk"]["tokens_per_second_per_core"] * cores)
    wall = cpu_start + math.ceil(job.shards / n) * per_shard
    container_s = n * cpu_start + job.shards * per_shard
    stages.append(Stage("chunk", n, describe_resources(cores, gib), wall, container_s * cores / 3600, 0.0,
                        prices.container(container_s, cores, gib), note=f"{job.shards} shard(s)"))

    # Another GPU type of the same job (the alternatives) gets that GPU's cores from the catalog.
    cores = compute.embed.cpu if gpu == compute.gpu else float(catalog.gpus()[gpu].embed_cpu)
    gib = compute.embed.memory_gib
    aci = plan.compute.allow_concurrent_inputs
    units = embed_units(job, fleet_of(plan, rate))
    g = max(1, min(plan.compute.concurrency_limit, math.ceil(units / aci)))  # Modal scales to inputs ÷ max_inputs
    unit_s = job.processed / units / rate  # one unit's GPU time alone
    # Every unit in flight at once: a GPU runs its container's share. Else the GPUs stay full until the queue
    # empties, then each idles about half a unit.
    one_wave = units <= g * aci
    busy_wall = math.ceil(units / g) * unit_s if one_wave else job.processed / (rate * g) + 0.5 * unit_s
    wall = gpu_start + load + busy_wall
    gpu_s = g * (gpu_start + load + idle) + job.processed / rate
    gpu_price = prices.gpu.get(gpu)
    stages.append(Stage("embed", g, describe_resources(cores, gib, gpu), wall, gpu_s * cores / 3600, gpu_s / 3600,
                        prices.container(gpu_s, cores, gib, gpu), None if gpu_price is None else gpu_s * gpu_price,
                        note=f"{rate:,.0f} tokens/s per GPU; {units:,} units; start {gpu_start + load:g} s + scaledown "
                             f"{idle:g} s each"))

    if plan.late is not None:  # the token index: one CPU container of the PyLate image (the embed size, no GPU)
        cores, gib = compute.embed.cpu, compute.embed.memory_gib
        busy = index_seconds(job, cores)
        wall = cpu_start + busy
        stages.append(Stage("index", 1, describe_resources(cores, gib), wall, wall * cores / 3600, 0.0,
                            prices.container(wall, cores, gib), note=index_note(plan, job, cores)))

    work_wall = total([s.seconds for s in stages])
    cores, gib = compute.orchestrator.cpu, compute.orchestrator.memory_gib
    orch_s = cpu_start + (work_wall or 0.0)
    stages.append(Stage("orchestrator", 1, describe_resources(cores, gib), orch_s, orch_s * cores / 3600, 0.0,
                        prices.container(orch_s, cores, gib)))

    ratio = catalog.throughput()["download"]["parquet_ratio"]
    chunk_bytes = job.text_bytes * (job.processed / max(job.tokens, 1.0)) * ratio + job.chunks * 40
    vectors = job.chunks * dim * 4 + (chunk_bytes if plan.embed.include_text else 0)
    what = "data + chunks + vectors"
    if plan.late is not None:  # a float16 vector per token in the shards, the index's float32 copy and HNSW links
        per_token = dim * 2 + dim * 4 + plan.late.index_m * 2 * 4
        vectors = job.processed * per_token + (chunk_bytes if plan.embed.include_text else 0)
        what = f"data + chunks + token vectors ({dim} × 2 B per token) + token index ({dim} × 4 B + links per token)"
    gib_stored = (job.text_bytes * ratio + chunk_bytes + vectors) / 2**30
    months = consts["storage_months"]
    storage = None if prices.volume_gib_month is None else gib_stored * prices.volume_gib_month * months
    stages.append(Stage("storage", 0, f"{gib_stored:,.1f} GiB × {months} mo", None, 0.0, 0.0, storage,
                        note=f"{what} on the Volume; Modal's free TiB per workspace not deducted"))
    wall_total = None if work_wall is None else work_wall + cpu_start
    return Priced(stages, wall_total, total([s.cost_usd for s in stages]), gpu_s, g, units)


def modelled_shards(job: Job) -> list[ShardSize]:
    """The job's chunk shards as the dry run models them: `job.shards` equal shards of its chunks and tokens."""
    rows = max(1, round(job.chunks / max(job.shards, 1)))
    return [ShardSize(f"{i:05d}", rows, job.processed / max(job.shards, 1)) for i in range(max(job.shards, 1))]


def embed_units(job: Job, fleet: Fleet) -> int:
    """How many embed units the orchestrator will cut the job into for `fleet` (`units.plan_units`)."""
    return max(1, len(plan_units(modelled_shards(job), fleet)))


def local_job(plan: Plan, job: Job, rate: float, remote: bool, load: float | None = None) -> Priced:
    """One machine: read/convert the sources, chunk in a process pool, embed in-process. Nothing is billed."""
    workers = plan.local_workers
    cores = plan.machine.cores
    readers = max(1, min(job.files, plan.local_download_workers))
    download = job.download_bytes / bandwidth(remote) / readers
    chunk = job.tokens / (catalog.throughput()["chunk"]["tokens_per_second_per_core"] * workers)
    load = catalog.throughput()["local"]["model_load_seconds"] if load is None else load
    embed = load + job.processed / rate
    stages = [
        Stage("download", readers, f"{readers} process(es)", download, download * readers / 3600, 0.0, 0.0,
              note=f"{job.files} source(s)"),
        Stage("chunk", workers, f"{workers} process(es)", chunk, chunk * workers / 3600, 0.0, 0.0,
              note=f"{job.shards} shard(s)"),
        Stage("embed", 1, f"local engine, {cores} cores", embed, embed * cores / 3600, 0.0, 0.0,
              note=f"{rate:,.0f} tokens/s + {load:g} s model load"),
    ]
    index = 0.0
    if plan.late is not None:  # the token index, in this process after embed
        index = index_seconds(job, cores)
        stages.append(Stage("index", 1, f"{cores} cores", index, index * cores / 3600, 0.0, 0.0,
                            note=index_note(plan, job, cores)))
    overhead = float(catalog.throughput()["local"]["overhead_seconds"])
    return Priced(stages, overhead + download + chunk + embed + index, 0.0, 0.0, 0)


def index_rate(cores: float) -> float:
    """Token vectors per second the late-interaction index build takes on `cores` cores (the catalog's measured
    rate, scaled linearly by cores: Voyager adds vectors on every core)."""
    table = catalog.throughput()["late_index"]
    return float(table["token_vectors_per_second"]) / float(table["cores"]) * cores


def index_seconds(job: Job, cores: float) -> float:
    """Seconds to build the token index: one vector per processed token (an upper bound: PyLate drops
    punctuation tokens) at `index_rate`."""
    return job.processed / index_rate(cores)


def index_note(plan: Plan, job: Job, cores: float) -> str:
    """The index stage's line: vectors, rate, and its shards with their memory bound."""
    late = plan.late
    assert late is not None
    shards = max(1, math.ceil(job.processed / late.index_shard_tokens))
    shard_gib = late.index_shard_tokens * late.index_bytes_per_token / 2**30
    return (f"{job.processed:,.0f} token vectors at {index_rate(cores):,.0f}/s; {shards:,} index shard(s) of "
            f"≤ {late.index_shard_tokens:,} token vectors, ≤ {shard_gib:,.1f} GiB in RAM each")


def price(plan: Plan, job: Job, tokens_per_second: float, rate: Rate, prices: Prices, dim: int,
           remote: bool) -> Priced:
    """The job on the plan's own backend at `tokens_per_second` (the rate's figure or one end of its range)."""
    if plan.backend == "local":
        return local_job(plan, job, tokens_per_second, remote, rate.load_seconds)
    return modal_job(plan, job, plan.compute.gpu, tokens_per_second, prices, dim, remote)


def modal_warnings(plan: Plan, job: Job, priced: Priced, warnings: list[str]) -> None:
    """Warn where the Modal plan's GPU cap or the number of shards keeps GPUs idle."""
    caps = catalog.throughput()["modal"]["plan_gpu_caps"]
    limit = plan.compute.concurrency_limit
    over = [f"{name} {cap}" for name, cap in caps.items() if limit > cap]
    if over:
        warnings.append(f"compute.concurrency_limit {limit} exceeds the Modal plan GPU cap of {', '.join(over)} "
                        f"concurrent GPUs: on such a plan at most that many run at once and the job takes longer")
    g, aci = priced.effective_gpus, plan.compute.allow_concurrent_inputs
    embed = next(s for s in priced.stages if s.name == "embed")
    if g < limit and (embed.seconds or 0) > 600:
        warnings.append(f"only {g} of {limit} GPU containers get work: {priced.units:,} embed unit(s) ÷ {aci} per "
                        f"container (allow_concurrent_inputs), the job has too few chunks for more")


def modal_assumptions(plan: Plan, prices: Prices) -> list[str]:
    """The Modal cost model's inputs, each with its source."""
    table = catalog.throughput()
    consts, chunk, download = table["modal"], table["chunk"], table["download"]
    c = plan.compute
    sizes = ", ".join(f"{kind} {size.cpu:g} CPU/{size.memory_gib:g} GiB" for kind, size in (
        ("download", c.download), ("chunk", c.chunk), (f"embed ({c.gpu})", c.embed), ("orchestrator", c.orchestrator)))
    return [
        f"prices: {prices.source}",
        f"containers: {sizes}, scaledown {c.embed_scaledown_s:g} s, ≤ {c.download_max_containers} download "
        "containers (as the generated app requests them: volembed_runner/catalog/containers.yaml, the GPU's embed_cpu "
        "in catalog/gpus.yaml)",
        f"start-up: {consts['source']}",
        f"chunking: {chunk['tokens_per_second_per_core']:,} tokens/s per core ({chunk['source']})",
        f"download: {download['hub_source']}; local sources: {download['local_source']}",
        f"Modal plan caps: {consts['plan_source']}",
    ]


def other_gpus(plan: Plan, job: Job | None, prices: Prices, calibrations: dict[str, dict[str, Any]], dim: int,
               remote: bool) -> list[dict[str, Any]]:
    """The same job on every other catalog GPU (all of them for a local job), sorted by cost (unknown last)."""
    out = []
    for name in catalog.gpus():
        if plan.backend == "modal" and name == plan.compute.gpu:
            continue
        rate = tei_rate(plan.model.ref, name, calibrations)
        row: dict[str, Any] = {"gpu": name, "usd_per_hour": None if prices.gpu.get(name) is None
                               else prices.gpu[name] * 3600, "tokens_per_second": rate.tokens_per_second,
                               "rate_kind": rate.kind, "wall_seconds": None, "gpu_hours": None, "cost_usd": None}
        if job is not None:
            priced = modal_job(plan, job, name, rate.tokens_per_second, prices, dim, remote)
            row.update(wall_seconds=priced.wall_seconds, gpu_hours=(priced.gpu_seconds or 0) / 3600,
                       cost_usd=priced.cost_usd, effective_gpus=priced.effective_gpus)
        out.append(row)
    return sorted(out, key=lambda r: (r["cost_usd"] is None, r["cost_usd"] or 0.0, r["gpu"]))


def time_cost_interval(plan: Plan, job: Job, counts: Counts, rate: Rate, prices: Prices, dim: int,
                        remote: bool) -> dict[str, list[float] | None]:
    """Wall time and cost at the low and high ends of the token interval and the throughput range."""
    lo_e, hi_e = counts.interval.get("embedded_tokens", (counts.embedded, counts.embedded))
    ends = []
    for embedded, tps in ((lo_e, rate.high), (hi_e, rate.low)):
        scale = (embedded or 0.0) / max(counts.embedded or 1.0, 1.0)
        scaled = Job(job.documents, job.tokens * scale, job.processed * scale, job.chunks * scale,
                      job.text_bytes * scale, job.download_bytes, job.files, job.shards)
        ends.append(price(plan, scaled, tps, rate, prices, dim, remote))
    walls = [p.wall_seconds for p in ends]
    costs = [p.cost_usd for p in ends]
    return {"wall_seconds": None if None in walls else [min(walls), max(walls)],  # type: ignore[type-var]
            "cost_usd": None if None in costs else [min(costs), max(costs)]}  # type: ignore[type-var]
