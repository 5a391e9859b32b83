"""Progress while a run goes: the orchestrator's progress record (`volembed_runner/progress.py`) drawn as status
lines when piped (a ticker, driven here by a fake clock) and bars on a terminal, from events or polled from the
Volume; cost so far is the run's one count (`budget.Meter`); the final summary names counts as the dry run does."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from volembed_runner.backends.modal.launch import ProgressPoller
from volembed_runner.budget import Budget, StagePrice
from volembed_runner.orchestrate import Progressed, ShardFinished, StageFinished
from volembed_runner.progress import Tracker
from volembed_runner.run import RunSummary
from volembed_runner.stages import finish
from volembed_runner.ui.console import print_status, print_summary
from volembed_runner.ui.progress import RunProgress

from .test_orchestrate import StandInMapper, manifest, run_pass, setup


class FakeClock:
    """Seconds since the epoch that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ticking:
    """A clock that moves `step` seconds each time it is read (the orchestrator's work takes time)."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def piped() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=200), out


def test_a_piped_run_prints_a_status_line_at_least_every_ten_seconds_and_no_more() -> None:
    console, out = piped()
    clock = FakeClock()
    tracker = Tracker(clock)
    progress = RunProgress(console, clock=clock, ticker=False)
    with progress:
        tracker.start("embed", 4, 4, None, None)
        progress.show(tracker.record(None))
        for dt in (3, 3, 3):  # 9 s of silence: nothing yet
            clock.now += dt
            progress.tick()
        assert out.getvalue().splitlines() == ["embed: 4 of 4 shard(s) to run"]
        clock.now += 1
        progress.tick()
        progress.tick()  # once per interval, however often the ticker wakes
        clock.now += 10
        tracker.shard("embed", failed=False, tokens=4000)
        progress.show(tracker.record(None))
        progress.tick()
    lines = out.getvalue().splitlines()
    assert lines[1] == "embed: 0 of 4 shard(s), 10s elapsed"  # the last record's times moved on by the clock
    assert lines[2] == "embed: 1 of 4 shard(s), 200 tokens/s, ETA 1m00s, 20s elapsed"
    assert len(lines) == 3


def test_a_stage_says_what_was_done_before_and_how_it_ended() -> None:
    console, out = piped()
    clock = FakeClock()
    tracker = Tracker(clock)
    progress = RunProgress(console, clock=clock, ticker=False)
    with progress:
        tracker.start("chunk", 5, 2, None, None)
        progress.show(tracker.record(None))
        clock.now += 4
        tracker.shard("chunk", failed=False, tokens=800)
        progress.show(tracker.record(None))
        progress(ShardFinished("chunk", "00004-0000", "StageError: bad row 7", None))
        tracker.shard("chunk", failed=True, tokens=0)
        tracker.finish("chunk", None)
        progress.show(tracker.record(None))
        clock.now += 30
        progress.tick()  # nothing runs: the ticker stays quiet
    assert out.getvalue().splitlines() == [
        "chunk: 2 of 5 shard(s) to run",
        "chunk shard 00004-0000 failed: StageError: bad row 7",
        "chunk: done in 4s, 2 shard(s) run (1 failed), 200 tokens/s",
    ]


def test_the_eta_of_embed_units_counts_their_tokens_not_their_number() -> None:
    clock = FakeClock()
    tracker = Tracker(clock)
    tracker.start("embed", 3, 3, 4000.0, None)  # one big unit and two small ones
    clock.now += 30
    tracker.shard("embed", failed=False, tokens=3000.0)
    entry = tracker.record(None)["stages"]["embed"]
    assert entry["tokens_done"] == 3000 and entry["tokens_todo"] == 4000 and entry["tokens_per_second"] == 100.0
    assert entry["eta_seconds"] == 10.0  # 1,000 tokens left at 100 tokens/s (by units it would say 60 s)


def test_cost_so_far_is_the_meters_and_progress_and_the_manifests_cost_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, root = setup(tmp_path)
    monkeypatch.setattr(finish, "WRITE_EVERY_S", 0.0)  # every record reaches the file, as a poll would find it
    price = StagePrice(usd_per_second=1.0, start_seconds=2.0, max_containers=2)
    budget = Budget(None, {"chunk": price, "embed": price}, tokens_per_second=1e6, source="test prices")
    seen: list[dict[str, Any]] = []

    def on_event(event: Any) -> None:
        if isinstance(event, ShardFinished) and event.stage == "embed" and len(seen) < 1:
            seen.append(manifest(plan, root))  # what `status` reads while the run goes

    outcome = run_pass(plan, root, StandInMapper(plan, root), clock=Ticking(0.5), budget=budget, on_event=on_event)
    assert outcome.ok and outcome.budget is not None and not outcome.over_budget  # no max_cost: never stopped
    (mid,) = seen
    record, cost = mid["progress"], mid["cost"]
    assert record["stage"] == "embed" and record["cost_usd"] == cost["spent_usd"] > 0
    assert record["projected_total_usd"] == cost["projected_total_usd"] and cost["max_cost_usd"] is None
    out = io.StringIO()
    print_status(mid, Console(file=out, force_terminal=False, width=300), now=record["at"] + 5)
    text = out.getvalue()
    assert f"running: embed: 1 of {record['stages']['embed']['total']} shard(s)" in text
    assert f"${cost['spent_usd']:,.2f} so far, projected total ${cost['projected_total_usd']:,.2f} (as of 5s ago)" \
        in text
    assert f"cost: ${cost['spent_usd']:,.2f} so far (no compute.max_cost) (container-seconds × prices)" in text
    final = manifest(plan, root)
    assert final["progress"]["cost_usd"] == final["cost"]["spent_usd"] > cost["spent_usd"]
    stages = final["progress"]["stages"]
    assert stages["chunk"]["cost_usd"] + stages["embed"]["cost_usd"] == pytest.approx(final["cost"]["spent_usd"])


def test_a_local_run_counts_no_cost() -> None:
    clock = FakeClock()
    tracker = Tracker(clock)
    tracker.start("embed", 2, 2, None, None)
    record = tracker.record(None)
    assert record["cost_usd"] is None and record["stages"]["embed"]["cost_usd"] is None
    console, out = piped()
    with RunProgress(console, clock=clock, ticker=False) as progress:
        progress.show(record)
        clock.now += 11
        progress.tick()
    assert "$" not in out.getvalue()


def test_the_ticker_thread_speaks_while_a_shard_runs() -> None:
    console, out = piped()
    tracker = Tracker(time.time)
    with RunProgress(console, every=0.01) as progress:
        tracker.start("embed", 1, 1, None, None)
        progress(Progressed(tracker.record(None)))
        for _ in range(500):  # until the thread has spoken (no assertion on how fast)
            if "elapsed" in out.getvalue():
                break
            time.sleep(0.01)
    assert "embed: 0 of 1 shard(s)" in out.getvalue()


def test_a_terminal_gets_bars_with_tokens_per_second_eta_and_cost() -> None:
    console, out = terminal()
    clock = FakeClock()
    tracker = Tracker(clock)
    with RunProgress(console, clock=clock) as progress:
        tracker.start("embed", 4, 4, None, 0.0)
        clock.now += 10
        tracker.shard("embed", failed=False, tokens=5000)
        progress.show(tracker.record({"spent_usd": 5.0, "projected_total_usd": 20.0}))
    text = out.getvalue()
    assert "embed" in text and "1/4" in text and "500 tokens/s" in text and "ETA 30s" in text and "$5.00" in text


def _polled_run() -> list[dict[str, Any]]:
    """The manifests an attached run's poller reads from the Volume: an earlier run's first, then this run's."""
    clock = FakeClock()
    old = Tracker(clock)
    old.start("embed", 2, 2, None, 0.0)
    old.finish("embed", 9.0)
    manifests = [{"status": "succeeded", "progress": old.record({"spent_usd": 9.0, "projected_total_usd": 9.0})}]
    tracker = Tracker(clock)

    def snapshot() -> None:
        cost = {"spent_usd": round(clock.now - 1000.0, 2) / 100, "projected_total_usd": 1.0}
        manifests.append({"status": "running", "progress": tracker.record(cost)})

    clock.now += 5
    tracker.start("chunk", 3, 3, None, 0.0)
    snapshot()
    manifests.append(manifests[-1])  # read again before the orchestrator wrote anew
    clock.now += 6
    for _ in range(3):
        tracker.shard("chunk", failed=False, tokens=600)
    tracker.finish("chunk", 0.11)
    tracker.start("embed", 5, 4, 8000.0, 0.11)
    clock.now += 4
    tracker.shard("embed", failed=False, tokens=2000)
    snapshot()
    clock.now += 12
    for _ in range(3):
        tracker.shard("embed", failed=False, tokens=2000)
    tracker.finish("embed", 0.27)
    snapshot()
    return manifests


def _follow(console: Console, clock: FakeClock, manifests: list[dict[str, Any]]) -> None:
    reads = iter(manifests)
    with RunProgress(console, clock=clock, ticker=False) as progress:
        poller = ProgressPoller(lambda: next(reads), progress.show)
        poller.prime()  # before the orchestrator is spawned: the earlier run's record
        for _ in manifests[1:]:
            poller.poll()


def test_an_attached_run_draws_bars_from_the_records_it_polls_on_a_terminal() -> None:
    console, out = terminal()
    _follow(console, FakeClock(), _polled_run())
    text = out.getvalue()
    assert "chunk" in text and "3/3" in text and "embed" in text and "5/5" in text and "2/5" in text
    assert "300 tokens/s" in text and "ETA 12s" in text and "$0.16" in text  # embed's own cost: 0.27 - 0.11
    assert "$9.00" not in text  # the earlier run's record is never drawn


def test_an_attached_run_prints_plain_lines_from_the_records_when_piped() -> None:
    console, out = piped()
    _follow(console, FakeClock(), _polled_run())
    assert out.getvalue().splitlines() == [
        "chunk: 3 of 3 shard(s) to run",
        "chunk: done in 6s, 3 shard(s) run, 300 tokens/s, $0.11",
        "embed: 4 of 5 shard(s) to run",
        "embed: done in 16s, 4 shard(s) run, 500 tokens/s, $0.16",
    ]


def test_the_poller_skips_a_failed_read_and_shows_a_record_once() -> None:
    shown: list[dict[str, Any]] = []
    record = {"at": 1.0, "stage": None, "stages": {}}
    reads = iter([None, {"progress": record}, {"progress": record}, {"progress": {**record, "at": 2.0}}])

    def read() -> dict[str, Any] | None:
        value = next(reads)
        if value is None:
            raise OSError("the Volume could not be read")
        return value

    poller = ProgressPoller(read, shown.append)
    for _ in range(4):
        poller.poll()
    assert [r["at"] for r in shown] == [1.0, 2.0]


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


@pytest.mark.parametrize(("terminal_err", "args", "bars"), [(True, [], True), (True, ["--debug"], False),
                                                           (False, [], False)], ids=["terminal", "debug", "piped"])
def test_an_attached_modal_run_draws_bars_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             terminal_err: bool, args: list[str], bars: bool) -> None:
    from typer.testing import CliRunner

    from tests.paid_run import SPEC
    from volembed_runner import cli
    from volembed_runner.backends.modal import launch

    spec = tmp_path / "paid.yaml"
    spec.write_text(SPEC)
    out = io.StringIO()
    monkeypatch.setattr(cli, "err_console", lambda: Console(file=out, force_terminal=terminal_err, width=200))
    clock = FakeClock()
    tracker = Tracker(clock)
    tracker.start("embed", 4, 4, None, 0.0)
    clock.now += 10
    tracker.shard("embed", failed=False, tokens=5000)
    polled = tracker.record({"spent_usd": 1.25, "projected_total_usd": 5.0})
    followed: list[Any] = []

    def run(plan: Any, *, until: Any, detach: bool, on_upload: Any = None, prices: Any = None,
            on_progress: Any = None) -> launch.Launched:
        followed.append(on_progress)
        if on_progress is not None:
            on_progress(polled)  # what the poller read from the Volume
        return launch.Launched(plan.name, "ap-1", None, detached=False, summary={"ok": True, "stages": ["embed"]})

    monkeypatch.setattr(launch, "run", run)
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    result = CliRunner().invoke(cli.app, [str(spec), "--yes", *args])
    assert result.exit_code == 0, result.output
    assert (followed[0] is not None) == bars
    text = out.getvalue()
    assert ("1/4" in text and "500 tokens/s" in text and "$1.25" in text) == bars
    assert ("progress shows once the orchestrator runs" in text) == bars
