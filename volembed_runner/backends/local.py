"""Local backend: the same stages on this machine — a folder stands in for the Volume, a process pool for the
CPU containers, and an in-process engine (or the spec's TEI endpoint) for the GPU containers."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from volembed_runner import store
from volembed_runner.embedders import AsyncEmbedder, InProcess
from volembed_runner.lease import FileLeaseStore, Holder
from volembed_runner.orchestrate import Event, Mapper, Outcome, Stats, drive, orchestrate
from volembed_runner.plan import Plan, openvino_cache
from volembed_runner.sources import SourceTask
from volembed_runner.stages import chunk as chunk_stage
from volembed_runner.stages import download as download_stage
from volembed_runner.stages import embed as embed_stage
from volembed_runner.stages import index as index_stage

T = TypeVar("T")

def _quiet_tokenizers() -> None:
    """Pool workers tokenize one shard each; letting each also spread over every core only adds contention."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _pool(workers: int) -> Executor:
    """One thread for one worker; else fresh (spawned) processes, safe whatever the parent has imported."""
    if workers == 1:
        return ThreadPoolExecutor(1)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_tokenizers)


def _map(pool_size: int, fn: Callable[..., T], items: Iterator[Any], key: Callable[[Any], Any],
         *args: Any) -> Iterator[tuple[Any, T | BaseException]]:
    """Run fn(*args, item) for the items, `pool_size` at a time, taking the next item only when one finishes; yield
    (key(item), result-or-exception) as each finishes."""
    first = next(items, None)
    if first is None:
        return
    with _pool(pool_size) as pool:
        running: dict[Future[T], Any] = {}

        def submit(item: Any) -> None:
            running[pool.submit(fn, *args, *(item if isinstance(item, tuple) else (item,)))] = item

        submit(first)
        for item in islice(items, pool_size - 1):
            submit(item)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                item = running.pop(future)
                try:
                    result: T | BaseException = future.result()
                except Exception as exc:  # a failed shard is recorded, not fatal: the others go on
                    result = exc
                for following in islice(items, 1):
                    submit(following)
                yield key(item), result


class LocalMapper(Mapper):
    """Places each stage on this machine."""

    def __init__(self, plan: Plan, root: Path) -> None:
        self.plan, self.root = plan, root

    def download(self, tasks: Iterator[SourceTask]) -> Iterator[tuple[SourceTask, list[str] | BaseException]]:
        """Source files in a small pool."""
        return _map(self.plan.local_download_workers, download_stage.download_task, tasks, lambda t: t,
                    self.root, self.plan.data)

    def chunk(self, shards: Iterator[tuple[str, int | None]]) -> Iterator[tuple[str, Stats | BaseException]]:
        """Chunk shards in a process pool of `chunking.workers` (capped by cores)."""
        return _map(self.plan.local_workers, chunk_stage.run_shard, shards, lambda s: s[0], self.root, self.plan)

    def embed(self, shards: Iterator[str]) -> Iterator[tuple[str, Stats | BaseException]]:
        """Embed shards in this process: one at a time through the local engine (it uses every core), or
        `allow_concurrent_inputs` at a time through the spec's TEI server, as a Modal GPU container would."""
        in_flight = self.plan.compute.allow_concurrent_inputs if self.plan.embed.engine == "tei" else 1
        return drive(self._embed_all(shards, in_flight))

    async def _embed_all(
        self, shards: Iterator[str], in_flight: int
    ) -> AsyncGenerator[tuple[str, Stats | BaseException], None]:
        first = next(shards, None)
        if first is None:
            return
        async with self._embedder() as embedder:

            async def one(shard: str) -> tuple[str, Stats | BaseException]:
                try:
                    return shard, await embed_stage.embed_shard_async(self.root, self.plan, shard, embedder)
                except Exception as exc:  # recorded as the shard's failure; the others go on
                    return shard, exc

            running = {asyncio.ensure_future(one(s)) for s in [first, *islice(shards, in_flight - 1)]}
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    running.update(asyncio.ensure_future(one(s)) for s in islice(shards, 1))
                    yield task.result()

    def index(self, keys: Iterator[str]) -> Iterator[tuple[str, Stats | BaseException]]:
        """Write the run's index in a thread of this process (one input): its LanceDB table (LanceDB uses every
        core), or a late-interaction run's token index."""
        if self.plan.late is not None:
            from volembed_runner.stages import late

            return _map(1, lambda key: late.build_index(self.root, self.plan), keys, lambda k: k)
        return _map(1, index_stage.build_index, keys, lambda k: k, self.root, self.plan)

    def _embedder(self) -> AbstractAsyncContextManager[AsyncEmbedder]:
        """The plan's engine: the spec's TEI server through the client, else the in-process engine."""
        e, model = self.plan.embed, self.plan.model

        @asynccontextmanager
        async def engine() -> AsyncIterator[AsyncEmbedder]:
            if e.engine == "tei":
                async with embed_stage.tei_client(self.plan, e.endpoint or "") as client:
                    await client.info()  # the server's identity is checked before any shard
                    yield client
                return
            if self.plan.late is not None:  # ColBERT through PyLate, in this process
                from volembed_runner.stages import late

                yield InProcess(late.engine(self.plan, threads=self.plan.machine.cores))  # type: ignore[arg-type]
                return
            from volembed_runner.embedders.local import LocalEmbedder

            yield InProcess(LocalEmbedder(model=model.location, revision=model.revision, prefix=e.prefix,
                                          normalize=e.normalize, precision=e.precision, dimensions=e.dimensions,
                                          batch_tokens=e.batch_tokens, max_batch_size=e.batch_texts,
                                          threads=self.plan.machine.cores, truncate=e.truncate,
                                          runtime=e.runtime or "auto", cache_dir=openvino_cache(),
                                          device=self.plan.machine.device))

        return engine()


def run(plan: Plan, *, until: str | None = None, on_event: Callable[[Event], None] | None = None) -> Outcome:
    """Run the plan's stages on this machine into the local volume folder, holding the run's lease (its workers
    are this process's children, so nothing it starts outlives it)."""
    root = plan.local_root()
    root.mkdir(parents=True, exist_ok=True)
    home = root.parent.parent
    if (home.parent / ".git").exists():  # the default home at a repository's root
        store.keep_out_of_git(home)
    lease_store = FileLeaseStore(store.lease_dir(root, plan.name))
    return orchestrate(plan, root, LocalMapper(plan, root), lease_store=lease_store, holder=Holder.here("local"),
                       until=until, on_event=on_event)
