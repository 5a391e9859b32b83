"""A TEI 1.9.3 stand-in on loopback, as strict as `text-embeddings-router`, with deterministic vectors and faults.

It tokenizes every input with the model's own `tokenizer.json` (default: the packaged all-MiniLM-L6-v2) and applies
TEI's rules in TEI's order. Each rule, as read in huggingface/text-embeddings-inference at tag v1.9.3 (commit
06670157fb6c1523482219bdb2d1660277d38088):

- A body over `payload_limit` bytes: 413, plain text `Failed to buffer the request body: length limit exceeded`
  (axum 0.7's `DefaultBodyLimit`, router/src/http/server.rs:1872); no JSON content type: 415; bad JSON: 400;
  wrong field types: 422 `Failed to deserialize the JSON body into the target type: ...`, all plain text (axum's
  `Json` extractor). Request fields: `inputs`, `truncate`, `truncation_direction`, `prompt_name`, `normalize`
  (default true), `dimensions` (router/src/http/types.rs:411-446); unknown fields are ignored.
- `truncate` absent: the server's `--auto-truncate` (server.rs:599; default true since 1.9.0, router/src/main.rs:90).
- `inputs: []`: 400 Empty `` `inputs` cannot be empty `` (server.rs:639-650). More inputs than
  `max_client_batch_size`: 422 Validation `batch size N > maximum allowed batch size M` (server.rs:652-664).
- One permit per input with `try_acquire`: if any is missing, 429 Overloaded `Model is overloaded` at once, all or
  nothing (server.rs:670-678, core/src/infer.rs:94-104, core/src/lib.rs:18).
- Then each input in order, and the first input's error is the answer (server.rs:694-698):
  `dimensions: 0` → 422 `` Input validation error: `dimensions` should be positive `` (infer.rs:248-255);
  an empty string → 400 `` Input validation error: `inputs` cannot be empty `` (core/src/tokenization.rs:76-80,
  core/src/lib.rs:14-17); an unknown `prompt_name` → 422 (tokenization.rs:271-280); more characters than
  250 × max_input_length → 422 `` Input validation error: `inputs` must have less than L characters. Given: N ``
  unless truncating, when the string is cut to L bytes if that is a char boundary (tokenization.rs:10, 300-309,
  445-450); the prompt (`prompt_name`'s, else `--default-prompt`) is prepended and the text encoded **with special
  tokens** (tokenization.rs:192-195, 314-323, 389), cut LongestFirst to max_input_length when truncating
  (tokenization.rs:380-385); more tokens than max_input_length → 422
  `` Input validation error: `inputs` must have less than M tokens. Given: N `` (tokenization.rs:397-403; a text
  of exactly M tokens passes); `dimensions` over the model's width → 422 `` Input validation error: `dimensions`
  should be smaller than the maximum embedding dimension. `` (infer.rs:273-283).
- Vectors: the first `dimensions` components, then L2-normalized when `normalize` (infer.rs:285-301).
  `x-compute-tokens` is Σ tokens after truncation, specials included (infer.rs:368, router/src/lib.rs:675).
- Error bodies `{"error": ..., "error_type": "Validation"}`, the type capitalized (router/src/lib.rs:572-601);
  statuses by type: Validation/Tokenizer 422, Empty 400, Overloaded 429, Backend 424 (server.rs:1892-1901).
- `/info` carries the `Info` struct's fields (router/src/lib.rs:530-567, filled at 320-336): `model_id` is the
  `--model-id` argument verbatim (a folder such as `/models/<slug>` stays a path), `model_sha` the `--revision`
  argument verbatim, `served_model_name` `--served-model-name` or else `model_id` (main.rs:239-241);
  `max_input_length` is `max_seq_length` from sentence_bert_config.json, else max_position_embeddings minus the
  (xlm-)roberta/camembert position offset, capped at max_batch_tokens when auto-truncating, a startup error when
  not (router/src/lib.rs:180-220). The tokenizer runs with its padding removed (router/src/lib.rs:143-148).

Not modelled: token-id inputs (TEI accepts them; the client never sends them) answer 422 here, so the stand-in is
stricter, never laxer. Vectors are a hash of the text the model saw (`expected_vector`), not a model's.

Fault knobs, changeable while it runs: `schedule`, `delay`, `fail_status`, `fail_batches_over`, `poison` (backend
failures), `vector_fault` (a malformed 200 answer, see `VECTOR_FAULTS`), `drift` (vectors off the reference), and
`info` (what /info reports, e.g. another model).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

import numpy as np
import orjson
from tokenizers import Tokenizer

from volembed_runner.models import tokenizer_file

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MAX_CHAR_MULTIPLIER = 250  # core/src/tokenization.rs:10

# One scheduled action per /embed request, taken in arrival order once the request holds its permits:
# an int status (e.g. 500, 503, 429) answers with that status, "drop" closes the socket without an answer,
# a float sleeps that many seconds and then answers normally, None answers normally.
Action = int | str | float | None

# Malformed 200 answers a broken server or proxy could send. wrong_dim: half-width vectors; mixed_dim: the first
# answer right, every later one a component short; ragged: one vector of an answer a component short; null, nan
# (the non-JSON token), overflow (1e39), bool, string: one component of the first vector; few / many: one vector
# missing / extra; not_json: an HTML page; unnormalized: vectors of norm 7 whatever `normalize` says.
VectorFault = Literal[
    "wrong_dim", "mixed_dim", "ragged", "null", "nan", "overflow", "bool", "string", "few", "many", "not_json",
    "unnormalized",
]
VECTOR_FAULTS: tuple[str, ...] = get_args(VectorFault)

_ERROR_TYPES = {400: "Empty", 422: "Validation", 424: "Backend", 429: "Overloaded"}
_DIRECTIONS = {"Right": "right", "right": "right", "Left": "left", "left": "left"}
_JSON = {"content-type": "application/json"}
_TEXT = {"content-type": "text/plain; charset=utf-8"}


def expected_vector(text: str, dim: int = 384, *, normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
    """The float32 vector the server returns for `text` (the text the model saw): derived from a hash of it."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    vec = np.random.default_rng(seed).standard_normal(dim)
    if dimensions is not None:
        vec = vec[:dimensions]
    if normalize:
        vec = vec / np.linalg.norm(vec)
    return vec.astype(np.float32)


@lru_cache(maxsize=32)
def _tokenizer(path: str, max_length: int | None, direction: str) -> Tokenizer:
    """The model's tokenizer as TEI runs it: no padding; truncation only when the request truncates."""
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction=direction)
    return tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def base_input_length(model_dir: Path) -> int:
    """The model's input limit as TEI reads it: ST max_seq_length, else max_position_embeddings - position offset."""
    st = _read_json(model_dir / "sentence_bert_config.json")
    if isinstance(st.get("max_seq_length"), int):
        return st["max_seq_length"]
    config = _read_json(model_dir / "config.json")
    offset = (config.get("pad_token_id") or 0) + 1 if config.get("model_type") in (
        "xlm-roberta", "camembert", "roberta") else 0
    return int(config.get("max_position_embeddings", 512)) - offset


class _Refusal(Exception):
    """An input TEI refuses: the request's answer is this status and TEI error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestRecord:
    """One /embed request as the server saw it."""

    n_inputs: int
    n_bytes: int
    status: int  # 0 when the connection was dropped without an answer
    tokens: int


class TEIServer:
    """A loopback TEI server in a background thread; use as a context manager, then read `url` and the records.

    `model_dir` is the model folder TEI would load (tokenizer.json, configs); `model_id`, `revision` and
    `served_model_name` are the router's flags as /info reports them; `max_input_length` is the model's own limit
    (TEI caps it at max_batch_tokens); `dim` the model's width (default: config.json's hidden_size).
    """

    def __init__(
        self,
        *,
        model_dir: Path | None = None,
        model_id: str | None = None,
        revision: str | None = None,
        served_model_name: str | None = None,
        dim: int | None = None,
        max_client_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_input_length: int | None = None,
        max_concurrent_requests: int = 512,
        payload_limit: int = 2_000_000,
        auto_truncate: bool = True,
        default_prompt: str | None = None,
        info: dict[str, Any] | None = None,
        schedule: list[Action] | None = None,
        delay: float = 0.0,
        fail_status: int | None = None,
        fail_batches_over: int | None = None,
        poison: set[str] | None = None,
        vector_fault: VectorFault | None = None,
        drift: float = 0.0,
    ) -> None:
        if model_dir is None:
            model_dir = tokenizer_file(DEFAULT_MODEL, download=False).parent
            model_id = model_id or DEFAULT_MODEL
        self.model_dir = Path(model_dir)
        self.tokenizer_path = str(self.model_dir / "tokenizer.json")
        config = _read_json(self.model_dir / "config.json")
        self.dim = dim or int(config.get("hidden_size", 8))
        base = max_input_length or base_input_length(self.model_dir)
        if base > max_batch_tokens and not auto_truncate:  # router/src/lib.rs:208-213: the router does not start
            raise ValueError(f"max input length {base} exceeds --max-batch-tokens={max_batch_tokens}")
        self.max_input_length = min(base, max_batch_tokens)
        self.max_client_batch_size = max_client_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_concurrent_requests = max_concurrent_requests
        self.payload_limit = payload_limit
        self.auto_truncate = auto_truncate
        self.default_prompt = default_prompt
        prompts = _read_json(self.model_dir / "config_sentence_transformers.json").get("prompts")
        self.prompts: dict[str, str] | None = prompts if isinstance(prompts, dict) else None
        model_id = model_id or str(self.model_dir)
        self.info: dict[str, Any] = {
            "model_id": model_id,
            "model_sha": revision,
            "model_dtype": "float16",
            "served_model_name": served_model_name or model_id,
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": max_concurrent_requests,
            "max_input_length": self.max_input_length,
            "max_batch_tokens": max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": max_client_batch_size,
            "auto_truncate": auto_truncate,
            "tokenization_workers": 1,
            "version": "1.9.3",
            "sha": "06670157fb6c1523482219bdb2d1660277d38088",
            "docker_label": "sha-0667015",
        }
        self.info.update(info or {})
        self.schedule: deque[Action] = deque(schedule or [])
        self.delay = delay
        self.fail_status = fail_status
        self.fail_batches_over = fail_batches_over
        self.poison = set(poison or ())
        self.vector_fault: VectorFault | None = vector_fault
        self.drift = drift
        self.embedded: list[str] = []
        self.requests: list[RequestRecord] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._answers = 0
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

    def count_tokens(self, texts: list[str], prompt: str | None = None) -> list[int]:
        """Tokens TEI counts for each text untruncated: (prompt, else the default prompt) + text, with specials."""
        prompt = self.default_prompt if prompt is None else prompt
        encodings = _tokenizer(self.tokenizer_path, None, "right").encode_batch(
            [(prompt or "") + t for t in texts], add_special_tokens=True
        )
        return [len(e.ids) for e in encodings]

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

    # The /embed pipeline, in TEI's order: body limit, JSON, emptiness, batch size, permits, per-input validation
    # and tokenization, inference.
    def handle_embed(self, body: bytes, content_type: str) -> tuple[int, bytes, dict[str, str]] | None:
        if len(body) > self.payload_limit:
            return self._plain(body, 413, "Failed to buffer the request body: length limit exceeded")
        if not content_type.lower().startswith("application/json"):
            return self._plain(body, 415, "Expected request with `Content-Type: application/json`")
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self._plain(body, 400, f"Failed to parse the request body as JSON: {exc}")
        problem = _request_problem(request)
        if problem:
            return self._plain(body, 422, f"Failed to deserialize the JSON body into the target type: {problem}")
        inputs = request["inputs"]
        if isinstance(inputs, str):
            inputs = [inputs]
        elif not inputs:
            return self._error(0, body, 400, "`inputs` cannot be empty")
        n = len(inputs)
        if n > self.max_client_batch_size:
            message = f"batch size {n} > maximum allowed batch size {self.max_client_batch_size}"
            return self._error(n, body, 422, message)
        with self._lock:
            overloaded = self.in_flight + n > self.max_concurrent_requests
            if not overloaded:
                self.in_flight += n
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            action = self.schedule.popleft() if self.schedule and not overloaded else None
        if overloaded:
            return self._error(n, body, 429, "Model is overloaded")
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
            return self._error(n, body, action, f"injected fault {action}")
        if self.fail_status is not None:
            return self._error(n, body, self.fail_status, f"injected fault {self.fail_status}")
        truncate = request.get("truncate")
        truncate = self.auto_truncate if truncate is None else truncate
        dimensions = request.get("dimensions")
        try:
            seen, tokens = self._encode(inputs, truncate, request)
        except _Refusal as refusal:
            return self._error(n, body, refusal.status, refusal.message)
        if self.fail_batches_over is not None and n > self.fail_batches_over:
            return self._error(n, body, 424, "Backend error: CUDA out of memory")
        if self.poison.intersection(inputs):
            return self._error(n, body, 424, "Backend error: NaN in model output")
        normalize = request.get("normalize", True)
        payload = self._vectors(seen, normalize, dimensions)
        total = sum(tokens)
        with self._lock:
            self.embedded.extend(seen)
        self._record(n, body, 200, total)
        headers = {**_JSON, "x-compute-tokens": str(total), "x-compute-characters": str(sum(map(len, inputs))),
                   "x-compute-type": "gpu+optimized"}
        return 200, payload, headers

    def _encode(self, inputs: list[str], truncate: bool, request: dict[str, Any]) -> tuple[list[str], list[int]]:
        """TEI's per-input validation and tokenization: the text each model run sees and its token count.

        TEI checks every input concurrently and answers the first failing one in input order; so does this.
        """
        dimensions = request.get("dimensions")
        if dimensions == 0:  # checked before tokenizing, for every input alike
            raise _Refusal(422, "Input validation error: `dimensions` should be positive")
        prompt_name = request.get("prompt_name")
        prompt = (self.prompts or {}).get(prompt_name, "") if prompt_name is not None else self.default_prompt or ""
        texts: list[str] = []
        refusal: _Refusal | None = None
        for text in inputs:  # the checks before tokenizing; inputs after the first refused one do not matter
            refusal = self._refuse_before_tokenizing(text, truncate, request)
            if refusal is not None:
                break
            texts.append(prompt + self._cut_chars(text, truncate))
        direction = _DIRECTIONS[request.get("truncation_direction") or "Right"]
        tokenizer = _tokenizer(self.tokenizer_path, self.max_input_length if truncate else None, direction)
        seen, counts = [], []
        for text, encoding in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=True), strict=True):
            count = len(encoding.ids)
            if count > self.max_input_length:
                raise _Refusal(422, f"Input validation error: `inputs` must have less than {self.max_input_length} "
                                    f"tokens. Given: {count}")
            if dimensions is not None and dimensions > self.dim:  # checked after the model ran
                raise _Refusal(422, "Input validation error: `dimensions` should be smaller than the maximum "
                                    "embedding dimension.")
            if encoding.overflowing:  # truncated: the model saw only the kept tokens' span of the text
                spans = [o for o, special in zip(encoding.offsets, encoding.special_tokens_mask, strict=True)
                         if not special]
                text = text[spans[0][0]:] if direction == "left" else text[:spans[-1][1]]
            seen.append(text)
            counts.append(count)
        if refusal is not None:
            raise refusal
        return seen, counts

    def _refuse_before_tokenizing(self, text: str, truncate: bool, request: dict[str, Any]) -> _Refusal | None:
        """An empty text, an unknown prompt name, too many characters without truncation (tokenization.rs)."""
        if text == "":
            return _Refusal(400, "Input validation error: `inputs` cannot be empty")
        prompt_name = request.get("prompt_name")
        if prompt_name is not None and self.prompts is None:
            return _Refusal(422, f"Input validation error: `default-prompt-name` is set to `{prompt_name}` but no "
                                 "prompts were found in the Sentence Transformers configuration")
        if prompt_name is not None and prompt_name not in (self.prompts or {}):
            return _Refusal(422, f"Input validation error: `default-prompt-name` is set to `{prompt_name}` but it "
                                 f"was not found in the Sentence Transformers prompts. Available prompts: "
                                 f"{list(self.prompts or {})}")
        limit = self.max_input_length * MAX_CHAR_MULTIPLIER
        if len(text) > limit and not truncate:
            return _Refusal(422, f"Input validation error: `inputs` must have less than {limit} characters. "
                                 f"Given: {len(text)}")
        return None

    def _cut_chars(self, text: str, truncate: bool) -> str:
        """A truncating request's text cut to the character limit, as TEI does before tokenizing."""
        limit = self.max_input_length * MAX_CHAR_MULTIPLIER
        if truncate and len(text) > limit:
            raw = text.encode()
            if (raw[limit] & 0xC0) != 0x80:  # Rust's `is_char_boundary(limit)`; TEI leaves the text whole if not
                text = raw[:limit].decode()
        return text

    def _vectors(self, texts: list[str], normalize: bool, dimensions: int | None) -> bytes:
        """The JSON answer: one hash vector per text, or the configured malformed answer."""
        with self._lock:
            self._answers += 1
            answer_number = self._answers
        fault = self.vector_fault
        dim, width = self.dim, dimensions
        if fault == "wrong_dim":
            dim, width = max(1, self.dim // 2), None
        elif fault == "mixed_dim" and answer_number > 1:
            dim, width = self.dim - 1, None
        if self.drift:
            reference = np.stack([expected_vector(t, dim, dimensions=width) for t in texts])
            noise = np.stack([expected_vector("drift:" + t, dim, dimensions=width) for t in texts])
            vectors = reference + self.drift * noise
            if normalize:
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors.astype(np.float32)
        else:
            vectors = np.stack([expected_vector(t, dim, normalize=normalize, dimensions=width) for t in texts])
        if fault == "unnormalized":
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True) * 7
        if fault == "not_json":
            return b"<html><body>502 Bad Gateway</body></html>"
        if fault not in ("ragged", "null", "nan", "overflow", "bool", "string", "few", "many"):
            return orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY)
        rows: list[list[Any]] = vectors.tolist()
        if fault == "ragged":
            rows[-1] = rows[-1][:-1]
        elif fault == "few":
            rows = rows[:-1]
        elif fault == "many":
            rows.append(rows[-1])
        else:
            rows[0][0] = {"null": None, "nan": 12345.5, "overflow": 1e39, "bool": True, "string": "0.5"}[fault]
        payload = orjson.dumps(rows)
        return payload.replace(b"12345.5", b"NaN") if fault == "nan" else payload

    def _error(self, n: int, body: bytes, status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
        """A TEI JSON error body: `{"error": ..., "error_type": ...}`."""
        self._record(n, body, status)
        payload = orjson.dumps({"error": message, "error_type": _ERROR_TYPES.get(status, "Backend")})
        return status, payload, _JSON

    def _plain(self, body: bytes, status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
        """A plain-text error as axum sends it before TEI reads the request (413, 415, 400 and 422 on bad JSON)."""
        self._record(0, body, status)
        return status, message.encode(), _TEXT

    def _record(self, n: int, body: bytes, status: int, tokens: int = 0) -> None:
        with self._lock:
            self.requests.append(RequestRecord(n, len(body), status, tokens))


def _request_problem(request: Any) -> str | None:
    """Why serde would not deserialize `request` into TEI's EmbedRequest (router/src/http/types.rs:411-446)."""
    if not isinstance(request, dict):
        return "expected a JSON object"
    if "inputs" not in request:
        return "missing field `inputs`"
    inputs = request["inputs"]
    if not isinstance(inputs, str) and not (isinstance(inputs, list) and all(isinstance(t, str) for t in inputs)):
        return "`inputs` must be a string or a list of strings (token ids are not modelled by this stand-in)"
    for key in ("truncate", "normalize"):
        value = request.get(key)
        if value is not None and type(value) is not bool:
            return f"`{key}` must be a boolean"
    if "normalize" in request and request["normalize"] is None:
        return "`normalize` must be a boolean"
    dimensions = request.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 0):
        return "`dimensions` must be a non-negative integer"
    direction = request.get("truncation_direction")
    if direction is not None and direction not in _DIRECTIONS:
        return f"unknown variant `{direction}`, expected `Left` or `Right`"
    prompt_name = request.get("prompt_name")
    if prompt_name is not None and not isinstance(prompt_name, str):
        return "`prompt_name` must be a string"
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the stdlib's 5 would reset or stall the client's burst of connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (it failed, or gave up on a slow answer) is routine; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    wbufsize = -1  # one write per answer: headers and body in separate segments stall 40 ms on delayed ACKs
    tei: TEIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/info":
            self._send(200, orjson.dumps(self.tei.info), _JSON)
        elif self.path in ("/health", "/"):
            self._send(200, b"", {})
        else:
            self._send(404, b"", {})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path not in ("/embed", "/"):
            self._send(404, b"", {})
            return
        answer = self.tei.handle_embed(body, self.headers.get("content-type") or "")
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


class FakeRouter:
    """Stands in for text-embeddings-router in a rendered app's Embedder: this server already listens."""

    @classmethod
    def start(cls, args: list[str], *, port: int, timeout: float) -> FakeRouter:
        return cls()

    def stop(self) -> None:
        pass
