"""Live progress of a run, drawn from the orchestrator's events.

On a terminal: a rich bar per stage with its shards, tokens/s, ETA and (on Modal) cost so far. When piped (or in a
Modal container's log): a plain line when a stage starts and ends, one per failed shard, and a status line at least
every `every` seconds while a stage runs, from a ticker thread, so a long shard never leaves the log silent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from volembed_runner.orchestrate import Event, ShardFinished, StageFinished, StageStarted

TICK_SECONDS = 10.0  # the most a piped run stays silent while a stage runs
WAKE_SECONDS = 0.5  # how often the ticker thread looks (a line is due this much before `every` has passed)

# $/s a stage's containers cost while `todo` of its inputs run (None: unknown); Modal runs give one, local runs none.
SpendRate = Callable[[str, int], float | None]


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `42s`: how long, as a status line says it."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class StageProgress:
    """One stage as far as its events tell: shards to run and run, tokens through, when it started and ended."""

    name: str
    total: int
    todo: int
    started: float
    usd_per_second: float | None = None
    done: int = 0
    failed: int = 0
    tokens: int = 0
    ended: float | None = None

    def elapsed(self, now: float) -> float:
        """Seconds the stage has run (to its end, once ended)."""
        return max(0.0, (self.ended if self.ended is not None else now) - self.started)

    def tokens_per_second(self, now: float) -> float | None:
        """Tokens of the finished shards over the stage's time so far (chunk tokens for chunk and embed)."""
        seconds = self.elapsed(now)
        return self.tokens / seconds if self.tokens and seconds > 0 else None

    def eta(self, now: float) -> float | None:
        """Seconds left at the pace of the shards finished so far; None before the first one."""
        if self.ended is not None or not self.done:
            return None
        return self.elapsed(now) / self.done * max(0, self.todo - self.done)

    def cost(self, now: float) -> float | None:
        """What its containers cost so far at list price, every container the app lets it use counted busy."""
        return None if self.usd_per_second is None else self.usd_per_second * self.elapsed(now)

    def line(self, now: float) -> str:
        """`embed: 3 of 10 shard(s), 12,345 tokens/s, ETA 1m20s, 45s elapsed, ≤ $0.12 so far`."""
        before = self.total - self.todo
        parts = [f"{before + self.done:,} of {self.total:,} shard(s)" + (f" ({before:,} done before)" if before
                                                                          else "")]
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        rate, eta, cost = self.tokens_per_second(now), self.eta(now), self.cost(now)
        if rate:
            parts.append(f"{rate:,.0f} tokens/s")
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        parts.append(f"{duration(self.elapsed(now))} elapsed")
        if cost is not None:
            parts.append(f"≤ ${cost:,.2f} so far")
        return f"{self.name}: " + ", ".join(parts)


    def closing(self, now: float) -> str:
        """`embed: done in 1m05s, 10 shard(s) run (1 failed), 12,345 tokens/s, ≤ $0.40`."""
        parts = [f"{self.done:,} shard(s) run" + (f" ({self.failed:,} failed)" if self.failed else "")]
        rate, cost = self.tokens_per_second(now), self.cost(now)
        if rate:
            parts.append(f"{rate:,.0f} tokens/s")
        if cost is not None:
            parts.append(f"≤ ${cost:,.2f}")
        return f"{self.name}: done in {duration(self.elapsed(now))}, " + ", ".join(parts)


class RunProgress:
    """An `on_event` callback for the orchestrator that draws progress; use it as a context manager.

    `clock` is monotonic seconds (injectable, so tests need no sleeping); `spend` prices a stage while it runs.
    """

    def __init__(self, console: Console, quiet: bool = False, *, spend: SpendRate | None = None,
                 clock: Callable[[], float] = time.monotonic, every: float = TICK_SECONDS,
                 ticker: bool = True) -> None:
        self.console, self.quiet, self.spend, self.clock, self.every = console, quiet, spend, clock, every
        self.live = console.is_terminal and not quiet
        self.progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[cost]}"), console=console,
                                 disable=not self.live)
        self.tasks: dict[str, TaskID] = {}
        self.stages: dict[str, StageProgress] = {}
        self.running: StageProgress | None = None
        self.last_line = clock()
        self._wake = min(WAKE_SECONDS, every / 10)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = (threading.Thread(target=self._tick_forever, daemon=True, name="progress-ticker")
                        if ticker and not self.live and not quiet else None)

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, event: Event) -> None:
        with self._lock:
            now = self.clock()
            if isinstance(event, StageStarted):
                self._started(event, now)
            elif isinstance(event, ShardFinished):
                self._shard(event, now)
            elif isinstance(event, StageFinished):
                self._finished(event, now)

    def tick(self) -> None:
        """Print the running stage's status line when the last line is `every` seconds old, less the ticker's wake
        interval, so that one comes at least every `every` seconds (piped runs only)."""
        with self._lock:
            now = self.clock()
            if self.live or self.quiet or self.running is None or now - self.last_line < self.every - self._wake:
                return
            self._say(self.running.line(now), now)

    def _tick_forever(self) -> None:
        while not self._stop.wait(self._wake):
            self.tick()

    def _say(self, line: str, now: float) -> None:
        self.console.print(line, markup=False, highlight=False)
        self.last_line = now

    def _started(self, event: StageStarted, now: float) -> None:
        rate = self.spend(event.stage, event.todo) if self.spend is not None and event.todo else None
        stage = StageProgress(event.stage, event.total, event.todo, now, rate)
        self.stages[event.stage] = stage
        self.running = stage if event.todo else None
        self.tasks[event.stage] = self.progress.add_task(event.stage, total=event.total,
                                                         completed=event.total - event.todo, rate="", cost="")
        if not self.live and not self.quiet:
            self._say(f"{event.stage}: {event.todo:,} of {event.total:,} shard(s) to run" if event.todo else
                      f"{event.stage}: nothing to run, {event.total:,} shard(s) done before", now)

    def _shard(self, event: ShardFinished, now: float) -> None:
        stage = self.stages.get(event.stage)
        if stage is None:
            return
        stage.done += 1
        if event.error:
            stage.failed += 1
            self._say(f"{event.stage} shard {event.shard} failed: {event.error}", now)
        elif event.stats:
            stage.tokens += int(event.stats.get("tokens", 0) or 0)
        rate, cost = stage.tokens_per_second(now), stage.cost(now)
        self.progress.update(self.tasks[event.stage], advance=1, rate=f"{rate:,.0f} tokens/s" if rate else "",
                             cost="" if cost is None else f"≤ ${cost:,.2f}")

    def _finished(self, event: StageFinished, now: float) -> None:
        stage = self.stages.get(event.stage)
        if stage is None:
            return
        stage.ended = now
        if self.running is stage:
            self.running = None
        if stage.todo and not self.live and not self.quiet:
            self._say(stage.closing(now), now)
