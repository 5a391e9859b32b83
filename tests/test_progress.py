"""Progress while a run goes: status lines when piped (a ticker, driven here by a fake clock), bars on a terminal,
timestamped events, cost so far on Modal, and the final summary's counts named as the dry run names them."""

from __future__ import annotations

import io
import time
from pathlib import Path

from rich.console import Console

from volembed_runner.orchestrate import ShardFinished, StageFinished, StageStarted
from volembed_runner.run import RunSummary
from volembed_runner.ui.console import print_summary
from volembed_runner.ui.progress import RunProgress

from .test_orchestrate import StandInMapper, run_pass, setup


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def piped() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_a_piped_run_prints_a_status_line_at_least_every_ten_seconds_and_no_more() -> None:
    console, out = piped()
    clock = FakeClock()
    progress = RunProgress(console, clock=clock, ticker=False)
    with progress:
        progress(StageStarted("embed", 4, 4))
        for dt in (3, 3, 3):  # 9 s of silence: nothing yet
            clock.now += dt
            progress.tick()
        assert out.getvalue().splitlines() == ["embed: 4 of 4 shard(s) to run"]
        clock.now += 1
        progress.tick()
        progress.tick()  # once per interval, however often the ticker wakes
        clock.now += 10
        progress(ShardFinished("embed", "00000-0000", None, {"tokens": 4000}))
        progress.tick()
    lines = out.getvalue().splitlines()
    assert lines[1] == "embed: 0 of 4 shard(s), 10s elapsed"
    assert lines[2] == "embed: 1 of 4 shard(s), 200 tokens/s, ETA 1m00s, 20s elapsed"
    assert len(lines) == 3


def test_a_stage_says_what_was_done_before_and_how_it_ended() -> None:
    console, out = piped()
    clock = FakeClock()
    progress = RunProgress(console, clock=clock, ticker=False)
    with progress:
        progress(StageStarted("chunk", 5, 2))
        clock.now += 4
        progress(ShardFinished("chunk", "00003-0000", None, {"tokens": 800}))
        progress(ShardFinished("chunk", "00004-0000", "StageError: bad row 7", None))
        progress(StageFinished("chunk", 1))
        clock.now += 30
        progress.tick()  # nothing runs: the ticker stays quiet
    assert out.getvalue().splitlines() == [
        "chunk: 2 of 5 shard(s) to run",
        "chunk shard 00004-0000 failed: StageError: bad row 7",
        "chunk: done in 4s, 2 shard(s) run (1 failed), 200 tokens/s",
    ]


def test_on_modal_the_status_line_carries_the_cost_so_far() -> None:
    console, out = piped()
    clock = FakeClock()
    asked: list[tuple[str, int]] = []

    def spend(stage: str, todo: int) -> float:
        asked.append((stage, todo))
        return 0.01  # $/s of the stage's containers

    progress = RunProgress(console, clock=clock, spend=spend, ticker=False)
    with progress:
        progress(StageStarted("embed", 40, 30))
        clock.now += 100
        progress.tick()
    assert asked == [("embed", 30)]
    assert out.getvalue().splitlines()[-1] == "embed: 10 of 40 shard(s) (10 done before), 1m40s elapsed, ≤ $1.00 so far"


def test_the_ticker_thread_speaks_while_a_shard_runs() -> None:
    console, out = piped()
    with RunProgress(console, every=0.01) as progress:
        progress(StageStarted("embed", 1, 1))
        for _ in range(500):  # until the thread has spoken (no assertion on how fast)
            if "elapsed" in out.getvalue():
                break
            time.sleep(0.01)
    assert "embed: 0 of 1 shard(s)" in out.getvalue()


def test_a_terminal_gets_bars_with_tokens_per_second_and_eta() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    clock = FakeClock()
    with RunProgress(console, clock=clock, spend=lambda stage, todo: 0.5) as progress:
        progress(StageStarted("embed", 4, 4))
        clock.now += 10
        progress(ShardFinished("embed", "00000-0000", None, {"tokens": 5000}))
    text = out.getvalue()
    assert "embed" in text and "1/4" in text and "500 tokens/s" in text and "ETA" in text and "≤ $5.00" in text


def test_events_carry_when_they_happened_and_every_stage_ends(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    events: list = []
    before = time.time()
    run_pass(plan, root, StandInMapper(plan, root), on_event=events.append)
    after = time.time()
    assert [e.at for e in events] == sorted(e.at for e in events) and before <= events[0].at <= events[-1].at <= after
    assert [e.stage for e in events if isinstance(e, StageFinished)] == ["download", "chunk", "embed"]


def test_the_summary_names_tokens_and_chunk_tokens_as_the_dry_run_does() -> None:
    out = io.StringIO()
    summary = RunSummary(name="demo", status="failed", stages=["download", "chunk", "embed"], seconds=3.0,
                         documents=10, empty_documents=1, chunks=12, tokens=900, chunk_tokens=1010, vectors=11,
                         truncated=2, embedded_this_run=1010, tokens_per_second=505.0,
                         failed={"embed": {"00001-0000": "EmbedderError: HTTP 422"}},
                         outputs={"embeddings": "/v/e"}, manifest="/v/manifest.json")
    print_summary(summary, Console(file=out, force_terminal=False, width=200))
    rows = {line.split("  ")[0].strip(): line for line in out.getvalue().splitlines() if line.strip()}
    assert "900" in rows["tokens"] and "1,010" in rows["chunk tokens"] and "2" in rows["truncated"]
    assert "1 (listed in the manifest" in rows["failed shards"]
    assert "505 chunk tokens/s" in out.getvalue()


def test_modal_cost_so_far_prices_every_container_a_stage_may_use() -> None:
    from volembed_runner.cli import _load
    from volembed_runner.estimate.cost import spend_per_second
    from volembed_runner.estimate.prices import load_prices

    from .conftest import REPO

    plan, prices = _load(REPO / "pipelines" / "wikipedia.yaml", None), load_prices()
    c = plan.compute
    orchestrator = prices.container(1.0, c.orchestrator.cpu, c.orchestrator.memory_gib)
    gpu = prices.container(1.0, c.embed.cpu, c.embed.memory_gib, c.gpu)
    assert spend_per_second(plan, prices, "embed", 10_000) == 50 * gpu + orchestrator  # capped at concurrency_limit
    assert spend_per_second(plan, prices, "embed", 80) == 2 * gpu + orchestrator  # 80 units, 40 per container
    chunk = prices.container(1.0, c.chunk.cpu, c.chunk.memory_gib)
    assert spend_per_second(plan, prices, "chunk", 3) == 3 * chunk + orchestrator
    assert spend_per_second(plan, prices, "finish", 1) is None
