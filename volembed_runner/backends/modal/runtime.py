"""What the generated Modal app runs inside its containers, kept here so it is the code the tests run.

* `shard_errors` decides what Modal retries. Modal's `Retries` retry whatever a function raises (modal 1.6.4
  `parallel_map.py`: every status but TERMINATED is retried), so a stage *returns* a deterministic failure (invalid
  data, a rejected input: `errors.is_transient` is False) as `{"key", "error"}`, failing once with its cause, and
  raises only a transient one (I/O, TEI unavailable) as `ShardFailed` for Modal to retry.
* `ModalMapper` adapts `Function.starmap.aio(order_outputs=False, return_exceptions=True)` to the orchestrator's
  `Mapper`. It pulls inputs lazily through a window (an async generator paced by a semaphore: `.map` itself reads
  its input iterator eagerly into an unbounded queue), so the orchestrator's feed can stop at its deadline and
  every input in flight drains before a hand-over. Results come back in completion order with their keys; failures
  Modal reports without one (timeouts, lost containers) go to the inputs left without a result.
* `TEIRouter` starts `text-embeddings-router` (logging at warn), forwards its log, waits until its port accepts and
  fails fast when it exits or falls back to CPU.
* `probe_sample` is the GPU probe's body (`volembed-run calibrate` on Modal): a sample of the job's chunks embedded
  once to warm up, then timed, so the rate excludes cold start, model load and first-batch compilation.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from volembed_runner.errors import describe, is_transient
from volembed_runner.orchestrate import drive

T = TypeVar("T")

# TEI 1.9.x CUDA images are built on CUDA 12.9.1; an older driver needs the image's forward-compat libraries.
TEI_IMAGE_CUDA = (12, 9)
CUDA_COMPAT_DIR = "/usr/local/cuda/compat"
# TEI logs this when CUDA init fails, then serves from the CPU ("Could not find a compatible CUDA device on host …
# Using CPU instead", backends/candle/src/lib.rs of TEI v1.9.3): a silent 100x slowdown.
CPU_FALLBACK_MARKER = "Using CPU instead"
LOG_TAIL_LINES = 20
# The router logs every request at info, and every line is forwarded to Modal's logs; warnings and errors (the CPU
# fallback among them: TEI's candle backend logs it with tracing::warn!) still come through.
ROUTER_LOG_LEVEL = "warn"
# The server's bound on a map's inputs without a final output, when it sends none (modal 1.6.4 parallel_map.py):
# a window above it would queue inputs client-side that a deadline could no longer hold back.
MAX_INPUTS_OUTSTANDING = 1000


class ShardFailed(Exception):
    """A stage function failed on one input; carries the input's key so the result can be paired with it, and, for
    a failure another attempt cannot fix, the exit status its error has locally (3: an unreadable row)."""

    def __init__(self, key: str, error: str, exit_code: int | None = None) -> None:
        super().__init__(key, error, exit_code)  # all three survive pickling (Exception re-creates from args)
        self.key = key
        self.error = error
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.error


@dataclass
class Reply:
    """What a stage function returns for one input: its key with the result, or with a deterministic failure."""

    key: str
    result: Any = None
    error: str | None = None
    exit_code: int | None = None  # of the error, as the CLI would exit with it locally

    def to_dict(self) -> dict[str, Any]:
        """`{"key", "result"}`, or `{"key", "error", "exit_code"}` for an input that failed for good."""
        if self.error:
            return {"key": self.key, "error": self.error, "exit_code": self.exit_code}
        return {"key": self.key, "result": self.result}


@contextmanager
def shard_errors(key: str) -> Iterator[Reply]:
    """The block's outcome as a `Reply`: a transient failure is raised as `ShardFailed(key, ...)` so Modal retries
    it; a deterministic one is recorded in the reply, so the function returns it and Modal does not retry."""
    reply = Reply(key)
    try:
        yield reply
    except Exception as exc:
        if is_transient(exc):
            raise ShardFailed(key, describe(exc)) from exc
        reply.error, reply.exit_code = describe(exc), getattr(exc, "exit_code", 1)


def pair(inputs: MutableMapping[str, T], results: Iterable[Any]) -> Iterator[tuple[T, Any]]:
    """Match `{"key", "result"}` / `{"key", "error"}` replies and `ShardFailed`s to their inputs as they arrive.

    `inputs` may grow while results arrive (a lazy feed); each input is removed as it gets its result. Exceptions
    without a key (Modal's timeouts, container losses, undeserializable errors) are given to the inputs that got no
    result, in input order: the set of failed inputs is exact; when several such failures have different causes,
    which cause belongs to which input is not known, and the message says so.
    """
    pending = inputs
    anonymous: list[BaseException] = []
    for item in results:
        key = item.get("key") if isinstance(item, dict) else getattr(item, "key", None)
        if isinstance(key, str) and key in pending:
            value = pending.pop(key)
            if isinstance(item, BaseException):
                yield value, item
            elif item.get("error"):
                code = item.get("exit_code")
                yield value, ShardFailed(key, str(item["error"]), code if isinstance(code, int) else 1)
            else:
                yield value, item.get("result")
        elif isinstance(item, BaseException):
            anonymous.append(item)
        else:
            anonymous.append(RuntimeError(f"a result for an unknown input came back: {str(item)[:200]}"))
    causes = sorted({describe(exc) for exc in anonymous})
    for i, (key, value) in enumerate(list(pending.items())):
        if i >= len(anonymous):
            yield value, ShardFailed(key, "RuntimeError: no result came back for this input")
        elif len(causes) > 1:
            yield value, ShardFailed(key, f"one of {len(anonymous)} failures Modal returned without an input id: "
                                          f"{'; '.join(causes)}")
        else:
            yield value, anonymous[i]


class Mappable(Protocol):
    """A Modal Function (or a stand-in) with `.starmap.aio`."""

    starmap: Any


class Syncable(Protocol):
    """A mounted Modal Volume (or a stand-in)."""

    def commit(self) -> None: ...

    def reload(self) -> None: ...


class Task(Protocol):
    """A download task: JSON-able through `to_dict` (`volembed_runner.sources.SourceTask`)."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Windows:
    """Inputs each stage keeps in flight: enough to fill its containers, never more (so a deadline holds)."""

    download: int
    chunk: int
    embed: int


class ModalMapper:
    """The orchestrator's Mapper on Modal: one lazy `.starmap` per stage, results paired by key.

    Each stage's inputs are pulled from the orchestrator's feed only as its window has room, so when the feed stops
    (the hand-over deadline) nothing more is submitted and the map ends once what is in flight has drained. After
    each map the Volume is committed, then reloaded: `commit()` reloads only when the server asks it to (modal 1.6.4
    `volume.py`: `skip_reload`, set for mounts with background commits), and the orchestrator must see the files the
    stage containers committed before it looks for the next stage's work.
    """

    def __init__(self, *, download: Mappable, chunk: Mappable, embed: Mappable, windows: Windows,
                 volume: Syncable | None = None, index: Mappable | None = None) -> None:
        self._download = download
        self._chunk = chunk
        self._embed = embed
        self._index = index
        self._windows = windows
        self._volume = volume

    def download(self, tasks: Iterator[Task]) -> Iterator[tuple[Task, Any]]:
        """Map `download(key, task_dict)` over source tasks; keys are the tasks' positions in the feed."""
        keys = map(str, itertools.count())
        return self._map(self._download, tasks, lambda task: next(keys), lambda key, task: (key, task.to_dict()),
                         self._windows.download)

    def chunk(self, shards: Iterator[tuple[str, int | None]]) -> Iterator[tuple[str, Any]]:
        """Map `chunk(shard, max_rows)` over source shards."""
        results = self._map(self._chunk, shards, lambda item: item[0], lambda key, item: item,
                            self._windows.chunk)
        return ((shard, result) for (shard, _), result in results)

    def embed(self, units: Iterator[str]) -> Iterator[tuple[str, Any]]:
        """Map `Embedder.embed(unit)` over embed units."""
        return self._map(self._embed, units, lambda unit: unit, lambda key, unit: (unit,), self._windows.embed)

    def index(self, keys: Iterator[str]) -> Iterator[tuple[str, Any]]:
        """Call the app's `index(key)` for the run's one index: its LanceDB table, or a late-interaction run's token
        index."""
        if self._index is None:
            raise ValueError("this app has no index function; render it again from the spec")
        return self._map(self._index, keys, lambda key: key, lambda key, item: (key,), 1)

    def _map(self, fn: Mappable, feed: Iterator[T], key_of: Callable[[T], str],
             args_of: Callable[[str, T], tuple[Any, ...]], window: int) -> Iterator[tuple[T, Any]]:
        first = next(feed, None)
        if first is None:
            return
        fed: dict[str, T] = {}  # inputs in flight, by key
        seen: set[str] = set()

        async def source() -> AsyncIterator[tuple[Any, ...]]:
            item: T | None = first
            while True:
                await room.acquire()
                item = item if item is not None else next(feed, None)  # the feed says no more at the deadline
                if item is None:
                    return
                key = key_of(item)
                if key in seen:
                    raise ValueError(f"input {key} was fed twice")
                seen.add(key)
                fed[key] = item
                yield args_of(key, item)
                item = None

        async def outputs() -> AsyncIterator[Any]:
            async for output in fn.starmap.aio(source(), order_outputs=False, return_exceptions=True):
                room.release()
                yield output

        room = asyncio.Semaphore(max(1, min(window, MAX_INPUTS_OUTSTANDING)))
        try:
            yield from pair(fed, drive(outputs()))
        finally:
            if self._volume is not None:
                sync_volume(self._volume)
                sync_volume(self._volume, reload=True)


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
    """Commit (or reload) a Volume, also from async code without yielding to the event loop; a failure is an OSError
    (transient: the input is retried).

    Concurrent inputs of one container touch Volume files only between awaits, so while this blocks none has a
    file open; awaiting `.aio()` instead would let another input open a file mid-reload ("volume busy"). modal 1.6.4
    `volume.py` raises RuntimeError for a conflict, a missing Volume or open files.
    """
    from modal.exception import AsyncUsageWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AsyncUsageWarning)
        try:
            volume.reload() if reload else volume.commit()
        except RuntimeError as exc:
            raise OSError(f"Volume {'reload' if reload else 'commit'} failed: {describe(exc)}") from exc


class ProbeClient(Protocol):
    """The TEI client as the probe uses it (`volembed_runner.embedders.tei.TEIClient`)."""

    async def info(self) -> Any: ...

    async def embed(self, texts: list[str], n_tokens: list[int]) -> Any: ...


async def probe_sample(client: ProbeClient, texts: list[str], n_tokens: list[int], keep: int) -> dict[str, Any]:
    """Embed `texts` once to warm up, then again timed; returns both timings and the first `keep` vectors.

    The warm-up pass sends the same requests as the timed one, so every batch shape the router meets in the timed
    pass has been run once (TEI's own start-up warm-up covers only its maximum batch)."""
    started = time.perf_counter()
    await client.info()
    await client.embed(texts, n_tokens)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    vectors = await client.embed(texts, n_tokens)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "warmup_seconds": warmup, "chunks": len(texts),
            "vectors": [list(map(float, row)) for row in vectors[:keep]]}


def cuda_driver_version(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The CUDA version the driver supports, from `nvidia-smi`'s header (`CUDA Version: 12.8`), or None."""
    found = re.search(r"CUDA(?: UMD)? Version:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return (int(found.group(1)), int(found.group(2))) if found else None


def router_env(base: Mapping[str, str], nvidia_smi_output: str | None) -> dict[str, str]:
    """The router's environment: logging at warn unless set, the image's CUDA forward-compat libraries first when
    the driver is older."""
    env = dict(base)
    env.setdefault("LOG_LEVEL", ROUTER_LOG_LEVEL)
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
