"""Local backend: the same stages on this machine — a folder stands in for the Volume, a process pool for the
CPU containers, and an in-process engine (or the spec's TEI endpoint) for the GPU containers."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from volembed_runner.embedders.local import usable_cores
from volembed_runner.orchestrate import Mapper, Outcome, orchestrate
from volembed_runner.plan import Plan
from volembed_runner.stages import chunk as chunk_stage
from volembed_runner.stages import download as download_stage
from volembed_runner.stages import embed as embed_stage
from volembed_runner.stages.download import SourceTask

DOWNLOAD_WORKERS = 4  # the Hub serves a few parallel downloads well; local files gain little beyond that


def cpu_workers(requested: int) -> int:
    """Processes for CPU stages: the spec's `chunking.workers`, capped by the cores this process may use."""
    return max(1, min(requested, usable_cores()))


def _quiet_tokenizers() -> None:
    """Pool workers tokenize one shard each; letting each also spread over every core only adds contention."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _pool(workers: int) -> Executor:
    """One thread for one worker; else fresh (spawned) processes, safe whatever the parent has imported."""
    if workers == 1:
        return ThreadPoolExecutor(1)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_tokenizers)


def _map(pool_size: int, fn: Any, items: list[Any], key: Any, *args: Any) -> Iterator[tuple[Any, Any]]:
    """Run fn(*args, item) for every item, yielding (key(item), result-or-exception) as each finishes."""
    if not items:
        return
    with _pool(min(pool_size, len(items))) as pool:
        futures = {pool.submit(fn, *args, *(item if isinstance(item, tuple) else (item,))): item for item in items}
        for future in as_completed(futures):
            item = futures[future]
            try:
                yield key(item), future.result()
            except Exception as exc:  # a failed shard is recorded, not fatal: the others go on
                yield key(item), exc


class LocalMapper(Mapper):
    """Places each stage on this machine."""

    def __init__(self, plan: Plan, root: Path) -> None:
        self.plan, self.root = plan, root
        self.workers = cpu_workers(plan.compute.chunk_workers)

    def download(self, tasks: list[SourceTask]) -> Iterable[tuple[SourceTask, Any]]:
        """Source files in a small pool."""
        return _map(min(self.workers, DOWNLOAD_WORKERS), download_stage.download_task, tasks, lambda t: t,
                    self.root, self.plan.data)

    def chunk(self, shards: list[tuple[str, int | None]]) -> Iterable[tuple[str, Any]]:
        """Chunk shards in a process pool of `chunking.workers` (capped by cores)."""
        return _map(self.workers, chunk_stage.run_shard, shards, lambda s: s[0], self.root, self.plan)

    def embed(self, shards: list[str]) -> Iterable[tuple[str, Any]]:
        """Embed shards one at a time in this process: the engine already uses every core."""
        if not shards:
            return
        if self.plan.embed.engine == "tei":
            yield from self._embed_tei(shards)
            return
        from volembed_runner.embedders.local import LocalEmbedder

        e = self.plan.embed
        engine = LocalEmbedder(model=e.model, revision=e.revision, prefix=e.prefix, normalize=e.normalize,
                               precision=e.precision, dimensions=e.dimensions)
        for shard in shards:
            try:
                yield shard, embed_stage.embed_shard(self.root, self.plan, shard, engine)
            except Exception as exc:
                yield shard, exc

    def _embed_tei(self, shards: list[str]) -> Iterator[tuple[str, Any]]:
        """Embed through the spec's own TEI server, several shards in flight sharing one client."""
        from volembed_runner.embedders.tei import TEIClient

        async def run_all() -> list[tuple[str, Any]]:
            e = self.plan.embed
            async with TEIClient(base_url=e.endpoint or "", prefix=e.prefix, normalize=e.normalize,
                                 dimensions=e.dimensions) as client:
                await client.info()
                in_flight = asyncio.Semaphore(self.plan.compute.allow_concurrent_inputs)

                async def one(shard: str) -> tuple[str, Any]:
                    async with in_flight:
                        try:
                            return shard, await embed_stage.embed_shard_async(self.root, self.plan, shard, client)
                        except Exception as exc:
                            return shard, exc

                return await asyncio.gather(*(one(s) for s in shards))

        yield from asyncio.run(run_all())


def run(plan: Plan, *, until: str | None = None, on_event: Any = None) -> Outcome:
    """Run the plan's stages on this machine into the local volume folder."""
    root = plan.local_root()
    root.mkdir(parents=True, exist_ok=True)
    return orchestrate(plan, root, LocalMapper(plan, root), until=until, on_event=on_event)
