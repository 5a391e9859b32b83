"""The pipeline's control flow, shared by both backends: which shards to run, resume, failure accounting, hand-over.

A backend supplies a `Mapper` (a process pool locally; `Function.map` on Modal) and the fleet the embed stage runs
on, and the orchestrator decides what to map. It is the one place that checks done-markers: it skips finished work,
cuts the embed stage's units to the fleet (`units.plan_units`), records every failure in the manifest with its
cause, reports progress as typed events, and stops feeding before a deadline so a fresh orchestrator can pick up
where it left off (resume makes that safe). Stage functions just do the work they are given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from volembed_runner import sources, store
from volembed_runner.errors import describe, is_transient
from volembed_runner.lease import Holder, Keeper, LeaseStore, held
from volembed_runner.plan import Plan
from volembed_runner.sources import SourceTask
from volembed_runner.stages import download as download_stage
from volembed_runner.stages import index as index_stage
from volembed_runner.stages import late as late_stage
from volembed_runner.stages.finish import Manifest
from volembed_runner.units import Fleet, ShardSize, fleet_of, plan_units

STAGES = ("download", "chunk", "embed", "index")
Stats = dict[str, Any]  # what a finished shard's done-marker records
K = TypeVar("K")
T = TypeVar("T")


class Mapper(Protocol):
    """Runs one stage function over many inputs somewhere, yielding (input, result-or-exception) as they finish.

    A mapper pulls its inputs from the iterator as it has room for them (never all at once), and yields a result
    for every input it pulled: when the orchestrator stops feeding (a hand-over), whatever is in flight drains.
    """

    def download(self, tasks: Iterator[SourceTask]) -> Iterable[tuple[SourceTask, list[str] | BaseException]]: ...

    def chunk(self, shards: Iterator[tuple[str, int | None]]) -> Iterable[tuple[str, Stats | BaseException]]: ...

    def embed(self, units: Iterator[str]) -> Iterable[tuple[str, Stats | BaseException]]: ...

    def index(self, keys: Iterator[str]) -> Iterable[tuple[str, Stats | BaseException]]: ...


def drive(results: AsyncGenerator[T, None]) -> Iterator[T]:
    """Iterate an async generator from synchronous code, on one event loop that lives as long as the iteration
    (how a mapper whose work is async hands its results to the orchestrator's loop)."""
    with asyncio.Runner() as runner:
        try:
            while True:
                try:
                    yield runner.run(anext(results))
                except StopAsyncIteration:
                    return
        finally:
            runner.run(results.aclose())


class Feed(Iterator[K]):
    """The inputs of one stage, handed to the mapper one by one until `stop()` says no more (the deadline)."""

    def __init__(self, items: list[K], stop: Callable[[], bool]) -> None:
        self._items = iter(items)
        self._stop = stop
        self.stopped = False
        self.fed = 0

    def __next__(self) -> K:
        if self.stopped or self._stop():
            self.stopped = True
            raise StopIteration
        item = next(self._items)
        self.fed += 1
        return item


@dataclass(frozen=True)
class StageStarted:
    """A stage begins: `todo` of its `total` shards (or download tasks) will run, the rest were done before.
    `at` (every event has it) is when it happened, in seconds since the epoch."""

    stage: str
    total: int
    todo: int
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ShardFinished:
    """One shard of a stage ended: with its stats, or with `error` (the cause, one line)."""

    stage: str
    shard: str
    error: str | None
    stats: Stats | None
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class StageFinished:
    """A stage's map ended: every shard it fed has finished (`failed` of them with an error)."""

    stage: str
    failed: int
    at: float = field(default_factory=time.time)


Event = StageStarted | ShardFinished | StageFinished


@dataclass
class Outcome:
    """What one orchestrator pass achieved."""

    stages_run: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    handover: bool = False

    @property
    def ok(self) -> bool:
        """True when no shard failed and the work is complete (no hand-over pending)."""
        return not any(self.failed.values()) and not self.handover


def orchestrate(
    plan: Plan,
    root: Path,
    mapper: Mapper,
    *,
    lease_store: LeaseStore,
    holder: Holder,
    work_seconds: float = 0.0,
    wait: float = 0.0,
    until: str | None = None,
    deadline: float | None = None,
    fleet: Fleet | None = None,
    clock: Callable[[], float] = time.time,
    on_event: Callable[[Event], None] | None = None,
) -> Outcome:
    """Run download → chunk → embed (→ index) → finish over `root`, skipping finished work; stop feeding at `deadline`.

    The pass holds the run's lease (`lease.py`) from before it touches the manifest to its end, so a second run of
    the same spec is refused (RunHeld) without writing anything. `work_seconds` is how long one submitted input may
    run if this process dies (the lease then stays taken that long); `wait` how long to wait for a stopped holder's.
    `fleet` is what the embed units are sized for (default: the plan's, its rate unknown).
    An error that ends the whole pass (an unlistable source, say) is recorded in the manifest before it propagates,
    so `status` never shows a dead run as running.
    """
    fleet = fleet or fleet_of(plan, None)
    with held(lease_store, holder, work_seconds=work_seconds, wait=wait) as keeper:
        manifest = Manifest.open(root, plan)
        try:
            return _passes(plan, root, mapper, manifest, keeper, until, deadline, fleet, clock,
                           on_event or (lambda event: None))
        except BaseException as exc:
            manifest.abort(describe(exc))
            raise


def _passes(
    plan: Plan,
    root: Path,
    mapper: Mapper,
    manifest: Manifest,
    keeper: Keeper,
    until: str | None,
    deadline: float | None,
    fleet: Fleet,
    clock: Callable[[], float],
    emit: Callable[[Event], None],
) -> Outcome:
    outcome = Outcome()

    def out_of_time() -> bool:
        return deadline is not None and clock() >= deadline

    # Download: one task per source file, skipping tasks whose shards are all marked done.
    index = download_stage.read_index(root, plan.data)
    if index is None:
        tasks = sources.list_tasks(plan.data)
        todo_tasks = [t for t in tasks if download_stage.finished_shards(root, plan.data, t) is None]

        def download(todo: Iterator[SourceTask]) -> Iterable[tuple[str, list[str] | BaseException]]:
            return ((task.source, result) for task, result in mapper.download(todo))

        if not _run_shards("download", todo_tasks, len(tasks), download, manifest, keeper, outcome, emit,
                           out_of_time):
            return outcome
        if outcome.failed:
            manifest.close(outcome_ok=False)
            return outcome
        index = download_stage.finalize(root, plan.data, tasks)
    else:
        manifest.skip_stage("download")
        emit(StageStarted("download", len(index), 0))  # done before: said, so a rerun's output names every stage
        outcome.stages_run.append("download")
    renamed = download_stage.renamed_ids(root, plan.data)
    if renamed:
        manifest.note("renamed_ids", renamed)
    if until == "download":
        manifest.close(outcome_ok=True)
        return outcome

    # Chunk: one input shard → one chunk shard.
    chunk_folder = store.chunks_dir(root, plan.name, plan.chunk.fingerprint)
    already = set(store.done_shards(chunk_folder))
    store.repair_index(chunk_folder, sorted(already))
    todo = [(s, cap) for s, cap in index if s not in already]
    if not _run_shards("chunk", todo, len(index), mapper.chunk, manifest, keeper, outcome, emit, out_of_time):
        return outcome
    store.remove_dead_temporaries(chunk_folder, "shard-")  # a killed pass's writers, gone by now
    if until == "chunk":
        manifest.close(outcome_ok=outcome.ok)
        return outcome

    # Embed: the chunk shards' rows not yet embedded, in units sized to the fleet (one embedding file per unit).
    embed_folder = store.embeddings_dir(root, plan.name, plan.embed.fingerprint)
    already = store.done_shards(embed_folder)
    store.repair_index(embed_folder, already)
    todo_embed = [unit.key for unit in plan_units(chunk_sizes(plan, chunk_folder), fleet, already)]
    if not _run_shards("embed", todo_embed, len(todo_embed) + len(already), mapper.embed, manifest, keeper, outcome,
                       emit, out_of_time):
        return outcome
    store.remove_dead_temporaries(embed_folder, "shard-")
    if (plan.index is None and plan.late is None) or until == "embed" or not outcome.ok:
        manifest.close(outcome_ok=outcome.ok)
        return outcome

    # Index (output.index, or late interaction's token index): one input over the whole run's vectors, once every
    # unit is embedded.
    key, done = _index_input(root, plan)
    if not _run_shards("index", [] if done else [key], 1, mapper.index, manifest, keeper, outcome, emit,
                       out_of_time):
        return outcome
    manifest.close(outcome_ok=outcome.ok)
    return outcome


def chunk_sizes(plan: Plan, chunk_folder: Path) -> list[ShardSize]:
    """Every finished chunk shard's rows and processed tokens (its chunk tokens + the special tokens TEI adds)."""
    out = []
    for shard in store.done_shards(chunk_folder):
        stats = store.read_marker(store.shard_path(chunk_folder, shard))
        rows = int(stats.get("chunks", 0))
        out.append(ShardSize(shard, rows, float(stats.get("tokens", 0)) + rows * plan.model.special_tokens))
    return out


def _index_input(root: Path, plan: Plan) -> tuple[str, bool]:
    """The index stage's one input and whether it is done: a late-interaction run's token index (`stages/late.py`),
    else the LanceDB table (`stages/index.py`)."""
    if plan.late is not None:
        return plan.late.fingerprint, late_stage.index_done(root, plan)
    return index_stage.KEY, store.is_done_folder(index_stage.table_path(root, plan))


def _run_shards(
    stage: str,
    todo: list[K],
    total: int,
    run: Callable[[Iterator[K]], Iterable[tuple[str, Any]]],
    manifest: Manifest,
    keeper: Keeper,
    outcome: Outcome,
    emit: Callable[[Event], None],
    out_of_time: Callable[[], bool],
) -> bool:
    """Map one stage over its pending shards; False when the pass must end here (hand-over at the deadline).

    At the deadline no new input is fed, and every input in flight is drained, so the successor never resubmits a
    shard that is still running. While the map runs the lease says work is in flight, so a successor of a dead pass
    waits for that work rather than redo it; a lease taken over by another run ends the pass at once (RunHeld).
    """
    keeper.check()
    keeper.stage = stage
    manifest.start_stage(stage, total=total, skipped=total - len(todo))
    emit(StageStarted(stage, total, len(todo)))
    failed: list[str] = []
    feed = Feed(todo, out_of_time)
    keeper.lease.busy = bool(todo)
    for shard, result in run(feed) if todo else ():
        keeper.check()
        error = describe(result) if isinstance(result, BaseException) else None
        if error:
            failed.append(shard)
        stats = None if error or not isinstance(result, dict) else result
        final = (getattr(result, "exit_code", 1) if isinstance(result, BaseException) and not is_transient(result)
                 else None)
        manifest.shard_finished(stage, shard, error, stats, unretryable=final)
        emit(ShardFinished(stage, shard, error, stats))
    keeper.lease.busy = False
    emit(StageFinished(stage, len(failed)))
    if feed.stopped and feed.fed < len(todo):
        outcome.handover = True
        manifest.finish_stage(stage)
        manifest.close(outcome_ok=False, handover=True)
        return False
    manifest.finish_stage(stage)
    outcome.stages_run.append(stage)
    if failed:
        outcome.failed[stage] = sorted(failed)
    return True
