"""One writer per run: a lease on (volume, run name) naming its holder, kept alive by a heartbeat.

A lease is a numbered claim. The holder of epoch N owns record N; whoever takes the run next claims record N+1, and
a claim is atomic in the store (a file linked into place, `modal.Dict.put(skip_if_exists=True)`), so of two runs
starting at once exactly one wins. A holder checks that N+1 does not exist before each heartbeat (fencing): a holder
that was taken over stops instead of writing on.

A record says until when its holder may still be writing (`expires_at`): its heartbeat plus a grace period, plus,
while work it submitted may still run elsewhere (Modal inputs keep running when their caller dies), the longest
such work can take. A new run takes over a lease that was released
or has expired; one whose holder stopped beating while its work may still run is waited for (`acquire(wait=...)`)
or refused, never written over, so no shard is ever paid for twice. On one machine, a holder whose process is gone
is expired at once.

Stores: `FileLeaseStore` (a folder on the local volume) here; the Modal backend's `modal.Dict` store lives with the
Modal runtime. The protocol logic is the same for both.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson

from volembed_runner import store
from volembed_runner.errors import RunHeld

HEARTBEAT_S = 5.0  # how often a holder renews its record
GRACE_S = 30.0  # a record whose heartbeat is older than this (and whose work has ended) has expired
KEEP_EPOCHS = 4  # older records are removed by the claimer of a new epoch


@dataclass(frozen=True)
class Holder:
    """Who holds a run: a fresh id per run (one orchestrator pass), where it runs, and since when."""

    run_id: str
    host: str
    pid: int
    backend: str
    started_at: str

    @classmethod
    def here(cls, backend: str) -> Holder:
        """This process, as a new holder."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), backend, now)

    def describe(self) -> str:
        """The holder as a message names it."""
        return f"run {self.run_id} (pid {self.pid} on {self.host}, {self.backend}, since {self.started_at})"


@dataclass(frozen=True)
class LeaseRecord:
    """One epoch of a run's lease as stored."""

    epoch: int
    holder: Holder
    heartbeat_at: float
    expires_at: float
    released: bool = False
    stage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LeaseRecord:
        """Inverse of `to_dict`."""
        return cls(**{**d, "holder": Holder(**d["holder"])})

    def live(self, now: float) -> bool:
        """True while the holder may still be writing (not released, not expired)."""
        return not self.released and now < self.expires_at

    def beating(self, now: float) -> bool:
        """True while the holder's heartbeat is recent (it is alive, not merely waited for)."""
        return not self.released and now < self.heartbeat_at + GRACE_S


class LeaseStore(Protocol):
    """Where a run's lease records live; `claim` must be atomic (create only if absent)."""

    def claim(self, epoch: int, record: dict[str, Any]) -> bool: ...

    def read(self, epoch: int) -> dict[str, Any] | None: ...

    def write(self, epoch: int, record: dict[str, Any]) -> None: ...

    def latest(self) -> int: ...

    def remove(self, epoch: int) -> None: ...


class FileLeaseStore:
    """Lease records as files in one folder of the local volume (`runs/<name>/lease/`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, epoch: int) -> Path:
        return self.folder / f"{epoch:08d}.json"

    def claim(self, epoch: int, record: dict[str, Any]) -> bool:
        """Write record `epoch` only if no one has: a complete temporary file hard-linked into place (atomic)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".claim-", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(orjson.dumps(record))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self._path(epoch))
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    def read(self, epoch: int) -> dict[str, Any] | None:
        """Record `epoch`, or None when there is none."""
        try:
            data: dict[str, Any] = orjson.loads(self._path(epoch).read_bytes())
        except FileNotFoundError:
            return None
        return data

    def write(self, epoch: int, record: dict[str, Any]) -> None:
        """Replace record `epoch` (its holder's heartbeat)."""
        store.write_bytes_atomic(self._path(epoch), orjson.dumps(record))

    def latest(self) -> int:
        """The highest epoch on disk, -1 when none."""
        if not self.folder.is_dir():
            return -1
        epochs = [int(p.stem) for p in self.folder.glob("[0-9]*.json") if p.stem.isdigit()]
        return max(epochs, default=-1)

    def remove(self, epoch: int) -> None:
        """Forget an old record."""
        self._path(epoch).unlink(missing_ok=True)


def current(lease_store: LeaseStore) -> LeaseRecord | None:
    """The newest record of a run's lease (whoever holds it, or held it last), or None if never taken."""
    epoch = lease_store.latest()
    while lease_store.read(epoch + 1) is not None:  # the hint may lag behind a claim
        epoch += 1
    data = lease_store.read(epoch) if epoch >= 0 else None
    return None if data is None else LeaseRecord.from_dict(data)


def _process_gone(holder: Holder) -> bool:
    """True when the holder ran on this machine and its process no longer exists."""
    if holder.host != socket.gethostname() or holder.backend != "local":
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def holder_gone(holder: Holder) -> bool:
    """True when the holder ran on this machine and its process is gone, or exited and awaits reaping (a zombie
    never writes again): how `status` tells a killed local run at once, without waiting out its heartbeat."""
    same_machine = holder.host == socket.gethostname() and holder.backend == "local"
    return _process_gone(holder) or (same_machine and store.is_zombie(holder.pid))


class Lease:
    """A held lease: renew it with `heartbeat`, give it back with `release` (or use `keep` for both)."""

    def __init__(self, lease_store: LeaseStore, record: LeaseRecord, clock: Callable[[], float],
                 work_seconds: float = 0.0) -> None:
        self.store = lease_store
        self.record = record
        self.clock = clock
        self.work_seconds = work_seconds
        self.busy = False
        self._lock = threading.Lock()

    @classmethod
    def acquire(
        cls,
        lease_store: LeaseStore,
        holder: Holder,
        *,
        work_seconds: float = 0.0,
        wait: float = 0.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Lease:
        """Take the run's lease; raise RunHeld when another holder is alive, or its work may still run past `wait`
        seconds from now (a stopped holder's in-flight work is waited for, up to `wait`).

        `work_seconds` is the longest one piece of this holder's submitted work may run where its own death does not
        stop it (0 when only this process and its children write).
        """
        deadline = clock() + wait
        while True:
            now = clock()
            last = current(lease_store)
            if last is not None and last.live(now) and not _process_gone(last.holder):
                if _refused(last, now, deadline):
                    raise RunHeld(_held_message(last, now))
                sleep(min(last.expires_at - now, 60.0))
                continue
            epoch = last.epoch + 1 if last is not None else 0
            record = LeaseRecord(epoch, holder, now, now + GRACE_S)
            if not lease_store.claim(epoch, record.to_dict()):
                continue  # another run claimed this epoch first: look again (it is now the holder)
            if epoch >= KEEP_EPOCHS:
                with suppress(OSError):
                    lease_store.remove(epoch - KEEP_EPOCHS)
            return cls(lease_store, record, clock, work_seconds)

    def heartbeat(self, stage: str | None = None) -> None:
        """Renew the record; raise RunHeld if another run has taken the lease over (then this one must stop)."""
        with self._lock:
            newer = self.store.read(self.record.epoch + 1)
            if newer is not None:
                taker = LeaseRecord.from_dict(newer).holder
                raise RunHeld(f"this run was taken over by {taker.describe()}; stopping")
            now = self.clock()
            expires = now + GRACE_S + (self.work_seconds if self.busy else 0.0)
            self.record = replace(self.record, heartbeat_at=now, expires_at=expires,
                                  stage=stage if stage is not None else self.record.stage)
            self.store.write(self.record.epoch, self.record.to_dict())

    def release(self) -> None:
        """Give the lease back: the next run may take it at once."""
        with self._lock:
            if self.store.read(self.record.epoch + 1) is not None:
                return
            self.record = replace(self.record, released=True, heartbeat_at=self.clock())
            self.store.write(self.record.epoch, self.record.to_dict())


def _refused(last: LeaseRecord, now: float, deadline: float) -> bool:
    """True when a live record refuses a new holder: its holder beats, or its work may run past `deadline`."""
    return last.beating(now) or last.expires_at > deadline


def check_free(lease_store: LeaseStore, *, wait: float = 0.0, clock: Callable[[], float] = time.time) -> None:
    """Raise RunHeld (naming the holder) when `Lease.acquire(..., wait=wait)` would refuse now; take nothing.

    What a launcher asks before it starts anything, so a second launch of a live run stops with one line."""
    now = clock()
    last = current(lease_store)
    if last is not None and last.live(now) and not _process_gone(last.holder) and _refused(last, now, now + wait):
        raise RunHeld(_held_message(last, now))


def _held_message(last: LeaseRecord, now: float) -> str:
    """One line naming the live holder and what to do about it."""
    seen = now - last.heartbeat_at
    if last.beating(now):
        return (f"this run is being written by {last.holder.describe()}, heartbeat {seen:.0f} s ago"
                + (f", at stage {last.stage}" if last.stage else "")
                + "; wait for it to finish (`volembed-run status SPEC`) or stop it")
    left = last.expires_at - now
    return (f"the last writer of this run, {last.holder.describe()}, stopped {seen:.0f} s ago while its work may "
            f"still be running for up to {left:.0f} s; run again after that, so no shard is embedded twice")


class Keeper:
    """Holds a lease for the length of a `with` block, renewing it from a background thread every HEARTBEAT_S."""

    def __init__(self, lease: Lease, interval: float = HEARTBEAT_S) -> None:
        self.lease = lease
        self.interval = interval
        self.lost: RunHeld | None = None
        self.stage: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="volembed-lease", daemon=True)

    def __enter__(self) -> Keeper:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        if self.lost is not None:
            return
        with suppress(OSError, RunHeld):
            if self.lease.busy:  # left with work in flight (a hand-over): the next run waits for that work
                self.lease.heartbeat(self.stage)
            else:
                self.lease.release()

    def check(self) -> None:
        """Raise RunHeld if the lease was lost (another run took over): the caller stops writing."""
        if self.lost is not None:
            raise self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lease.heartbeat(self.stage)
            except RunHeld as exc:
                self.lost = exc
                return
            except OSError:
                continue  # a failed write is retried at the next beat; the record expires if they all fail


@contextmanager
def held(lease_store: LeaseStore, holder: Holder, *, work_seconds: float = 0.0, wait: float = 0.0,
         interval: float = HEARTBEAT_S) -> Iterator[Keeper]:
    """Acquire the run's lease and keep it for the block (released at its end, even on error)."""
    lease = Lease.acquire(lease_store, holder, work_seconds=work_seconds, wait=wait)
    with Keeper(lease, interval) as keeper:
        yield keeper
