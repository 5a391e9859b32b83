"""Live progress of a run: a rich bar per stage on a terminal, a plain line per stage (and failure) when piped."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from volembed_runner.orchestrate import Event, ShardFinished, StageStarted


class RunProgress:
    """An `on_event` callback for the orchestrator that draws progress; use it as a context manager."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console, self.quiet = console, quiet
        self.live = console.is_terminal and not quiet
        self.progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, disable=not self.live)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self.tasks[event.stage] = self.progress.add_task(event.stage, total=event.total,
                                                             completed=event.total - event.todo)
            if not self.live and not self.quiet:
                line = (f"{event.todo} of {event.total} shard(s) to run" if event.todo else
                        f"nothing to run, {event.total} shard(s) done before")
                self.console.print(f"{event.stage}: {line}", markup=False)
        elif isinstance(event, ShardFinished):
            self.progress.advance(self.tasks[event.stage])
            if event.error:
                self.console.print(f"{event.stage} shard {event.shard} failed: {event.error}", markup=False)
