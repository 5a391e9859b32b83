"""Local backend: the same stages on this machine — a folder stands in for the Volume, a process pool for the
CPU containers, and an in-process engine (or the spec's TEI endpoint) for the GPU containers."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from volembed_runner.embedders import AsyncEmbedder, InProcess
from volembed_runner.orchestrate import Event, Mapper, Outcome, Stats, orchestrate
from volembed_runner.plan import Plan
from volembed_runner.sources import SourceTask
from volembed_runner.stages import chunk as chunk_stage
from volembed_runner.stages import download as download_stage
from volembed_runner.stages import embed as embed_stage

T = TypeVar("T")

def _quiet_tokenizers() -> None:
    """Pool workers tokenize one shard each; letting each also spread over every core only adds contention."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _pool(workers: int) -> Executor:
    """One thread for one worker; else fresh (spawned) processes, safe whatever the parent has imported."""
    if workers == 1:
        return ThreadPoolExecutor(1)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_tokenizers)


def _map(pool_size: int, fn: Callable[..., T], items: list[Any], key: Callable[[Any], Any],
         *args: Any) -> Iterator[tuple[Any, T | BaseException]]:
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


def _drive(results: AsyncGenerator[T, None]) -> Iterator[T]:
    """Iterate an async iterator from synchronous code, on one event loop that lives as long as the iteration."""
    with asyncio.Runner() as runner:
        try:
            while True:
                try:
                    yield runner.run(anext(results))
                except StopAsyncIteration:
                    return
        finally:
            runner.run(results.aclose())


class LocalMapper(Mapper):
    """Places each stage on this machine."""

    def __init__(self, plan: Plan, root: Path) -> None:
        self.plan, self.root = plan, root

    def download(self, tasks: list[SourceTask]) -> Iterator[tuple[SourceTask, list[str] | BaseException]]:
        """Source files in a small pool."""
        return _map(self.plan.local_download_workers, download_stage.download_task, tasks, lambda t: t,
                    self.root, self.plan.data)

    def chunk(self, shards: list[tuple[str, int | None]]) -> Iterator[tuple[str, Stats | BaseException]]:
        """Chunk shards in a process pool of `chunking.workers` (capped by cores)."""
        return _map(self.plan.local_workers, chunk_stage.run_shard, shards, lambda s: s[0], self.root, self.plan)

    def embed(self, shards: list[str]) -> Iterator[tuple[str, Stats | BaseException]]:
        """Embed shards in this process: one at a time through the local engine (it uses every core), or
        `allow_concurrent_inputs` at a time through the spec's TEI server, as a Modal GPU container would."""
        if not shards:
            return iter(())
        in_flight = self.plan.compute.allow_concurrent_inputs if self.plan.embed.engine == "tei" else 1
        return _drive(self._embed_all(shards, in_flight))

    async def _embed_all(
        self, shards: list[str], in_flight: int
    ) -> AsyncGenerator[tuple[str, Stats | BaseException], None]:
        async with self._embedder() as embedder:
            slots = asyncio.Semaphore(in_flight)

            async def one(shard: str) -> tuple[str, Stats | BaseException]:
                async with slots:
                    try:
                        return shard, await embed_stage.embed_shard_async(self.root, self.plan, shard, embedder)
                    except Exception as exc:  # recorded as the shard's failure; the others go on
                        return shard, exc

            for finished in asyncio.as_completed([asyncio.ensure_future(one(s)) for s in shards]):
                yield await finished

    def _embedder(self) -> AbstractAsyncContextManager[AsyncEmbedder]:
        """The plan's engine: the spec's TEI server through the client, else the in-process engine."""
        e, model = self.plan.embed, self.plan.model

        @asynccontextmanager
        async def engine() -> AsyncIterator[AsyncEmbedder]:
            if e.engine == "tei":
                from volembed_runner.embedders.tei import TEIClient

                async with TEIClient(base_url=e.endpoint or "", prefix=e.prefix, normalize=e.normalize,
                                     dimensions=e.dimensions) as client:
                    await client.info()
                    yield client
                return
            from volembed_runner.embedders.local import LocalEmbedder

            yield InProcess(LocalEmbedder(model=model.location, revision=model.revision, prefix=e.prefix,
                                          normalize=e.normalize, precision=e.precision, dimensions=e.dimensions,
                                          threads=self.plan.machine.cores))

        return engine()


def run(plan: Plan, *, until: str | None = None, on_event: Callable[[Event], None] | None = None) -> Outcome:
    """Run the plan's stages on this machine into the local volume folder."""
    root = plan.local_root()
    root.mkdir(parents=True, exist_ok=True)
    return orchestrate(plan, root, LocalMapper(plan, root), until=until, on_event=on_event)
