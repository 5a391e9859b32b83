"""Checks on every batch of vectors an engine answers, before anything is written.

Both engines (the TEI client and the local engine) pass their answers through here, so a vector that reaches a
shard file is one per input, of the run's one dimension (`dimensions` when set), finite, and of unit norm when
`normalize` is on. A failure is a `VectorCheckError` whose one-line message names the engine (`source`), the texts
(`where`) and the check; the caller adds the shard. No torch here: the core package imports it.
"""

from __future__ import annotations

import re

import numpy as np
import orjson

from volembed_runner.errors import VectorCheckError

# |norm - 1| allowed with `normalize` on. TEI scales by 1/sqrt(sum of squares in f64) and answers f32
# (core/src/infer.rs:288-301 at v1.9.3), the local engine normalizes in f32: both land within ~1e-6.
NORM_TOLERANCE = 1e-3

# Bytes that nested JSON arrays of JSON numbers consist of. `null`, `true`/`false`, strings, objects and the
# non-JSON `NaN`/`Infinity` all contain a byte outside this set; orjson + numpy would otherwise store null as NaN
# and true as 1.0 without complaint.
_NUMERIC_JSON = b"0123456789+-.eE,[] \t\r\n"
_NOT_NUMERIC = re.compile(rb"[^0-9+\-.eE,\[\] \t\r\n]")
_KINDS = (
    (b"null", "null"),
    (b"true", "a boolean"),
    (b"false", "a boolean"),
    (b'"', "a string"),
    (b"{", "an object"),
    (b"NaN", "NaN (not JSON)"),
    (b"Infinity", "Infinity (not JSON)"),
)


def parse_vectors_json(body: bytes, *, source: str, where: str, indices: tuple[int, ...] = ()) -> np.ndarray:
    """A JSON body of vectors (`[[f32, ...], ...]`, TEI's /embed answer) as a float32 array.

    Refuses, as `VectorCheckError`, a body that is not JSON (`json`), holds anything but numbers (`numeric`) or is
    ragged (`shape`); the byte scan costs one C pass over the body.
    """
    if body.translate(None, _NUMERIC_JSON):
        match = _NOT_NUMERIC.search(body)
        pos = match.start() if match else 0
        snippet = body[pos:pos + 16]
        kind = next((k for prefix, k in _KINDS if snippet.startswith(prefix)), "text that is not a number")
        message = f"{source}: {where}: numeric check failed: the answer holds {kind} at byte {pos} ({snippet!r})"
        raise VectorCheckError(message, "numeric", indices)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        head = body[:40]
        raise VectorCheckError(f"{source}: {where}: json check failed: {exc} (body starts {head!r})", "json",
                               indices) from exc
    try:
        with np.errstate(over="ignore"):  # 1e39 becomes inf here and is refused by the finite check
            return np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise VectorCheckError(f"{source}: {where}: shape check failed: vectors of different lengths in one answer",
                               "shape", indices) from exc


def check_vectors(
    vectors: np.ndarray,
    *,
    rows: int,
    dim: int,
    normalize: bool,
    source: str,
    where: str,
    indices: tuple[int, ...] = (),
    tolerance: float = NORM_TOLERANCE,
) -> np.ndarray:
    """`vectors` as float32 [rows, dim] if they are one finite vector per text (unit norm when `normalize`)."""

    def fail(check: str, detail: str) -> VectorCheckError:
        return VectorCheckError(f"{source}: {where}: {check} check failed: {detail}", check, indices)

    if vectors.ndim != 2:
        raise fail("shape", f"an array of shape {vectors.shape}, not one vector per text")
    if vectors.shape[0] != rows:
        raise fail("count", f"{vectors.shape[0]} vectors for {rows} texts")
    if vectors.shape[1] == 0:
        raise fail("dimension", "empty (0-dim) vectors")
    if vectors.shape[1] != dim:
        raise fail("dimension", f"{vectors.shape[1]}-dim vectors, the run's vectors are {dim}-dim")
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise fail("finite", f"vector {row} of {rows} holds NaN or infinity")
    if normalize:
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
        off = np.abs(norms - 1.0) > tolerance
        if off.any():
            row = int(np.argmax(off))
            raise fail("norm", f"vector {row} has norm {norms[row]:.6g}, but normalize is on (1 ± {tolerance:g})")
    return vectors


class VectorCheck:
    """The checks for one run's vectors from one engine. The dimension is `dimensions`, else `dim`, else fixed by
    the first answer that passes the count check; every later answer must match it."""

    def __init__(
        self,
        source: str,
        *,
        normalize: bool,
        dim: int | None = None,
        dimensions: int | None = None,
        tolerance: float = NORM_TOLERANCE,
    ) -> None:
        self.source = source
        self.normalize = normalize
        self.dim = dimensions or dim
        self.tolerance = tolerance

    def __call__(self, vectors: np.ndarray, rows: int, *, where: str, indices: tuple[int, ...] = ()) -> np.ndarray:
        """`vectors` as float32 [rows, dim] when they pass every check; raises VectorCheckError otherwise."""
        if self.dim is None and vectors.ndim == 2 and vectors.shape[0] == rows and vectors.shape[1] > 0:
            self.dim = int(vectors.shape[1])
        return check_vectors(vectors, rows=rows, dim=self.dim or 0, normalize=self.normalize, source=self.source,
                             where=where, indices=indices, tolerance=self.tolerance)
