"""Tokens and chunks per document: sampled through the real tokenizer and window rule until the mean settles, or
derived from byte sizes with a stated bytes-per-token ratio and document-length model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from volembed_runner import catalog, models
from volembed_runner.chunking import chunk_texts, load_tokenizer
from volembed_runner.plan import Plan

SAMPLE_CAP = 5_000  # documents sampled at most
MIN_SAMPLE = 200  # documents sampled at least before convergence may stop the sample
SAMPLE_BATCH = 100  # documents per step; the running mean is checked after each
SAMPLE_TOKEN_BUDGET = 5_000_000  # tokens sampled at most (~10 s of tokenizing on one core)
CONVERGED = 0.01  # the running mean changed by less than this ...
CONVERGED_STEPS = 3  # ... this many steps in a row
RATIO_UNCERTAINTY = 0.15  # ± on a bytes-per-token ratio measured on another corpus
Z95 = 1.96


@dataclass
class CountingTokenizer:
    """The tokenizer documents are counted with, and how it was found."""

    tok: Tokenizer
    note: str


def counting_tokenizer(plan: Plan) -> CountingTokenizer | None:
    """The model's own tokenizer from disk, else a packaged tokenizer of the same catalog family (offline stand-in)."""
    model = plan.model  # looked up on this machine by its reference, whatever the backend's copy is called
    found = models.offline_tokenizer_file(model.ref, model.revision)
    if found is None:
        return None
    path, source = found
    tok = load_tokenizer(path)
    if source == model.ref:
        return CountingTokenizer(tok, f"tokens counted with {model.ref}'s own tokenizer ({path})")
    return CountingTokenizer(tok, f"{model.ref}'s tokenizer is not on this machine: tokens counted with {source}'s "
                                  f"tokenizer, the same {model.tokenizer_family} family, standing in offline")


def added_tokens(plan: Plan) -> tuple[int, int]:
    """(special, prefix) tokens the engine adds to every chunk, as the plan resolved them."""
    special = plan.model.special_tokens
    return special, plan.embed.input_overhead - special


def bytes_per_token(plan: Plan) -> tuple[float, str]:
    """UTF-8 bytes per token for the model's tokenizer family (the catalog's measured ratio), and its source."""
    ratios = catalog.throughput()["bytes_per_token"]
    family = plan.model.tokenizer_family
    name = family if family in ratios else "default"
    entry = ratios[name]
    return float(entry["value"]), f"{entry['value']} bytes/token for tokenizer family {name}: {entry['derivation']} " \
                                  f"({entry['source']})"


@dataclass
class Sample:
    """Per-document counts of the sampled documents, through the real tokenizer and window rule."""

    size: int
    overlap: int
    prefix: str = ""
    tokens: list[int] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    embedded: list[int] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    complete: bool = False
    converged: bool = False
    note: str = ""
    _means: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.tokens)

    def add(self, tok: Tokenizer, texts: list[str]) -> None:
        """Count each text's tokens, chunks and chunk tokens with the chunk stage's own chunker (so a sample of the
        whole dataset is exact)."""
        cols = chunk_texts(tok, texts, self.size, self.overlap, prefix=self.prefix)
        doc_index = np.asarray(cols.doc_index, dtype=np.int64)
        chunks = np.bincount(doc_index, minlength=len(texts))
        embedded = np.bincount(doc_index, weights=np.asarray(cols.n_tokens, dtype=np.float64), minlength=len(texts))
        self.tokens.extend(cols.tokens_per_doc)
        self.chunks.extend(int(c) for c in chunks)
        self.embedded.extend(int(e) for e in embedded)
        self.nbytes.extend(len(text.encode("utf-8")) for text in texts)
        if self.n:
            self._means.append(sum(self.embedded) / self.n)

    def settled(self) -> bool:
        """True once the running mean of chunk tokens/doc moved < 1% over the last steps and its 95% interval is
        within ±1% (a stable mean of a heavy-tailed sample can still be far off; the interval says so)."""
        if self.n < MIN_SAMPLE or len(self._means) <= CONVERGED_STEPS:
            return False
        recent = self._means[-CONVERGED_STEPS - 1 :]
        base = recent[-1] or 1.0
        stable = all(abs(b - a) / base < CONVERGED for a, b in zip(recent, recent[1:], strict=False))
        mean, sd = mean_sd(self.embedded)
        return stable and Z95 * sd / math.sqrt(self.n) <= CONVERGED * max(mean, 1e-9)


def mean_sd(values: list[int]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def sample_texts(
    tok: Tokenizer, batches: Iterator[list[str]], sample: Sample, cap: int, *, whole: bool = False
) -> Sample:
    """Feed text batches to the sample until exhausted (complete), settled, or a cap.

    With `whole` (the population fits under the cap) convergence does not stop it: reading everything is exact.
    """
    for texts in batches:
        room = cap - sample.n
        sample.add(tok, texts[:room])
        if len(texts) > room:
            return sample
        if sample.n >= cap or sum(sample.tokens) >= SAMPLE_TOKEN_BUDGET:
            return sample
        if not whole and sample.settled():
            sample.converged = True
            return sample
    sample.complete = True
    return sample
