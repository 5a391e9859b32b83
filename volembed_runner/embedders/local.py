"""The in-process embedding engine: sentence-transformers on torch, CPU, for `backend: local`.

It stands in for TEI and behaves like it: the spec's prefix is prepended once, the model's own Normalize module is
skipped and vectors are L2-normalized only when `normalize` is set, `dimensions` keeps the leading (Matryoshka)
components. Texts are sorted by token count and packed into batches by a padded-token budget; rows come back in
input order. bf16 (autocast: matmuls in bf16, the rest in fp32) is ~1.7-2x faster than fp32 on CPUs with native
bf16 at cosine >= 0.9999, so `precision: auto` picks it exactly there.

torch and sentence-transformers are imported when an engine is built, never when this module is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from volembed_runner.embedders.vectors import check_vectors
from volembed_runner.errors import EmbedderError, ModelError, TextsFailedError
from volembed_runner.machine import Precision, resolve_precision, usable_cores
from volembed_runner.models import resolve_model_dir

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# Padded tokens per forward pass and texts per pass: 32 x 256 was the fastest shape on a 2-core CPU; the token
# budget also bounds attention memory for long-context models (one 8,192-token text runs alone).
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_MAX_BATCH_SIZE = 32


def pack_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with max(length) * count <= batch_tokens and count <=
    max_batch_size; a text longer than the budget runs alone. Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    padded = 0
    for i in order:
        if current and ((len(current) + 1) * padded > batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        if not current:
            padded = max(lengths[i], 1)
        current.append(i)
    if current:
        batches.append(current)
    return batches


class LocalEmbedder:
    """Embeds texts in this process on the CPU with a sentence-transformers model found on this machine."""

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        prefix: str = "",
        normalize: bool = True,
        precision: Precision = "auto",
        dimensions: int | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        threads: int | None = None,
        download: bool = True,
        truncate: bool = True,
    ) -> None:
        if batch_tokens < 1 or max_batch_size < 1:
            raise EmbedderError(f"batch_tokens ({batch_tokens}) and max_batch_size ({max_batch_size}) must be >= 1")
        self.model = model
        self.revision = revision
        self.prefix = prefix
        self.normalize = normalize
        self.precision: Literal["fp32", "bf16"] = resolve_precision(precision)
        self.truncate = truncate  # off: a text over the model's limit is an error (as TEI's 422), not cut
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.path = resolve_model_dir(model, revision, download=download)
        # Counters over the engine's lifetime; the embed stage reads them before and after a shard.
        self.truncated = 0
        self.texts_embedded = 0

        import torch

        self.threads = threads or usable_cores()
        torch.set_num_threads(self.threads)
        self._st = _load(model, self.path)
        self._modules = _forward_modules(self._st)
        self._preprocess = getattr(self._st, "preprocess", None) or self._st.tokenize  # sentence-transformers 6 / 5
        tokenizer = self._st.tokenizer
        self.max_seq_length: int = self._st.max_seq_length or getattr(tokenizer, "model_max_length", None) or 512
        self._special_tokens = _special_tokens(tokenizer)
        self._prefix_tokens = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        self.dimensions: int | None = None
        self.model_dim = self._probe_dim()
        if dimensions is not None and not 1 <= dimensions <= self.model_dim:
            raise ModelError(f"embedding.dimensions={dimensions}: model {model} gives {self.model_dim}-dim vectors")
        self.dimensions = dimensions
        self.dim: int = dimensions or self.model_dim

    def embed(self, texts: list[str], n_tokens: list[int]) -> np.ndarray:
        """float32 vectors [len(texts), dim] in input order; `n_tokens` (tokens per text, no specials) packs them."""
        if len(n_tokens) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(n_tokens)} token counts")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        overhead = self._special_tokens + self._prefix_tokens
        if not self.truncate:
            over = [i for i, n in enumerate(n_tokens) if n + overhead > self.max_seq_length]
            if over:
                raise TextsFailedError(
                    f"local engine ({self.model}): text {over[0]} is {n_tokens[over[0]] + overhead} tokens with its "
                    f"special and prefix tokens, over the model's {self.max_seq_length}", tuple(over))
        lengths = [min(n + overhead, self.max_seq_length) for n in n_tokens]
        for batch in pack_batches(lengths, self.batch_tokens, self.max_batch_size):
            out[batch] = self._embed_batch([self.prefix + texts[i] for i in batch])
        out = check_vectors(out, rows=len(texts), dim=self.dim, normalize=self.normalize,
                            source=f"local engine ({self.model})", where=f"{len(texts)} texts")
        self.texts_embedded += len(texts)
        return out

    def truncations(self, n_tokens: list[int]) -> int:
        """How many texts of these token counts the engine cuts to its limit (with special and prefix tokens)."""
        overhead = self._special_tokens + self._prefix_tokens
        return sum(1 for n in n_tokens if n + overhead > self.max_seq_length)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                features = self._preprocess(texts)
                self.truncated += self._count_truncated(texts, features["attention_mask"])
                for module in self._modules:
                    features = module(features)
                vectors = features["sentence_embedding"].float()
            if self.dimensions is not None:
                vectors = vectors[:, : self.dimensions]
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return vectors.numpy()
        except (RuntimeError, MemoryError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            message = f"local engine failed on a batch of {len(texts)} texts ({self.model}): {reason}"
            raise EmbedderError(message) from exc

    def _count_truncated(self, texts: list[str], attention_mask: Any) -> int:
        """Texts cut at max_seq_length; only rows that fill it are re-tokenized to check."""
        full = (attention_mask.sum(dim=1) >= self.max_seq_length).nonzero().flatten().tolist()
        if not full:
            return 0
        ids = self._st.tokenizer([texts[i] for i in full], truncation=False, verbose=False)["input_ids"]
        return sum(len(row) > self.max_seq_length for row in ids)

    def _probe_dim(self) -> int:
        """The width of the model's output, from one empty text (some models do not declare it)."""
        return int(self._embed_batch([""]).shape[1])

    def __repr__(self) -> str:
        return f"LocalEmbedder({self.model!r}, precision={self.precision!r}, dim={self.dim}, threads={self.threads})"


def _load(model: str, path: Path) -> SentenceTransformer:
    """The model from its folder, with no network and no progress bars."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    except Exception as exc:  # transformers/safetensors raise many types for a broken or unsupported folder
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"model {model} in {path} cannot be loaded by sentence-transformers: {reason}") from exc
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    st.eval()
    return st


def _forward_modules(st: SentenceTransformer) -> list[Any]:
    """The model's modules minus Normalize: normalization is the engine's `normalize` setting, as in TEI."""
    try:
        from sentence_transformers.base.modules import Normalize
    except ImportError:  # sentence-transformers 5
        from sentence_transformers.models import Normalize
    return [m for m in st if not isinstance(m, Normalize)]


def _special_tokens(tokenizer: Any) -> int:
    try:
        return int(tokenizer.num_special_tokens_to_add(pair=False))
    except (AttributeError, TypeError):
        return 2
