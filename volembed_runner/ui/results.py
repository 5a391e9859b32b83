"""What the after-run verbs print: `files`, `gc`, `fetch` (with download progress), `search`, `report` and `push`."""

from __future__ import annotations

import shlex
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

if TYPE_CHECKING:
    from volembed_runner.fetch import Fetched
    from volembed_runner.plan import Plan
    from volembed_runner.publish import Pushed
    from volembed_runner.results import GcPlan, Outputs
    from volembed_runner.search import SearchResult

STAGE_NAMES = {"data": "source shards", "chunks": "chunks", "embeddings": "vectors"}


def fmt_bytes(n: float) -> str:
    """1.2 MB, 340 kB, 12 B (powers of 1000, as `du --si`)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def print_next_steps(plan: Plan, console: Console) -> None:
    """The end of a run's summary: how to look at what it made."""
    spec = shlex.quote(plan.spec_path)
    console.print(f"report:   volembed-run report {spec}   (HTML: histograms, failures, timings, estimate)",
                  markup=False)
    console.print(f"vectors:  volembed-run files {spec} · fetch · search {spec} \"query\" · push --repo OWNER/NAME",
                  markup=False)


def print_files(outputs: Outputs, counts: dict[str, tuple[int, int]], stage: str | None, backend: str,
                console: Console) -> None:
    """The current folders as globs (only the glob with `--stage`, so it pastes as it is), with file counts."""
    if stage is not None:
        console.print(outputs.glob(stage), markup=False)
        return
    console.print(f"{outputs.name}: current outputs", markup=False)
    for name in outputs.folders:  # one line each, the glob last and whole, so it pastes as printed
        files, size = counts.get(name, (0, 0))
        console.print(f"  {name:<11} {files:>6,} file(s) {fmt_bytes(size):>10}  {outputs.glob(name)}", markup=False)
    if outputs.index:
        console.print(f"index: {outputs.root.rstrip('/')}/{outputs.index}", markup=False)
    if not outputs.recorded:
        console.print("note: no pass of this run has ended yet; these are the folders the spec will write",
                      markup=False)
    elif outputs.differs_from_spec:
        console.print(f"note: the spec as written now changes {', '.join(outputs.differs_from_spec)}; these are "
                      f"the outputs of the last pass ({outputs.updated_at}); rerun the spec to move them",
                      markup=False)
    if backend == "modal":
        console.print("note: paths inside the Modal Volume, as the app's containers mount it; "
                      "`volembed-run fetch SPEC` copies them here", markup=False)


def print_gc(gc: GcPlan, console: Console, *, removed: bool) -> None:
    """The stale folders with sizes, then whether they were removed (only with --yes)."""
    for note in gc.notes:
        console.print(f"note: {note}", markup=False)
    if not gc.stale:
        console.print("nothing stale: every fingerprint folder is current", markup=False)
        return
    table = Table(box=None, show_header=True)
    for column in ("stale folder", "kind", "files", "size"):
        table.add_column(column, justify="right" if column in ("files", "size") else "left", overflow="fold")
    for s in gc.stale:
        table.add_row(s.path, s.kind, f"{s.files:,}", fmt_bytes(s.bytes))
    console.print(table)
    verb = "removed" if removed else "would remove"
    console.print(f"{verb} {len(gc.stale)} folder(s), {fmt_bytes(gc.bytes)}"
                  + ("" if removed else "; pass --yes to delete them"), markup=False)


class DownloadProgress:
    """A byte progress bar for `fetch` on a terminal (quiet when piped or with --json); a `fetch.Progress`."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.live = console.is_terminal and not quiet
        self.progress = Progress(TextColumn("fetch"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 console=console, disable=not self.live)
        self.task: TaskID | None = None

    def __enter__(self) -> DownloadProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("fetch", total=total)
        self.progress.update(self.task, completed=done, total=total)


def print_fetched(fetched: Fetched, console: Console) -> None:
    """Where the fetched file is and what it holds."""
    shards = fetched.shards[0] if len(fetched.shards) == 1 else f"{len(fetched.shards)} shards"
    text = ", text joined from the chunk shards" if fetched.joined_text else ""
    console.print(f"wrote {fetched.path}: {fetched.rows:,} chunks with vectors ({shards}{text}; "
                  f"{fmt_bytes(fetched.bytes_read)} read)", markup=False)


def print_report(paths: tuple[Any, Any], console: Console) -> None:
    """The report's files."""
    html, png = paths
    console.print(f"wrote {html}" + (f" and {png}" if png else ""), markup=False)


def print_pushed(pushed: Pushed, console: Console) -> None:
    """The dataset the push made or updated."""
    console.print(f"pushed {pushed.files:,} file(s), {fmt_bytes(pushed.bytes)} to {pushed.url} "
                  f"(license {pushed.license}" + (f", commit {pushed.commit[:12]}" if pushed.commit else "") + ")",
                  markup=False)


SNIPPET_CHARS = 160


def snippet(text: str | None, width: int = SNIPPET_CHARS) -> str:
    """The chunk's text on one line, cut at a word near `width` characters."""
    if not text:
        return "(no text)"
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    cut = flat.rfind(" ", 0, width)
    return flat[: cut if cut > width // 2 else width] + " …"


def print_search(result: SearchResult, console: Console) -> None:
    """The hits, best first: score, doc id and chunk, the kept columns, a snippet; then how they were found."""
    if not result.hits:
        console.print("no vectors to search", markup=False)
    table = Table(box=None, show_header=True)
    table.add_column("score", justify="right")
    table.add_column("doc_id", overflow="fold")
    for name in result.hits[0].columns if result.hits else ():
        table.add_column(name, overflow="fold")
    table.add_column("text", overflow="fold", ratio=1)
    for hit in result.hits:
        table.add_row(f"{hit.score:.4f}", f"{hit.doc_id}#{hit.chunk_index}",
                      *("" if v is None else str(v) for v in hit.columns.values()), snippet(hit.text))
    console.print(table)
    prefix = f"query prefix {result.query_prefix!r}" if result.query_prefix else "no query prefix"
    console.print(f"{len(result.hits)} of {result.scanned:,} vectors, {result.method} ({result.measure}); query "
                  f"embedded by {result.engine} with {result.model}, {prefix}", markup=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    if result.read_from:
        console.print(f"note: {fmt_bytes(result.bytes_read)} read from {result.read_from} through the SDK; no Modal "
                      "container was started", markup=False)
