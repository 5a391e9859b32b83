"""Async client for one Hugging Face TEI 1.9 server: packs chunks into requests that fit its limits, keeps it busy.

TEI 1.9 fails a whole request on any bad input, answers 429 at once when texts in flight exceed its permits and 413
above its payload limit, so the client packs by texts, tokens and bytes, shares one in-flight budget per server,
retries transient failures with a bound, splits batches the server rejects, and never drops a chunk silently.
Every 200 answer goes through `embedders.vectors` (numbers only, one vector per text, the run's one dimension,
finite, unit norm when normalized) and `/info` must name the expected model before any text is sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np
import orjson

from volembed_runner.embedders.vectors import VectorCheck, parse_vectors_json
from volembed_runner.errors import EmbedderError, EmbedderUnavailable, TextsFailedError
from volembed_runner.redact import public_url

log = logging.getLogger(__name__)

# TEI 1.9 router defaults, used when /info leaves a field out (router/src/main.rs of
# https://github.com/huggingface/text-embeddings-inference/tree/v1.9.3).
DEFAULT_MAX_CLIENT_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_MAX_INPUT_LENGTH = 512
DEFAULT_MAX_CONCURRENT_REQUESTS = 512

_SPLIT_STATUSES = frozenset({413, 422, 424})
_JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class TEIInfo:
    """What a TEI server reports on `GET /info`: the limits that decide packing, and who it is.

    `model_id` is TEI's `--model-id` argument verbatim (a Hub id, or a folder such as `/models/<slug>`),
    `model_sha` its `--revision` argument verbatim (None when not given), `served_model_name` its
    `--served-model-name` (default: `model_id`) (router/src/lib.rs:320-336 and router/src/main.rs:239-241 at v1.9.3).
    """

    max_client_batch_size: int
    max_batch_tokens: int
    max_input_length: int
    max_concurrent_requests: int
    model_id: str | None = None
    version: str | None = None
    model_sha: str | None = None
    served_model_name: str | None = None
    model_dtype: str | None = None
    auto_truncate: bool | None = None
    sha: str | None = None
    docker_label: str | None = None

    def identity(self) -> dict[str, Any]:
        """The fields that say which model and which server build made the vectors (for the manifest)."""
        return {"model_id": self.model_id, "model_sha": self.model_sha, "served_model_name": self.served_model_name,
                "model_dtype": self.model_dtype, "version": self.version, "sha": self.sha,
                "docker_label": self.docker_label}


@dataclass
class TEIStats:
    """Counters over the client's life: successful requests, retries (with causes), splits, texts and tokens."""

    requests: int = 0
    retries: int = 0
    splits: int = 0
    texts: int = 0
    tokens: int = 0
    truncated: int = 0
    retry_causes: Counter[str] = field(default_factory=Counter)


def pack_requests(
    n_tokens: Sequence[int], sizes: Sequence[int], *, max_texts: int, max_tokens: int, max_bytes: int
) -> list[list[int]]:
    """Group text indices, shortest first, into requests of ≤ max_texts, ≤ max_tokens and ≤ max_bytes each.

    `sizes` are the JSON-encoded byte sizes of the texts; a comma between texts counts as one byte. A text over the
    token or byte budget on its own goes alone.
    """
    order = sorted(range(len(n_tokens)), key=n_tokens.__getitem__)
    batches: list[list[int]] = []
    batch: list[int] = []
    tokens = 0
    nbytes = 0
    for i in order:
        t = n_tokens[i]
        b = sizes[i] + (1 if batch else 0)
        if batch and (len(batch) >= max_texts or tokens + t > max_tokens or nbytes + b > max_bytes):
            batches.append(batch)
            batch, tokens, nbytes, b = [], 0, 0, sizes[i]
        batch.append(i)
        tokens += t
        nbytes += b
    if batch:
        batches.append(batch)
    return batches


class _InFlight:
    """A FIFO budget of texts and requests in flight, shared by every `embed` call on one client."""

    def __init__(self, texts: int, requests: int) -> None:
        self.texts_free = texts
        self.requests_free = requests
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self._take(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)
            else:
                fut.cancel()
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.texts_free += n
        self.requests_free += 1
        self._wake()

    def _fits(self, n: int) -> bool:
        return self.texts_free >= n and self.requests_free >= 1

    def _take(self, n: int) -> None:
        self.texts_free -= n
        self.requests_free -= 1

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)


class _Rows:
    """The output matrix of one `embed` call, allocated by the first checked answer (its width is the run's)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.array: np.ndarray | None = None

    def put(self, idx: list[int], vectors: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.n, vectors.shape[1]), dtype=np.float32)
        self.array[np.asarray(idx, dtype=np.intp)] = vectors

    def result(self, dim: int | None) -> np.ndarray:
        if self.array is None:
            return np.empty((self.n, dim or 0), dtype=np.float32)
        return self.array


class TEIClient:
    """Embeds texts through one TEI server; share one client among all shards that use that server.

    Texts in flight across every concurrent `embed` call stay ≤ the server's `max_concurrent_requests`, and at most
    `max_requests_in_flight` HTTP requests run at once. `dim` is the run's vector width: `dimensions`, else the
    `dim` passed in (the catalog's, or the one earlier shards were written with), else the first answer's; any
    other width fails. `expected_model` (and `expected_revision`) must match `/info`'s `model_id` or
    `served_model_name` (and `model_sha`, where reported) before any text is sent.

    `truncate` is the user's opt-in to let TEI cut over-long inputs to `max_input_length`; off, TEI answers 422 and
    the call fails naming the text. TEI does not say which inputs it cut, so a text counts as truncated when its
    `n_tokens` plus `input_overhead` (the special and prefix tokens TEI adds to it) exceed `max_input_length`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        prefix: str = "",
        normalize: bool = True,
        dimensions: int | None = None,
        payload_limit: int = 2_000_000,
        max_requests_in_flight: int = 64,
        dim: int | None = None,
        expected_model: str | None = None,
        expected_revision: str | None = None,
        truncate: bool = False,
        input_overhead: int = 0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise EmbedderError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise EmbedderError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise EmbedderError(f"max_retries must be ≥ 0, got {max_retries}")
        if backoff_base < 0 or backoff_max < 0:
            raise EmbedderError(f"backoff_base and backoff_max must be ≥ 0, got {backoff_base} and {backoff_max}")
        if dimensions is not None and dimensions < 1:
            raise EmbedderError(f"dimensions must be ≥ 1 or None, got {dimensions}")
        if max_requests_in_flight < 1:
            raise EmbedderError(f"max_requests_in_flight must be ≥ 1, got {max_requests_in_flight}")
        if dim is not None and dim < 1:
            raise EmbedderError(f"dim must be ≥ 1 or None, got {dim}")
        if dim is not None and dimensions is not None and dimensions > dim:
            raise EmbedderError(f"dimensions={dimensions} is more than the model's {dim}-dim vectors")
        if input_overhead < 0:
            raise EmbedderError(f"input_overhead must be ≥ 0, got {input_overhead}")
        self.base_url = base_url
        self.source = f"TEI at {public_url(base_url)}"
        self.expected_model = expected_model
        self.expected_revision = expected_revision
        self.truncate = truncate
        self.input_overhead = input_overhead
        self.truncated = 0  # texts TEI cut to max_input_length, over the client's life (as LocalEmbedder counts)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.prefix = prefix
        self.normalize = normalize
        self.dimensions = dimensions
        self.payload_limit = payload_limit
        self.max_requests_in_flight = max_requests_in_flight
        self._check = VectorCheck(self.source, normalize=normalize, dim=dim, dimensions=dimensions)
        self.stats = TEIStats()
        self._body_head = b'{"inputs":['
        tail: dict[str, Any] = {"normalize": normalize, "truncate": truncate}
        if dimensions is not None:
            tail["dimensions"] = dimensions
        self._body_tail = b"]," + orjson.dumps(tail)[1:]
        # JSON bytes of texts (commas included) one request may carry and stay within payload_limit.
        self._max_text_bytes = payload_limit - 1 - len(self._body_head) - len(self._body_tail)
        if self._max_text_bytes <= 1:
            raise EmbedderError(f"payload_limit of {payload_limit} bytes cannot hold a request")
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_requests_in_flight, max_keepalive_connections=max_requests_in_flight
            ),
            trust_env=False,
        )
        self._info: TEIInfo | None = None
        self._info_lock = asyncio.Lock()
        # Concurrent `embed` calls queue their requests one call after another, not interleaved: calls then finish
        # one by one, so while one call's last requests run, the next call's are already queued behind them.
        self._submitting = asyncio.Lock()
        self._in_flight: _InFlight | None = None
        self._rng = random.Random()

    @property
    def dim(self) -> int | None:
        """The run's vector width, once known."""
        return self._check.dim

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def info(self) -> TEIInfo:
        """Read `GET /info` once (retrying transient failures), check the server's model, keep its limits."""
        async with self._info_lock:
            if self._info is None:
                data = await self._get_info()
                info = TEIInfo(
                    max_client_batch_size=_positive(data, "max_client_batch_size", DEFAULT_MAX_CLIENT_BATCH_SIZE),
                    max_batch_tokens=_positive(data, "max_batch_tokens", DEFAULT_MAX_BATCH_TOKENS),
                    max_input_length=_positive(data, "max_input_length", DEFAULT_MAX_INPUT_LENGTH),
                    max_concurrent_requests=_positive(data, "max_concurrent_requests", DEFAULT_MAX_CONCURRENT_REQUESTS),
                    model_id=_text(data, "model_id"),
                    version=_text(data, "version"),
                    model_sha=_text(data, "model_sha"),
                    served_model_name=_text(data, "served_model_name"),
                    model_dtype=_text(data, "model_dtype"),
                    auto_truncate=data.get("auto_truncate") if isinstance(data.get("auto_truncate"), bool) else None,
                    sha=_text(data, "sha"),
                    docker_label=_text(data, "docker_label"),
                )
                self._check_identity(info)
                self._info = info
            return self._info

    def _check_identity(self, info: TEIInfo) -> None:
        """Fail in one line when `/info` names another model (or revision) than the one this run expects."""
        expected = self.expected_model
        if expected is not None and expected not in (info.model_id, info.served_model_name):
            served = f", served_model_name {info.served_model_name!r}" if info.served_model_name else ""
            raise EmbedderError(
                f"{self.source} serves model {info.model_id!r} (/info model_id{served}), not the expected "
                f"{expected!r}; point the spec at a TEI server for that model, or launch TEI with "
                f"--served-model-name {expected}"
            )
        revision = self.expected_revision
        if revision is not None and info.model_sha is not None and info.model_sha != revision:
            raise EmbedderError(
                f"{self.source} serves {info.model_id!r} at revision {info.model_sha!r} (/info model_sha), "
                f"not the expected {revision!r}"
            )

    def truncations(self, n_tokens: Sequence[int]) -> int:
        """How many of these texts TEI cuts: none unless `truncate` is on, else those over `max_input_length`.

        Call after `info()` (any `embed` does it); per call, so concurrent shards each get their own count.
        """
        if not self.truncate or self._info is None:
            return 0
        limit = self._info.max_input_length - self.input_overhead
        return sum(1 for n in n_tokens if n > limit)

    async def embed(self, texts: list[str], n_tokens: list[int]) -> np.ndarray:
        """Embed `texts` (with `prefix` prepended) and return float32 vectors, one row per text in input order.

        `n_tokens[i]` is the token count used to pack text i; raises EmbedderError if any request finally fails.
        """
        if len(n_tokens) != len(texts):
            raise EmbedderError(f"embed got {len(texts)} texts but {len(n_tokens)} token counts")
        for i, text in enumerate(texts):
            if not text:
                raise TextsFailedError(
                    f"text {i} is empty; TEI rejects the whole request with 400, drop empty chunks", (i,)
                )
        rows = _Rows(len(texts))
        if not texts:
            return rows.result(self.dim)
        info = await self.info()
        if self._in_flight is None:
            self._in_flight = _InFlight(info.max_concurrent_requests, self.max_requests_in_flight)
        in_flight = self._in_flight
        prefix = self.prefix
        parts = [orjson.dumps(prefix + t) for t in texts]
        max_bytes = self._max_text_bytes
        for i, part in enumerate(parts):
            if len(part) > max_bytes:
                raise TextsFailedError(
                    f"text {i} is {len(part)} bytes as JSON, over the {self.payload_limit}-byte payload limit", (i,)
                )
        batches = pack_requests(
            n_tokens,
            [len(p) for p in parts],
            max_texts=min(info.max_client_batch_size, info.max_concurrent_requests),
            max_tokens=info.max_batch_tokens,
            max_bytes=max_bytes,
        )
        try:
            async with asyncio.TaskGroup() as group, self._submitting:
                for batch in batches:
                    k = len(batch)
                    await in_flight.acquire(k)
                    try:
                        task = group.create_task(self._embed_batch(batch, [parts[i] for i in batch], rows))
                    except BaseException:
                        in_flight.release(k)
                        raise
                    task.add_done_callback(lambda _t, k=k: in_flight.release(k))
        except BaseExceptionGroup as group_error:
            # A rejected text fails the same way on every attempt, so it wins over a transient failure.
            failures = (group_error.subgroup(lambda e: isinstance(e, EmbedderError) and not e.transient)
                        or group_error.subgroup(EmbedderError) or group_error)
            while isinstance(failures, BaseExceptionGroup):
                failures = failures.exceptions[0]
            if isinstance(failures, EmbedderError):
                raise failures from None
            if not isinstance(failures, Exception):  # cancellation, KeyboardInterrupt: not ours to rename
                raise failures from group_error
            raise EmbedderError(f"TEI client failed: {type(failures).__name__}: {failures}") from failures
        cut = self.truncations(n_tokens)
        self.truncated += cut
        self.stats.truncated += cut
        return rows.result(self.dim)

    async def _embed_batch(self, idx: list[int], parts: list[bytes], rows: _Rows) -> None:
        """Send one request: retry 429/5xx/transport errors, split on 413/422/424, raise when a single text fails.

        A single text is also retried on 424, since the GPU batch it failed in held other requests' texts too.
        """
        body = self._body_head + b",".join(parts) + self._body_tail
        retries = 0
        while True:
            try:
                response = await self._http.post("/embed", content=body, headers=_JSON_HEADERS)
            except httpx.TransportError as exc:
                cause, detail = _transport_failure(exc)
            else:
                status = response.status_code
                if status == 200:
                    self._store(idx, response, rows)
                    return
                message = _error_message(response)
                if status in _SPLIT_STATUSES and len(idx) > 1:
                    self.stats.splits += 1
                    log.debug("TEI answered %d to %d texts, splitting: %s", status, len(idx), message)
                    half = len(idx) // 2
                    await self._embed_batch(idx[:half], parts[:half], rows)
                    await self._embed_batch(idx[half:], parts[half:], rows)
                    return
                if not (status == 429 or status == 424 or status >= 500):
                    raise TextsFailedError(
                        f"{self.source} rejected text {_describe(idx)}: HTTP {status}: {message}", tuple(idx)
                    )
                cause = str(status)
                detail = f"HTTP {status}: {message}"
            if retries >= self.max_retries:
                # A lone text that keeps failing its GPU batch (424) is that text's fault; the rest is the server's.
                message = f"{self.source} failed text {_describe(idx)} after {retries + 1} attempts: {detail}"
                if cause == "424":
                    raise TextsFailedError(message, tuple(idx))
                raise EmbedderUnavailable(message)
            retries += 1
            log.info("retrying %d texts (attempt %d of %d): %s", len(idx), retries + 1, self.max_retries + 1, detail)
            await self._pause_before_retry(retries, cause)

    def _store(self, idx: list[int], response: httpx.Response, rows: _Rows) -> None:
        """Check a 200 answer (numbers only, then every vector check), write its rows and count its tokens."""
        where = f"text {_describe(idx)}"
        indices = tuple(idx)
        vectors = parse_vectors_json(response.content, source=self.source, where=where, indices=indices)
        rows.put(idx, self._check(vectors, len(idx), where=where, indices=indices))
        self.stats.requests += 1
        self.stats.texts += len(idx)
        tokens = response.headers.get("x-compute-tokens")
        if tokens is not None and tokens.isdigit():
            self.stats.tokens += int(tokens)

    def _backoff(self, retry: int) -> float:
        """Exponential backoff with equal jitter: half the step fixed, half random."""
        step = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1))
        return step / 2 + self._rng.uniform(0, step / 2)

    async def _pause_before_retry(self, retry: int, cause: str) -> None:
        """Count retry number `retry` and its cause, then sleep its backoff."""
        self.stats.retries += 1
        self.stats.retry_causes[cause] += 1
        await asyncio.sleep(self._backoff(retry))

    async def _get_info(self) -> dict[str, Any]:
        retries = 0
        while True:
            try:
                response = await self._http.get("/info")
            except httpx.TransportError as exc:
                cause, detail = _transport_failure(exc)
            else:
                if response.status_code == 200:
                    try:
                        data = orjson.loads(response.content)
                    except orjson.JSONDecodeError as exc:
                        raise EmbedderError(f"{self.source} returned unreadable /info: {exc}") from exc
                    if not isinstance(data, dict):
                        raise EmbedderError(f"{self.source} returned /info that is not an object")
                    return data
                status = response.status_code
                detail = f"HTTP {status}: {_error_message(response)}"
                if not (status == 429 or status >= 500):
                    raise EmbedderError(f"{self.source} refused GET /info: {detail}")
                cause = str(status)
            if retries >= self.max_retries:
                raise EmbedderUnavailable(f"{self.source} failed GET /info after {retries + 1} attempts: {detail}")
            retries += 1
            await self._pause_before_retry(retries, cause)


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _positive(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _transport_failure(exc: httpx.TransportError) -> tuple[str, str]:
    """(cause, detail) of a failed connection: the exception's type, and its message when it has one."""
    cause = type(exc).__name__
    return cause, (f"{cause}: {exc}" if str(exc) else cause)


def _describe(idx: list[int]) -> str:
    if len(idx) == 1:
        return str(idx[0])
    shown = ", ".join(str(i) for i in sorted(idx)[:5])
    return f"{shown}{', …' if len(idx) > 5 else ''} ({len(idx)} texts)"


def _error_message(response: httpx.Response) -> str:
    """TEI's JSON `error` field, or the plain text axum sends (e.g. the 413 body), cut to 300 characters."""
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text.strip()[:300] or "(empty body)"
    if isinstance(data, dict):
        return str(data.get("error") or data.get("message") or data)[:300]
    return str(data)[:300]
