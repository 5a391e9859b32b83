"""How busy the embed stage keeps a GPU, and how close the Wikipedia plan's fleet comes to the ideal; prints figures.

(1) The real Embedder code path: the generated app of `pipelines/wikipedia.yaml` is rendered and imported, and its
    `Embedder.embed` method runs through `.local()` (as tests/test_modal_stages_local.py does) over embed units of
    the size the unit rule cuts for that plan, `allow_concurrent_inputs` of them in flight on one event loop, as in
    one Modal container. Its TEI client talks to a TEI-protocol stand-in that models one GPU: one queue of texts,
    batches of up to `--max-batch-tokens` taken in arrival order, each taking a fixed overhead plus tokens ÷ rate
    (an A10G-like 45,900 tokens/s), all of it times `--scale` so the run takes a minute rather than an hour. The
    stand-in runs in its own process. Printed: the GPU's busy fraction in steady state (from the first batch until
    the container has fewer than `allow_concurrent_inputs` units left), against the ~60% GPU use fineweb-modal
    reports for the scripts this project replaces (reference/anchors.md §1.4).
(2) The Wikipedia plan's fleet, simulated: the units the rule cuts for the dry run's model of the job (146 chunk
    shards, ≈4.97e9 processed tokens), dealt to 50 GPU containers of 40 input slots as slots free up (how Modal
    feeds a map), each GPU sharing its rate between the units it holds, at the busy fraction measured in (1), after
    the catalog's container start. Printed: simulated wall time against the ideal tokens ÷ (GPUs × rate).

Chunk texts are short (each counted as 510 tokens by the GPU model) and vectors 64-dim, so the client and stand-in
move less data than a real run: the figure is the pipeline's scheduling (packing, in-flight budget, per-unit reads
and writes), not JSON throughput (bench_tei_client.py measures that). The modelled GPU runs 1/scale times faster
than an A10G, and the client and stand-in must keep up on this machine's cores: at --scale 0.02 (2.3M tokens/s) a
busy 2-core machine cannot, and the figure measures the machine; other work sharing it also lowers the figure.

    python benchmarks/bench_gpu_busy.py [--scale 0.05] [--units 80]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.tei_server import TEIServer  # noqa: E402
from volembed_runner import catalog, store  # noqa: E402
from volembed_runner.backends.modal import launch, render  # noqa: E402
from volembed_runner.cli import _load  # noqa: E402
from volembed_runner.estimate import count_totals, job_of, source_sizes  # noqa: E402
from volembed_runner.estimate.cost import modelled_shards  # noqa: E402
from volembed_runner.estimate.sampling import SAMPLE_CAP, counting_tokenizer  # noqa: E402
from volembed_runner.estimate.sizes import HUB_TIMEOUT_S  # noqa: E402
from volembed_runner.plan import MODAL_ROOT, Plan  # noqa: E402
from volembed_runner.units import fleet_of, plan_units  # noqa: E402

SPEC = REPO / "pipelines" / "wikipedia.yaml"
RATE = 45_900.0  # tokens/s of one A10G for bge-base (catalog/throughput.yaml)
TOKENS_PER_CHUNK = 510
BUSY_GOAL, WALL_GOAL, SCRIPTS_BUSY = 0.95, 0.85, 0.60


class OneGPU(TEIServer):
    """The TEI stand-in of tests/tei_server.py in front of one modelled GPU: texts queue in arrival order and run in
    batches of up to `max_batch_tokens`, each taking (overhead + tokens / rate) × scale seconds."""

    def __init__(self, *, rate: float, overhead_s: float, scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate, self.overhead_s, self.scale = rate, overhead_s, scale
        self.queue: deque[list[Any]] = deque()  # one entry per text: [its request's texts left, their event]
        self.ready = threading.Condition()
        self.batches: list[tuple[float, float]] = []  # (start, end), time.monotonic()
        threading.Thread(target=self._gpu, name="gpu", daemon=True).start()

    def _infer(self, inputs: list[str], request: dict[str, Any], body: bytes, action: Any) -> Any:
        entry = [len(inputs), threading.Event()]
        with self.ready:
            self.queue.extend([entry] * len(inputs))
            self.ready.notify()
        entry[1].wait()
        return super()._infer(inputs, request, body, None)

    def _gpu(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                batch: list[list[Any]] = []
                while self.queue and (len(batch) + 1) * TOKENS_PER_CHUNK <= self.max_batch_tokens:
                    batch.append(self.queue.popleft())
            start = time.monotonic()
            time.sleep((self.overhead_s + len(batch) * TOKENS_PER_CHUNK / self.rate) * self.scale)
            self.batches.append((start, time.monotonic()))
            for entry in batch:
                entry[0] -= 1
                if entry[0] == 0:
                    entry[1].set()


def serve(conn: Connection, settings: dict[str, Any]) -> None:
    """Run the stand-in until the parent asks for its batches (then send them and stop)."""
    with OneGPU(**settings) as gpu:
        conn.send(gpu.url)
        conn.recv()
        conn.send(list(gpu.batches))


class NoVolume:
    """The Volume of the benchmark's container: a local folder, so commit and reload have nothing to do."""

    def commit(self) -> None:
        pass

    def reload(self) -> None:
        pass


class Ready:
    """Stands in for text-embeddings-router: the stand-in already listens."""

    @classmethod
    def start(cls, args: list[str], *, port: int, timeout: float) -> Ready:
        return cls()

    def stop(self) -> None:
        pass


def write_chunks(root: Path, plan: Plan, units: int, unit_rows: int) -> list[str]:
    """Chunk shards on the benchmark's Volume holding `units` units of `unit_rows` chunks; returns the unit keys."""
    folder = store.chunks_dir(root, plan.name, plan.chunk.fingerprint)
    per_shard = 20
    keys = []
    for s in range(-(-units // per_shard)):
        shard, n = f"{s:05d}-0000", min(per_shard, units - s * per_shard) * unit_rows
        table = pa.table({
            "doc_id": [f"d{s}-{i // 8}" for i in range(n)],
            "chunk_index": pa.array([i % 8 for i in range(n)], pa.int32()),
            "char_start": pa.array([0] * n, pa.int64()),
            "char_end": pa.array([40] * n, pa.int64()),
            "n_tokens": pa.array([TOKENS_PER_CHUNK - 2] * n, pa.int32()),  # + [CLS]/[SEP]: 510 on the GPU
            "text": [f"chunk {s} {i} of the benchmark corpus" for i in range(n)],
            "url": ["https://en.wikipedia.org/wiki/X"] * n,
            "title": ["X"] * n,
        })

        def write(tmp: Path, table: pa.Table = table) -> dict[str, Any]:
            pq.write_table(table, tmp)
            return {"chunks": table.num_rows, "tokens": int(table.num_rows * (TOKENS_PER_CHUNK - 2))}

        store.write_shard(store.shard_path(folder, shard), write)
        keys += [f"{shard}.{a:09d}-{a + unit_rows:09d}" for a in range(0, n, unit_rows)]
    return keys


def container_busy(args: argparse.Namespace, plan: Plan, unit_rows: int) -> tuple[float, int]:
    """(1): the GPU's steady-state busy fraction with the plan's inputs in flight, and the units run."""
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    module = launch.import_app(_written(root / "app.py", render.render_app(plan)))
    remote = json.loads(json.dumps(module.PLAN).replace(f'"{MODAL_ROOT}/', f'"{root}/'))
    keys = write_chunks(root, Plan.from_dict(remote), args.units, unit_rows)
    router = render.router_settings(plan)
    # The stand-in answers as the plan's model would (its id, width and limit), so the client's checks pass.
    settings = {"rate": RATE, "overhead_s": args.overhead_ms / 1000, "scale": args.scale, "dim": plan.embed.dim,
                "model_id": plan.model.ref, "max_input_length": plan.model.max_input_tokens,
                "max_batch_tokens": router.max_batch_tokens, "max_client_batch_size": router.max_client_batch_size,
                "max_concurrent_requests": router.max_concurrent_requests, "payload_limit": router.payload_limit}
    parent, child = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(target=serve, args=(child, settings), daemon=True)
    server.start()
    url = parent.recv()
    for name, value in (("PLAN", remote), ("ROOT", str(root)), ("volume", NoVolume()), ("TEIRouter", Ready),
                        ("TEI_URL", url)):
        setattr(module, name, value)
    from modal._utils.async_utils import synchronizer

    embedder = module.Embedder()
    synchronizer._translate_in(embedder)._enter()  # `.local()` skips @modal.enter for async methods
    inputs = plan.compute.allow_concurrent_inputs
    tail_from: list[float] = []

    async def run() -> None:
        room = asyncio.Semaphore(inputs)
        left = len(keys)

        async def one(key: str) -> None:
            nonlocal left
            async with room:
                reply = await embedder.embed.local(key)
            if "error" in reply:
                raise RuntimeError(reply["error"])
            left -= 1
            if left < inputs and not tail_from:
                tail_from.append(time.monotonic())  # fewer units than slots are left: the tail begins

        await asyncio.gather(*(one(k) for k in keys))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "executing locally, no access to the mounted Volume": it is a folder
        asyncio.run(run())
    parent.send("batches")
    batches = parent.recv()
    server.join(timeout=10)
    start, end = batches[0][0], tail_from[0]
    busy = sum(max(0.0, min(b, end) - max(a, start)) for a, b in batches)
    return busy / (end - start), len(keys)


def _written(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def simulate_fleet(tokens: list[float], gpus: int, slots: int, rate: float, start_s: float) -> float:
    """(2): wall seconds for units of `tokens` on `gpus` GPUs of `slots` inputs each, after `start_s`: a slot that
    frees takes the next unit (only that GPU's slots ever free, so each GPU has one next event), and a GPU's rate
    is shared equally by the units it holds."""
    queue = deque(tokens)
    held: list[list[float]] = [[] for _ in range(gpus)]  # remaining tokens of each GPU's units
    for _ in range(slots):
        for g in range(gpus):
            if queue:
                held[g].append(queue.popleft())
    events: list[tuple[float, int]] = []  # (when the GPU's smallest unit ends, gpu)
    since = [start_s] * gpus
    for g in range(gpus):
        if held[g]:
            heapq.heappush(events, (start_s + min(held[g]) * len(held[g]) / rate, g))
    now = start_s
    while events:
        now, g = heapq.heappop(events)
        done = (now - since[g]) * rate / len(held[g])
        held[g] = [r - done for r in held[g] if r - done > 1e-6]
        since[g] = now
        while queue and len(held[g]) < slots:
            held[g].append(queue.popleft())
        if held[g]:
            heapq.heappush(events, (now + min(held[g]) * len(held[g]) / rate, g))
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05, help="real seconds per modelled GPU second")
    parser.add_argument("--units", type=int, default=80, help="units the container embeds in (1)")
    parser.add_argument("--overhead-ms", type=float, default=5.0, help="fixed GPU time per batch, modelled ms")
    args = parser.parse_args()

    plan = _load(SPEC, None, backend="modal")
    tok = counting_tokenizer(plan)
    sizes = source_sizes(plan, tok, SAMPLE_CAP, HUB_TIMEOUT_S)  # the spec's size hints: no network
    job = job_of(plan, sizes, count_totals(plan, sizes, [], [], []), tok, [])
    assert job is not None
    fleet = fleet_of(plan, RATE)
    units = plan_units(modelled_shards(job), fleet)  # what the dry run models the orchestrator cutting
    per_row = job.processed / job.chunks
    unit_rows = max(u.end - u.start for u in units)
    print(f"Wikipedia plan: {len(units):,} units of ≤{unit_rows:,} chunks (≈{unit_rows * per_row:,.0f} tokens) on "
          f"{fleet.containers} × {plan.compute.gpu}, {fleet.inputs} in flight each")

    busy, ran = container_busy(args, plan, unit_rows)
    print(f"(1) GPU busy in steady state, {fleet.inputs} units in flight through the real Embedder path "
          f"({ran} units, time scale {args.scale:g}): {busy:.1%}  (goal ≥ {BUSY_GOAL:.0%}; the scripts we replace: "
          f"~{SCRIPTS_BUSY:.0%})")

    consts = catalog.throughput()["modal"]
    start_s = consts["gpu_container_start_seconds"] + consts["tei_model_load_seconds"]
    tokens = [(u.end - u.start) * per_row for u in units]
    wall = simulate_fleet(tokens, fleet.containers, fleet.inputs, RATE * busy, start_s)
    ideal = sum(tokens) / (fleet.containers * RATE)
    print(f"(2) Wikipedia fleet simulated: {wall / 60:.1f} min (GPUs {busy:.1%} busy, {start_s:g} s container start) "
          f"vs ideal {ideal / 60:.1f} min = tokens ÷ ({fleet.containers} GPUs × {RATE:,.0f} tokens/s): "
          f"{ideal / wall:.3f}  (goal ≥ {WALL_GOAL})")


if __name__ == "__main__":
    main()
