"""The pipeline's control flow, shared by both backends: which shards to run, resume, failure accounting, hand-over.

A backend supplies a `Mapper` (a process pool locally; `Function.map` on Modal) and the fleet the embed stage runs
on, and the orchestrator decides what to map. It is the one place that checks done-markers: it skips finished work,
cuts the embed stage's units to the fleet (`units.plan_units`), records every failure in the manifest with its
cause, keeps the figures of the pass in flight in the manifest (`progress.py`: shards, tokens/s, ETA, and cost so
far from the run's `budget.Meter`) and reports them and every shard as typed events, and stops feeding before a
deadline so a fresh orchestrator can pick up where it left off (resume makes that safe), or when the next input
would pass the run's budget (`budget.py`: the run then ends, and a rerun with a raised `compute.max_cost`
continues). Stage functions just do the work they are given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from volembed_runner import sources, store
from volembed_runner.budget import Budget, Meter
from volembed_runner.errors import describe, is_transient
from volembed_runner.lease import Holder, Keeper, LeaseStore, held
from volembed_runner.plan import Plan
from volembed_runner.progress import Tracker
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
    """The inputs of one stage, handed to the mapper one by one until `stop()` says no more (the deadline) or
    `admit(item)` refuses the next one (the budget)."""

    def __init__(self, items: list[K], stop: Callable[[], bool],
                 admit: Callable[[K], bool] | None = None) -> None:
        self._items = iter(items)
        self._stop = stop
        self._admit = admit
        self.stopped = False
        self.refused = False
        self.fed = 0

    def __next__(self) -> K:
        if self.stopped or self._stop():
            self.stopped = True
            raise StopIteration
        item = next(self._items)
        if self._admit is not None and not self._admit(item):
            self.stopped = self.refused = True
            raise StopIteration
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


@dataclass(frozen=True)
class Progressed:
    """The pass's figures changed: `record` is the manifest's `progress` as of now (`progress.Tracker.record`)."""

    record: dict[str, Any]
    at: float = field(default_factory=time.time)


Event = StageStarted | ShardFinished | StageFinished | Progressed


@dataclass
class Outcome:
    """What one orchestrator pass achieved."""

    stages_run: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    handover: bool = False
    budget: dict[str, Any] | None = None  # the manifest's `cost` record, when the run's cost is counted (Modal)
    unretryable: dict[str, dict[str, int]] = field(default_factory=dict)  # stage → failed shard → its exit status

    @property
    def over_budget(self) -> bool:
        """True when the pass stopped feeding because the next input would pass `compute.max_cost`."""
        return bool(self.budget and self.budget.get("stopped_at_budget"))

    @property
    def ok(self) -> bool:
        """True when no shard failed and the work is complete (no hand-over pending, not stopped at the budget)."""
        return not any(self.failed.values()) and not self.handover and not self.over_budget


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
    budget: Budget | None = None,
) -> Outcome:
    """Run download → chunk → embed (→ index) → finish over `root`, skipping finished work; stop feeding at `deadline`.

    The pass holds the run's lease (`lease.py`) from before it touches the manifest to its end, so a second run of
    the same spec is refused (RunHeld) without writing anything. `work_seconds` is how long one submitted input may
    run if this process dies (the lease then stays taken that long); `wait` how long to wait for a stopped holder's.
    `fleet` is what the embed units are sized for (default: the plan's, its rate unknown). With a `budget` (every
    Modal run has one, unlimited without `compute.max_cost`), cost so far is counted on `clock` (`budget.Meter`,
    carrying in earlier unfinished passes' spend) and feeding stops before an input that would pass it; `clock`
    also times the progress record.
    An error that ends the whole pass (an unlistable source, say) is recorded in the manifest before it propagates,
    so `status` never shows a dead run as running.
    """
    fleet = fleet or fleet_of(plan, None)
    with held(lease_store, holder, work_seconds=work_seconds, wait=wait) as keeper:
        previous = store.read_json(store.manifest_path(root, plan.name)) or {}
        manifest = Manifest.open(root, plan)
        meter = None
        if budget is not None:
            finished = previous.get("status") == "succeeded" and "embed" in (previous.get("stages") or {})
            carried = None if finished else previous.get("cost")  # spend of this run's unfinished passes
            meter = Meter(budget, clock, spent_before=float((carried or {}).get("spent_usd") or 0.0))
        try:
            return _passes(plan, root, mapper, manifest, keeper, until, deadline, fleet, clock,
                           on_event or (lambda event: None), meter)
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
    meter: Meter | None,
) -> Outcome:
    outcome = Outcome()
    run = _Shards(manifest, keeper, outcome, emit, meter, clock)

    def out_of_time() -> bool:
        return deadline is not None and clock() >= deadline

    # Download: one task per source file, skipping tasks whose shards are all marked done.
    index = download_stage.read_index(root, plan.data)
    if index is None:
        tasks = sources.list_tasks(plan.data)
        todo_tasks = [t for t in tasks if download_stage.finished_shards(root, plan.data, t) is None]

        def download(todo: Iterator[SourceTask]) -> Iterable[tuple[str, list[str] | BaseException]]:
            return ((task.source, result) for task, result in mapper.download(todo))

        if not run("download", todo_tasks, len(tasks), download, out_of_time, lambda task: task.source):
            return outcome
        if outcome.failed:
            manifest.close(outcome_ok=False)
            return outcome
        index = download_stage.finalize(root, plan.data, tasks)
    else:
        manifest.skip_stage("download")
        run.skipped("download", len(index))  # done before: said, so a rerun's output names every stage
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
    if not run("chunk", todo, len(index), mapper.chunk, out_of_time, lambda item: item[0]):
        return outcome
    store.remove_dead_temporaries(chunk_folder, "shard-")  # a killed pass's writers, gone by now
    if until == "chunk":
        manifest.close(outcome_ok=outcome.ok)
        return outcome

    # Embed: the chunk shards' rows not yet embedded, in units sized to the fleet (one embedding file per unit).
    embed_folder = store.embeddings_dir(root, plan.name, plan.embed.fingerprint)
    already = store.done_shards(embed_folder)
    store.repair_index(embed_folder, already)
    sizes = {size.shard: size for size in chunk_sizes(plan, chunk_folder)}
    units = plan_units(list(sizes.values()), fleet, already)
    run.tokens = {u.key: sizes[u.shard].tokens * (u.end - u.start) / max(1, u.rows) for u in units}
    if not run("embed", [u.key for u in units], len(units) + len(already), mapper.embed, out_of_time, str):
        return outcome
    store.remove_dead_temporaries(embed_folder, "shard-")
    run.record()
    if (plan.index is None and plan.late is None) or until == "embed" or not outcome.ok:
        manifest.close(outcome_ok=outcome.ok)
        return outcome

    # Index (output.index, or late interaction's token index): one input over the whole run's vectors, once every
    # unit is embedded.
    key, done = _index_input(root, plan)
    if not run("index", [] if done else [key], 1, mapper.index, out_of_time, str):
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


class _Shards:
    """Maps one stage over its pending shards at a time, for one pass (its manifest, lease, outcome and budget)."""

    def __init__(self, manifest: Manifest, keeper: Keeper, outcome: Outcome, emit: Callable[[Event], None],
                 meter: Meter | None, clock: Callable[[], float]) -> None:
        self.manifest = manifest
        self.keeper = keeper
        self.outcome = outcome
        self.emit = emit
        self.meter = meter
        self.tracker = Tracker(clock)
        self.tokens: dict[str, float] = {}  # processed tokens of each embed unit (what the budget projects)

    def spent(self) -> float | None:
        """The run's cost so far (None where it is not counted)."""
        return None if self.meter is None else float(self.meter.record(0, 0.0)["spent_usd"])

    def record(self) -> None:
        """Keep the cost so far (with the projection for the embed units not finished) and the pass's figures in
        the manifest (written with its next write) and the outcome, and report the figures."""
        cost = None
        if self.meter is not None:
            embed = self.tracker.stages.get("embed")
            remaining = 0 if embed is None else embed.todo - embed.done
            cost = self.meter.record(remaining, self.tracker.remaining_tokens("embed"))
            self.outcome.budget = self.manifest.data["cost"] = cost
        self.manifest.data["progress"] = record = self.tracker.record(cost)
        self.emit(Progressed(record))

    def skipped(self, stage: str, total: int) -> None:
        """A stage whose every input an earlier pass finished."""
        self.tracker.start(stage, total, 0, None, self.spent())
        self.tracker.finish(stage, self.spent())
        self.record()
        self.emit(StageStarted(stage, total, 0))

    def __call__(
        self,
        stage: str,
        todo: list[K],
        total: int,
        run: Callable[[Iterator[K]], Iterable[tuple[str, Any]]],
        out_of_time: Callable[[], bool],
        key_of: Callable[[K], str],
    ) -> bool:
        """Map one stage over its pending shards; False when the pass must end here (hand-over at the deadline, or
        the budget).

        At the deadline, or before an input the budget cannot pay for, no new input is fed, and every input in
        flight is drained, so the successor never resubmits a shard that is still running. While the map runs the
        lease says work is in flight, so a successor of a dead pass waits for that work rather than redo it; a lease
        taken over by another run ends the pass at once (RunHeld).
        """
        manifest, keeper, outcome, meter = self.manifest, self.keeper, self.outcome, self.meter
        keeper.check()
        keeper.stage = stage
        if meter is not None:
            meter.start(stage)
        tokens = self.tokens if stage == "embed" else None
        self.tracker.start(stage, total, len(todo),
                           None if tokens is None else sum(tokens.get(key_of(item), 0.0) for item in todo),
                           self.spent())
        self.record()
        manifest.start_stage(stage, total=total, skipped=total - len(todo))
        self.emit(StageStarted(stage, total, len(todo)))
        failed: list[str] = []
        admit = None
        if meter is not None:

            def admit(item: K) -> bool:
                key = key_of(item)
                return meter.admit(key, self.tokens.get(key, 0.0) if stage == "embed" else 0.0)

        feed = Feed(todo, out_of_time, admit)
        keeper.lease.busy = bool(todo)
        for shard, result in run(feed) if todo else ():
            keeper.check()
            error = describe(result) if isinstance(result, BaseException) else None
            if error:
                failed.append(shard)
            stats = None if error or not isinstance(result, dict) else result
            final = (getattr(result, "exit_code", 1) if isinstance(result, BaseException) and not is_transient(result)
                     else None)
            if error and final is not None:
                outcome.unretryable.setdefault(stage, {})[shard] = final
            if meter is not None:
                meter.finished(shard, ok=error is None)
            done = tokens.get(shard, 0.0) if tokens is not None else float((stats or {}).get("tokens", 0) or 0)
            self.tracker.shard(stage, failed=error is not None, tokens=done)
            self.record()
            manifest.shard_finished(stage, shard, error, stats, unretryable=final)
            self.emit(ShardFinished(stage, shard, error, stats))
        keeper.lease.busy = False
        self.tracker.finish(stage, self.spent())
        self.record()
        self.emit(StageFinished(stage, len(failed)))
        if feed.stopped and feed.fed < len(todo):
            outcome.handover = not feed.refused
            manifest.finish_stage(stage)
            manifest.close(outcome_ok=False, handover=outcome.handover, stopped=feed.refused)
            return False
        manifest.finish_stage(stage)
        outcome.stages_run.append(stage)
        if failed:
            outcome.failed[stage] = sorted(failed)
        return True
