"""What the generated Modal app runs inside its containers, kept here so it is the code the tests run.

* `ModalMapper` adapts `Function.map(order_outputs=False, return_exceptions=True)` to the orchestrator's `Mapper`:
  results come back in completion order without their inputs, so every stage function returns its key with its
  result and raises `ShardFailed` carrying that key; failures Modal reports without one (timeouts, lost containers)
  are matched to the inputs left without a result once the map ends.
* `TEIRouter` starts `text-embeddings-router`, forwards its log, waits until its port accepts and fails fast when it
  exits or falls back to CPU.
"""

from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from volembed_runner.errors import describe

T = TypeVar("T")

# TEI 1.9.x CUDA images are built on CUDA 12.9.1; an older driver needs the image's forward-compat libraries.
TEI_IMAGE_CUDA = (12, 9)
CUDA_COMPAT_DIR = "/usr/local/cuda/compat"
# TEI logs this when CUDA init fails, then serves from the CPU (reference/tei.md §0.5): a silent 100x slowdown.
CPU_FALLBACK_MARKER = "Using CPU instead"
LOG_TAIL_LINES = 20


class ShardFailed(Exception):
    """A stage function failed on one input; carries the input's key so the result can be paired with it."""

    def __init__(self, key: str, error: str) -> None:
        super().__init__(key, error)
        self.key = key
        self.error = error

    def __str__(self) -> str:
        return self.error


@contextmanager
def shard_errors(key: str) -> Iterator[None]:
    """Re-raise any failure in the block as `ShardFailed(key, ...)`; Modal still retries it, then returns it."""
    try:
        yield
    except Exception as exc:
        raise ShardFailed(key, describe(exc)) from exc


def pair(inputs: Mapping[str, T], results: Iterable[Any]) -> Iterator[tuple[T, Any]]:
    """Match `{"key", "result"}` dicts and `ShardFailed`s to their inputs as they arrive, the rest at the end.

    Exceptions without a key (Modal's timeouts, container losses, undeserializable errors) are given to the inputs
    that got no result, in input order: the set of failed inputs is exact; when several such failures have
    different causes, which cause belongs to which input is not known, and the message says so.
    """
    pending = dict(inputs)
    anonymous: list[BaseException] = []
    for item in results:
        key = item.get("key") if isinstance(item, dict) else getattr(item, "key", None)
        if isinstance(key, str) and key in pending:
            yield pending.pop(key), (item if isinstance(item, BaseException) else item.get("result"))
        elif isinstance(item, BaseException):
            anonymous.append(item)
        else:
            anonymous.append(RuntimeError(f"a result for an unknown input came back: {str(item)[:200]}"))
    causes = sorted({describe(exc) for exc in anonymous})
    for i, (key, value) in enumerate(pending.items()):
        if i >= len(anonymous):
            yield value, ShardFailed(key, "RuntimeError: no result came back for this input")
        elif len(causes) > 1:
            yield value, ShardFailed(key, f"one of {len(anonymous)} failures Modal returned without an input id: "
                                          f"{'; '.join(causes)}")
        else:
            yield value, anonymous[i]


class Mappable(Protocol):
    """A Modal Function (or a stand-in) with `.map`."""

    def map(self, *iterables: Iterable[Any], order_outputs: bool = ..., return_exceptions: bool = ...) -> Any: ...


class Committable(Protocol):
    """A mounted Modal Volume (or a stand-in)."""

    def commit(self) -> None: ...


class Task(Protocol):
    """A download task: JSON-able through `to_dict` (`volembed_runner.sources.SourceTask`)."""

    def to_dict(self) -> dict[str, Any]: ...


class ModalMapper:
    """The orchestrator's Mapper on Modal: one `.map` per stage, never over an empty list, results paired by key.

    After each map the Volume is committed, which also reloads it: the orchestrator then sees the files the stage
    containers committed, and `volembed-run status` sees the manifest it wrote.
    """

    def __init__(
        self, *, download: Mappable, chunk: Mappable, embed: Mappable, volume: Committable | None = None
    ) -> None:
        self._download = download
        self._chunk = chunk
        self._embed = embed
        self._volume = volume

    def download(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Any]]:
        """Map `download(key, task_dict)` over source tasks; keys are the tasks' positions."""
        tasks = list(tasks)
        keys = [str(i) for i in range(len(tasks))]
        yield from self._map(self._download, dict(zip(keys, tasks, strict=True)), keys, [t.to_dict() for t in tasks])

    def chunk(self, shards: Iterable[tuple[str, int | None]]) -> Iterator[tuple[str, Any]]:
        """Map `chunk(shard, max_rows)` over source shards."""
        shards = list(shards)
        ids = [shard for shard, _ in shards]
        yield from self._map(self._chunk, {s: s for s in ids}, ids, [cap for _, cap in shards])

    def embed(self, shards: Iterable[str]) -> Iterator[tuple[str, Any]]:
        """Map `Embedder.embed(shard)` over chunk shards."""
        shards = list(shards)
        yield from self._map(self._embed, {s: s for s in shards}, list(shards))

    def _map(self, fn: Mappable, inputs: dict[str, T], *iterables: Sequence[Any]) -> Iterator[tuple[T, Any]]:
        if not inputs:
            return
        if len(inputs) != len(iterables[0]):
            raise ValueError(f"duplicate input keys: {len(iterables[0])} inputs, {len(inputs)} distinct")
        try:
            yield from pair(inputs, fn.map(*iterables, order_outputs=False, return_exceptions=True))
        finally:
            if self._volume is not None:
                self._volume.commit()


class DictLeaseStore:
    """A run's lease records (`volembed_runner.lease`) in a `modal.Dict`, whose `put(..., skip_if_exists=True)` is the
    atomic create-if-absent a claim needs (modal 1.6.4 `dict.py` `_Dict.put`: True only when it wrote). Keys are
    `<volume>/<run>/<epoch>`, plus `<volume>/<run>/latest`, a hint of the newest epoch."""

    def __init__(self, entries: Any, run: str) -> None:
        self.entries = entries
        self.run = run

    def _key(self, epoch: int) -> str:
        return f"{self.run}/{epoch:08d}"

    def claim(self, epoch: int, record: dict[str, Any]) -> bool:
        """Write record `epoch` only if it does not exist."""
        if not self.entries.put(self._key(epoch), record, skip_if_exists=True):
            return False
        self.entries.put(f"{self.run}/latest", epoch)
        return True

    def read(self, epoch: int) -> dict[str, Any] | None:
        """Record `epoch`, or None."""
        value: dict[str, Any] | None = self.entries.get(self._key(epoch))
        return value

    def write(self, epoch: int, record: dict[str, Any]) -> None:
        """Replace record `epoch` (its holder's heartbeat)."""
        self.entries.put(self._key(epoch), record)

    def latest(self) -> int:
        """The newest epoch claimed (a hint: `lease.current` looks past it), -1 when none."""
        return int(self.entries.get(f"{self.run}/latest", -1))

    def remove(self, epoch: int) -> None:
        """Forget an old record."""
        self.entries.pop(self._key(epoch), None)


def follow_handovers(
    summary: dict[str, Any], get: Callable[[str], dict[str, Any]], limit: int = 1000
) -> dict[str, Any]:
    """Wait through the chain of orchestrator calls (each hands over to the next before its 24 h limit)."""
    for _ in range(limit):
        next_call = summary.get("next_call")
        if not next_call:
            return summary
        summary = get(next_call)
    raise RuntimeError(f"gave up following orchestrator hand-overs after {limit} calls")


def sync_volume(volume: Any, *, reload: bool = False) -> None:
    """Commit (or reload) a Volume from async code without yielding to the event loop.

    Concurrent inputs of one container touch Volume files only between awaits, so while this blocks none has a
    file open; awaiting `.aio()` instead would let another input open a file mid-reload ("volume busy").
    """
    from modal.exception import AsyncUsageWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AsyncUsageWarning)
        volume.reload() if reload else volume.commit()


def cuda_driver_version(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The CUDA version the driver supports, from `nvidia-smi`'s header (`CUDA Version: 12.8`), or None."""
    found = re.search(r"CUDA(?: UMD)? Version:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return (int(found.group(1)), int(found.group(2))) if found else None


def router_env(base: Mapping[str, str], nvidia_smi_output: str | None) -> dict[str, str]:
    """The router's environment: the image's CUDA forward-compat libraries first when the driver is older."""
    env = dict(base)
    version = cuda_driver_version(nvidia_smi_output or "")
    if version is not None and version < TEI_IMAGE_CUDA:
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (CUDA_COMPAT_DIR, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def nvidia_smi() -> str | None:
    """`nvidia-smi`'s output, or None where there is none."""
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def port_open(host: str, port: int) -> bool:
    """True once something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


class TEIRouter:
    """A `text-embeddings-router` subprocess whose log is forwarded to this container's stdout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.cpu_fallback = False
        self._reader = threading.Thread(target=self._forward, name="tei-log", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        *,
        port: int,
        timeout: float,
        host: str = "127.0.0.1",
        executable: Sequence[str] = ("text-embeddings-router",),
        env: Mapping[str, str] | None = None,
        poll_s: float = 0.5,
    ) -> TEIRouter:
        """Start the router and return once its port accepts (TEI binds only after loading and warming up)."""
        env = router_env(os.environ if env is None else env, nvidia_smi())
        proc = subprocess.Popen([*executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        router = cls(proc)
        deadline = time.monotonic() + timeout
        while not (ready := port_open(host, port)):
            if proc.poll() is not None:
                router._reader.join(timeout=5)
                raise RuntimeError(f"text-embeddings-router exited with code {proc.returncode} before it was ready; "
                                   f"last log lines: {router.last_lines()}")
            if router.cpu_fallback or time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        if router.cpu_fallback:
            router.stop()
            raise RuntimeError("text-embeddings-router found no usable CUDA device and fell back to the CPU; "
                               f"last log lines: {router.last_lines()}")
        if not ready:
            router.stop()
            raise TimeoutError(f"text-embeddings-router did not accept connections on {host}:{port} within "
                               f"{timeout:.0f} s; last log lines: {router.last_lines()}")
        return router

    def last_lines(self, n: int = 5) -> str:
        """The router's last log lines, joined on one line."""
        return " | ".join(list(self.tail)[-n:]) or "(none)"

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the router (kill it after `grace_s`)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace_s)
        self._reader.join(timeout=grace_s)

    def _forward(self) -> None:
        if self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.tail.append(line.strip())
            if CPU_FALLBACK_MARKER in line:
                self.cpu_fallback = True
        self.proc.stdout.close()
