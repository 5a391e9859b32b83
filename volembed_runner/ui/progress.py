"""Live progress of a run, drawn from the progress record the orchestrator keeps (`volembed_runner/progress.py`).

The record arrives as the orchestrator's `Progressed` events (a local run, and the orchestrator's own log on Modal)
or polled from the manifest on the Volume (an attached Modal run on a terminal): one renderer for both. On a
terminal: a rich bar per stage with its shards, tokens/s, ETA, elapsed time and (on Modal) its cost so far. When
piped (or in a Modal container's log): a plain line when a stage starts and ends, one per failed shard, and a status
line (with the run's cost so far and projected total) at least every `every` seconds while a stage runs, from a
ticker thread, so a long shard never leaves the log silent. Between records, elapsed time and ETA move on with
`clock` (seconds since the epoch, as the record's `at`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from volembed_runner.orchestrate import Event, Progressed, ShardFinished
from volembed_runner.ui.estimate import fmt_duration

TICK_SECONDS = 10.0  # the most a piped run stays silent while a stage runs
WAKE_SECONDS = 0.5  # how often the ticker thread looks (a line is due this much before `every` has passed)


def usd(value: float) -> str:
    """`$1.23`."""
    return f"${value:,.2f}"


def elapsed(entry: dict[str, Any], age: float) -> float:
    """A stage's seconds, moved on by the record's `age` while it runs."""
    return float(entry.get("seconds") or 0.0) + (0.0 if entry.get("finished") else max(0.0, age))


def eta(entry: dict[str, Any], age: float) -> float | None:
    """A stage's seconds left, counted down by the record's `age`; None when unknown or ended."""
    left = entry.get("eta_seconds")
    return None if left is None or entry.get("finished") else max(0.0, float(left) - max(0.0, age))


def stage_line(name: str, entry: dict[str, Any], age: float = 0.0) -> str:
    """`embed: 3 of 10 shard(s), 12,345 tokens/s, ETA 1m20s, 45s elapsed`."""
    before = int(entry.get("before") or 0)
    parts = [f"{before + int(entry.get('done') or 0):,} of {int(entry.get('total') or 0):,} shard(s)"
             + (f" ({before:,} done before)" if before else "")]
    if entry.get("failed"):
        parts.append(f"{entry['failed']:,} failed")
    rate, left = entry.get("tokens_per_second"), eta(entry, age)
    if rate:
        parts.append(f"{rate:,.0f} tokens/s")
    if left is not None:
        parts.append(f"ETA {fmt_duration(left)}")
    parts.append(f"{fmt_duration(elapsed(entry, age))} elapsed")
    return f"{name}: " + ", ".join(parts)


def running_line(record: dict[str, Any], now: float) -> str | None:
    """The running stage of a record as a status line, with the run's cost so far and projected total where they
    are counted; None when no stage runs."""
    name = record.get("stage")
    entry = (record.get("stages") or {}).get(name or "")
    if entry is None or entry.get("finished") or not entry.get("todo"):
        return None
    line = stage_line(str(name), entry, max(0.0, now - float(record.get("at") or now)))
    cost, projected = record.get("cost_usd"), record.get("projected_total_usd")
    if cost is not None:
        line += f", {usd(cost)} so far" + (f", projected total {usd(projected)}" if projected is not None else "")
    return line


def closing_line(name: str, entry: dict[str, Any]) -> str:
    """`embed: done in 1m05s, 10 shard(s) run (1 failed), 12,345 tokens/s, $0.40`."""
    failed = int(entry.get("failed") or 0)
    parts = [f"{int(entry.get('done') or 0):,} shard(s) run" + (f" ({failed:,} failed)" if failed else "")]
    rate, cost = entry.get("tokens_per_second"), entry.get("cost_usd")
    if rate:
        parts.append(f"{rate:,.0f} tokens/s")
    if cost is not None:
        parts.append(usd(cost))
    return f"{name}: done in {fmt_duration(elapsed(entry, 0.0))}, " + ", ".join(parts)


def opening_line(name: str, entry: dict[str, Any]) -> str:
    """`embed: 4 of 10 shard(s) to run`, or `download: nothing to run, 3 shard(s) done before`."""
    todo, total = int(entry.get("todo") or 0), int(entry.get("total") or 0)
    return (f"{name}: {todo:,} of {total:,} shard(s) to run" if todo else
            f"{name}: nothing to run, {total:,} shard(s) done before")


def run_line(record: dict[str, Any], now: float) -> str | None:
    """`running_line`, saying how old the record is (what `status` prints)."""
    line = running_line(record, now)
    age = max(0.0, now - float(record.get("at") or now))
    return None if line is None else f"{line} (as of {fmt_duration(age)} ago)"


class RunProgress:
    """Draws progress records: an `on_event` callback for the orchestrator, and `show(record)` for polled ones; use
    it as a context manager.

    `clock` is seconds since the epoch (injectable, so tests need no sleeping)."""

    def __init__(self, console: Console, quiet: bool = False, *, clock: Callable[[], float] = time.time,
                 every: float = TICK_SECONDS, ticker: bool = True) -> None:
        self.console, self.quiet, self.clock, self.every = console, quiet, clock, every
        self.live = console.is_terminal and not quiet
        self.progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"),
                                 TextColumn("{task.fields[elapsed]}"), TextColumn("{task.fields[cost]}"),
                                 console=console, disable=not self.live)
        self.tasks: dict[str, TaskID] = {}
        self.ended: set[str] = set()
        self.record: dict[str, Any] | None = None
        self.last_line = clock()
        self._wake = min(WAKE_SECONDS, every / 10)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = (threading.Thread(target=self._tick_forever, daemon=True, name="progress-ticker")
                        if ticker and not quiet else None)

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
        if isinstance(event, Progressed):
            self.show(event.record)
        elif isinstance(event, ShardFinished) and event.error:
            with self._lock:
                if not self.live and not self.quiet:
                    self._say(f"{event.stage} shard {event.shard} failed: {event.error}", self.clock())

    def show(self, record: dict[str, Any]) -> None:
        """Draw one progress record: new stages get a bar (or an opening line), ended ones their closing line."""
        with self._lock:
            now = self.clock()
            self.record = record
            for name, entry in (record.get("stages") or {}).items():
                if name not in self.tasks:
                    self.tasks[name] = self.progress.add_task(name, total=int(entry.get("total") or 0),
                                                              rate="", eta="", elapsed="", cost="")
                    if not self.live and not self.quiet:
                        self._say(opening_line(name, entry), now)
                if entry.get("finished") and name not in self.ended:
                    self.ended.add(name)
                    if entry.get("todo") and not self.live and not self.quiet:
                        self._say(closing_line(name, entry), now)
            self._draw(now)
            if self.live:
                self.progress.refresh()  # every record on screen, however soon the next one comes

    def _draw(self, now: float) -> None:
        """Bring every bar to the last record, its running stage's times moved on to `now`."""
        if self.record is None or not self.live:
            return
        age = max(0.0, now - float(self.record.get("at") or now))
        for name, entry in (self.record.get("stages") or {}).items():
            rate, left, cost = entry.get("tokens_per_second"), eta(entry, age), entry.get("cost_usd")
            self.progress.update(self.tasks[name], total=int(entry.get("total") or 0),
                                 completed=int(entry.get("before") or 0) + int(entry.get("done") or 0),
                                 rate=f"{rate:,.0f} tokens/s" if rate else "",
                                 eta="" if left is None else f"ETA {fmt_duration(left)}",
                                 elapsed=fmt_duration(elapsed(entry, age)),
                                 cost="" if cost is None else usd(cost))

    def tick(self) -> None:
        """On a terminal, move the bars' times on; when piped, print the running stage's status line when the last
        line is `every` seconds old, less the ticker's wake interval, so that one comes at least every `every`
        seconds."""
        with self._lock:
            now = self.clock()
            if self.live:
                self._draw(now)
                return
            if self.quiet or self.record is None or now - self.last_line < self.every - self._wake:
                return
            line = running_line(self.record, now)
            if line is not None:
                self._say(line, now)

    def _tick_forever(self) -> None:
        while not self._stop.wait(self._wake):
            self.tick()

    def _say(self, line: str, now: float) -> None:
        self.console.print(line, markup=False, highlight=False)
        self.last_line = now
