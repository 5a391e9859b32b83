"""A TEI 1.9 protocol test server on loopback: real limits and status codes, deterministic vectors, injectable faults.

It answers `/info`, `/embed` and `/health` like `text-embeddings-router` (reference/tei.md §2), records every request
and every text it embedded, so tests can check that each chunk got its own vector exactly once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import numpy as np

# One scheduled action per /embed request, taken in arrival order once the request holds its permits:
# an int status (e.g. 500, 503, 429) answers with that status, "drop" closes the socket without an answer,
# a float sleeps that many seconds and then answers normally, None answers normally.
Action = int | str | float | None


def count_tokens(text: str) -> int:
    """The server's token count for a text: whitespace words plus two special tokens."""
    return len(text.split()) + 2


def expected_vector(text: str, dim: int = 8, *, normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
    """The float32 vector the server returns for `text`: derived from a hash, so each text has its own."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    vec = np.random.default_rng(seed).standard_normal(dim)
    if dimensions is not None:
        vec = vec[:dimensions]
    if normalize:
        vec = vec / np.linalg.norm(vec)
    return vec.astype(np.float32)


@dataclass(frozen=True)
class RequestRecord:
    """One /embed request as the server saw it."""

    n_inputs: int
    n_bytes: int
    status: int  # 0 when the connection was dropped without an answer
    tokens: int


class TEIServer:
    """A loopback TEI server in a background thread; use as a context manager, then read `url` and the records.

    Fault knobs may be changed while it runs: `schedule`, `delay`, `fail_status`, `fail_batches_over`, `poison`.
    """

    def __init__(
        self,
        *,
        dim: int = 8,
        max_client_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_input_length: int = 512,
        max_concurrent_requests: int = 512,
        payload_limit: int = 2_000_000,
        info: dict[str, Any] | None = None,
        schedule: list[Action] | None = None,
        delay: float = 0.0,
        fail_status: int | None = None,
        fail_batches_over: int | None = None,
        poison: set[str] | None = None,
    ) -> None:
        self.dim = dim
        self.max_client_batch_size = max_client_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_input_length = max_input_length
        self.max_concurrent_requests = max_concurrent_requests
        self.payload_limit = payload_limit
        self.info = {
            "model_id": "test/tei-server",
            "model_sha": None,
            "model_dtype": "float32",
            "model_type": {"embedding": {"pooling": "cls"}},
            "max_concurrent_requests": max_concurrent_requests,
            "max_input_length": max_input_length,
            "max_batch_tokens": max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": max_client_batch_size,
            "auto_truncate": True,
            "tokenization_workers": 1,
            "version": "1.9.3",
        }
        self.info.update(info or {})
        self.schedule: deque[Action] = deque(schedule or [])
        self.delay = delay
        self.fail_status = fail_status
        self.fail_batches_over = fail_batches_over
        self.poison = set(poison or ())
        self.embedded: list[str] = []
        self.requests: list[RequestRecord] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("TEIServer is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def statuses(self) -> list[int]:
        """Status of every /embed request so far, in arrival order."""
        with self._lock:
            return [r.status for r in self.requests]

    def __enter__(self) -> TEIServer:
        handler = type("Handler", (_Handler,), {"tei": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, name="tei-test-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # The /embed pipeline, in TEI's order: body limit, JSON, emptiness, batch size, permits, validation, inference.
    def handle_embed(self, body: bytes) -> tuple[int, bytes, dict[str, str]] | None:
        if len(body) > self.payload_limit:
            return self._plain(body, 413, "Failed to buffer the request body: length limit exceeded")
        try:
            request = json.loads(body)
        except ValueError as exc:
            return self._plain(body, 400, f"Failed to parse the request body as JSON: {exc}")
        inputs = request.get("inputs") if isinstance(request, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            return self._plain(body, 422, "Failed to deserialize the JSON body into the target type")
        n = len(inputs)
        if n == 0 or any(t == "" for t in inputs):
            return self._error(n, body, 400, "`inputs` cannot be empty", "Empty")
        if n > self.max_client_batch_size:
            message = f"batch size {n} > maximum allowed batch size {self.max_client_batch_size}"
            return self._error(n, body, 422, message, "Validation")
        with self._lock:
            if self.in_flight + n > self.max_concurrent_requests:
                overloaded = True
            else:
                overloaded = False
                self.in_flight += n
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            action = self.schedule.popleft() if self.schedule and not overloaded else None
        if overloaded:
            return self._error(n, body, 429, "Model is overloaded", "Overloaded")
        try:
            return self._infer(inputs, request, body, action)
        finally:
            with self._lock:
                self.in_flight -= n

    def _infer(
        self, inputs: list[str], request: dict[str, Any], body: bytes, action: Action
    ) -> tuple[int, bytes, dict[str, str]] | None:
        n = len(inputs)
        if self.delay:
            time.sleep(self.delay)
        if action == "drop":
            self._record(n, body, 0)
            return None
        if isinstance(action, float):
            time.sleep(action)
        elif isinstance(action, int):
            error_type = "Overloaded" if action == 429 else "Backend"
            return self._error(n, body, action, f"injected fault {action}", error_type)
        if self.fail_status is not None:
            return self._error(n, body, self.fail_status, f"injected fault {self.fail_status}", "Backend")
        truncate = request.get("truncate")
        truncate = self.info.get("auto_truncate", True) if truncate is None else truncate
        tokens = [count_tokens(t) for t in inputs]
        if not truncate:
            for t in tokens:
                if t > self.max_input_length:
                    limit = self.max_input_length
                    message = f"Input validation error: `inputs` must have less than {limit} tokens. Given: {t}"
                    return self._error(n, body, 422, message, "Validation")
        dimensions = request.get("dimensions")
        if dimensions is not None and not 0 < dimensions <= self.dim:
            return self._error(n, body, 422, f"`dimensions` must be in 1..{self.dim}, got {dimensions}", "Validation")
        if self.fail_batches_over is not None and n > self.fail_batches_over:
            return self._error(n, body, 424, "Backend error: CUDA out of memory", "Backend")
        if self.poison.intersection(inputs):
            return self._error(n, body, 424, "Backend error: NaN in model output", "Backend")
        normalize = request.get("normalize", True)
        vectors = [expected_vector(t, self.dim, normalize=normalize, dimensions=dimensions).tolist() for t in inputs]
        total = sum(min(t, self.max_input_length) for t in tokens)
        with self._lock:
            self.embedded.extend(inputs)
        self._record(n, body, 200, total)
        return 200, json.dumps(vectors).encode(), {"content-type": "application/json", "x-compute-tokens": str(total)}

    def _error(
        self, n: int, body: bytes, status: int, message: str, error_type: str
    ) -> tuple[int, bytes, dict[str, str]]:
        """A TEI JSON error body: `{"error": ..., "error_type": ...}`."""
        self._record(n, body, status)
        payload = json.dumps({"error": message, "error_type": error_type}).encode()
        return status, payload, {"content-type": "application/json"}

    def _plain(self, body: bytes, status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
        """A plain-text error as axum sends it before TEI reads the request (413 over the payload limit)."""
        self._record(0, body, status)
        return status, message.encode(), {"content-type": "text/plain; charset=utf-8"}

    def _record(self, n: int, body: bytes, status: int, tokens: int = 0) -> None:
        with self._lock:
            self.requests.append(RequestRecord(n, len(body), status, tokens))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the stdlib's 5 would reset or stall the client's burst of connections


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    wbufsize = -1  # one write per answer: headers and body in separate segments stall 40 ms on delayed ACKs
    tei: TEIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/info":
            self._send(200, json.dumps(self.tei.info).encode(), {"content-type": "application/json"})
        elif self.path in ("/health", "/"):
            self._send(200, b"", {})
        else:
            self._send(404, b"", {})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path not in ("/embed", "/"):
            self._send(404, b"", {})
            return
        answer = self.tei.handle_embed(body)
        if answer is None:
            self.close_connection = True
            return
        self._send(*answer)

    def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
