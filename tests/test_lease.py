"""One writer per run: the lease both backends hold while a pass writes (`volembed_runner.lease`)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from volembed_runner import store
from volembed_runner.errors import RunHeld
from volembed_runner.lease import GRACE_S, FileLeaseStore, Holder, Keeper, Lease, current, held


class Clock:
    """A clock the test moves by hand, and a `sleep` that moves it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def remote_holder() -> Holder:
    """A holder on another machine (its process cannot be checked from here)."""
    return replace(Holder.here("modal"), host="elsewhere", pid=1)


def test_a_second_writer_is_refused_and_told_who_holds_the_run(tmp_path: Path) -> None:
    leases = FileLeaseStore(tmp_path)
    with held(leases, Holder.here("local")), pytest.raises(RunHeld) as refused:
        Lease.acquire(leases, Holder.here("local"))
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "heartbeat" in message and "\n" not in message
    assert current(leases).released  # the first run gave the lease back when its block ended
    Lease.acquire(leases, Holder.here("local"))  # so the next run takes it at once


def test_of_many_runs_starting_at_once_exactly_one_gets_the_lease(tmp_path: Path) -> None:
    leases = FileLeaseStore(tmp_path)
    barrier = threading.Barrier(8)
    won: list[Lease] = []
    refused: list[RunHeld] = []

    def start() -> None:
        barrier.wait()
        try:
            won.append(Lease.acquire(leases, remote_holder()))
        except RunHeld as exc:
            refused.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7
    assert current(leases).holder == won[0].record.holder


def test_a_lease_whose_process_died_on_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leases = FileLeaseStore(tmp_path)
    Lease.acquire(leases, replace(Holder.here("local"), pid=int(dead.stdout)))  # never released: a kill -9
    taker = Lease.acquire(leases, Holder.here("local"))
    assert taker.record.epoch == 1 and current(leases).holder.pid == os.getpid()


def test_a_silent_remote_holder_expires_after_the_grace_period(tmp_path: Path) -> None:
    clock, leases = Clock(), FileLeaseStore(tmp_path)
    Lease.acquire(leases, remote_holder(), clock=clock)
    clock.now += GRACE_S - 1
    with pytest.raises(RunHeld):
        Lease.acquire(leases, remote_holder(), clock=clock)
    clock.now += 2
    assert Lease.acquire(leases, remote_holder(), clock=clock).record.epoch == 1


def test_work_still_in_flight_is_waited_for_never_written_over(tmp_path: Path) -> None:
    clock, leases = Clock(), FileLeaseStore(tmp_path)
    dead = Lease.acquire(leases, remote_holder(), clock=clock, work_seconds=3600)
    dead.busy = True  # it had inputs running on other containers when it stopped beating
    dead.heartbeat()
    clock.now += GRACE_S + 1
    with pytest.raises(RunHeld, match="may still be running"):
        Lease.acquire(leases, remote_holder(), clock=clock, sleep=clock.sleep, wait=60)
    successor = Lease.acquire(leases, remote_holder(), clock=clock, sleep=clock.sleep, wait=4000)
    assert sum(clock.slept) >= 3600 - GRACE_S - 1  # it waited until that work must have ended
    assert successor.record.epoch == 1


def test_a_holder_that_was_taken_over_stops(tmp_path: Path) -> None:
    clock, leases = Clock(), FileLeaseStore(tmp_path)
    old = Lease.acquire(leases, remote_holder(), clock=clock)
    clock.now += GRACE_S + 1  # it stalled (a paused VM) past its grace period
    Lease.acquire(leases, remote_holder(), clock=clock)
    with pytest.raises(RunHeld, match="taken over"):
        old.heartbeat()
    keeper = Keeper(old, interval=0.01)
    with keeper:
        threading.Event().wait(0.1)
    with pytest.raises(RunHeld):
        keeper.check()
    assert not current(leases).released  # the stalled holder's exit did not release the new holder's lease


def test_cleanup_removes_only_dead_writers_temporaries(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    shard = tmp_path / "shard-00000-0000.parquet"
    live = tmp_path / f".{shard.name}.{store.writer_tag()}.abc123.tmp"
    gone = tmp_path / f".{shard.name}.{store.writer_tag().rsplit('-', 1)[0]}-{dead.stdout.strip()}.def456.tmp"
    remote = tmp_path / f".{shard.name}.other_host-12.ghi789.tmp"
    for path in (live, gone, remote):
        path.write_bytes(b"partial")
    store.remove_stale_temporaries(shard)
    assert live.exists() and remote.exists() and not gone.exists()


def test_cleanup_counts_a_killed_but_unreaped_writer_as_gone(tmp_path: Path) -> None:
    """A run killed with its workers leaves zombies until they are reaped; a rerun at once still cleans up."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[-1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    shard = tmp_path / "shard-00000-0000.parquet"
    left = tmp_path / f".{shard.name}.{store.writer_tag().rsplit('-', 1)[0]}-{zombie.pid}.abc123.tmp"
    left.write_bytes(b"partial")
    store.remove_stale_temporaries(shard)
    zombie.wait()
    assert not left.exists()
