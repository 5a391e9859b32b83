"""Token-window chunking: cut documents into windows of the embedding model's own tokens, with character offsets.

What a chunk is (`chunk_texts`; pure functions, no I/O: the chunk stage, `stages/chunk.py`, reads shards,
calls `chunk_texts` and writes the chunk shards):

* A slice of the original text (case, accents and spacing kept, never a decode), stripped of the whitespace at its
  two ends. Offsets are Unicode code-point positions (Python `str` indices) into the document's text.
* It fits the model by construction. `n_tokens` is the exact count a server sees for the chunk beyond the prefix
  and the special tokens: `len(encode(prefix + text)) - len(encode(prefix))`, both without special tokens, where
  `prefix` is what the engine puts before every chunk ("" if none). Every chunk has `n_tokens <= size`, counted by
  re-encoding its own text, not in the document's tokenization (a window cut out of its context can tokenize
  longer, and so can the junction with the prefix). So with the spec's `size <= max_input_tokens - special_tokens -
  len(encode(prefix))`, every request is within the model's limit.
* Windows are placed on the document's tokens, at most `size` of them each. A window ends on the last word
  boundary in its back half (whitespace first, then the tokenizer's pre-token boundaries, such as punctuation or
  each CJK character for BERT, then any token boundary, so a "word" longer than a window is still cut); the next
  starts `overlap` tokens before that end, moved to the nearest word start within `WORD_TOKENS` tokens (back
  first, so overlap is honoured to within a word). The last chunk ends at the document's end and starts at the
  earliest word start from which it fits, so no chunk is pure overlap, and a document that fits is one chunk.
  A cut never falls inside a character (between byte tokens of one character).
* Each placed window is verified before the next is placed; one that re-encodes over `size` ends one boundary
  earlier. The exact count is found cheaply. A window cut out of the document tokenizes differently only next to
  its cut edges: normalizers and pre-tokenizers look at neighbouring characters only, and WordPiece, BPE and
  Unigram tokenize each pre-token alone. So each cut edge is re-encoded as a probe (the window's first or last
  `PROBE_TOKENS` document tokens, the head after the prefix). A probe's tokens are the chunk's except in its own
  cut pre-token (the head probe's last, the tail probe's first); where another of its pre-tokens has exactly the
  document's token spans, with pre-token boundaries at both ends in both, the tokenizations have met, and from
  there on the chunk's tokens are the document's. The count is the document's, corrected by the difference the
  probes show outside those points. A chunk that is the whole document needs no probe; a short chunk, or one whose
  probes do not meet the document (a longer probe is tried first), is re-encoded whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tokenizers import Encoding, Tokenizer

from volembed_runner.errors import ModelError, SourceError

# Documents longer than this many characters are tokenized in pieces, so memory stays bounded by the piece.
MAX_PIECE_CHARS = 100_000
# Characters each piece reads past its cut, to confirm the cut leaves the tokens unchanged.
PIECE_MARGIN_CHARS = 2_000
# Pieces of one long document handed to one `encode_batch` call (spread over cores by the tokenizer).
PIECES_PER_CALL = 8
# One `encode_batch` call holds at most this many characters / documents (bounds the Encodings held at once).
BATCH_CHARS = 262_144
BATCH_DOCS = 1_024
# Document tokens re-encoded at each cut edge of a chunk, and a longer second try where the first does not agree.
PROBE_TOKENS = (4, 32)
# How far (in tokens) a chunk's start may move from `overlap` tokens before the previous end to reach a word start.
WORD_TOKENS = 16
# Chunks of one document placed ahead of their verification at most (doubling while all fit, halving on a misfit).
MAX_AHEAD = 64
_SPACE_BEFORE_WORD = re.compile(r"\s(?=\S)")
_NON_SPACE = re.compile(r"\S")


@dataclass
class ChunkColumns:
    """The chunks of a list of documents as parallel columns, plus the per-document counts a shard's stats need."""

    doc_index: list[int] = field(default_factory=list)
    chunk_index: list[int] = field(default_factory=list)
    char_start: list[int] = field(default_factory=list)
    char_end: list[int] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    documents: int = 0
    empty_documents: int = 0
    doc_tokens: int = 0
    tokens_per_doc: list[int] = field(default_factory=list)  # each document's tokens (0 when empty)

    def __len__(self) -> int:
        return len(self.text)

    def _add(self, doc: int, chunk: int, start: int, end: int, n_tokens: int, text: str) -> None:
        self.doc_index.append(doc)
        self.chunk_index.append(chunk)
        self.char_start.append(start)
        self.char_end.append(end)
        self.n_tokens.append(n_tokens)
        self.text.append(text)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json with its truncation and padding turned off: a chunker must see every token."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for missing files and bad JSON alike
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load tokenizer {path}: {reason}") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def check_window(size: int, overlap: int) -> None:
    """Raise ValueError unless `size` >= 1 and 0 <= `overlap` < `size`."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1 token, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap must be >= 0 and smaller than the size ({size}), got {overlap}")


def windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Nominal token windows [start, end) of `size` every `size - overlap` tokens; the last is full and ends at
    `n_tokens`. `chunk_texts` places its chunks by the same rule, moved to word boundaries; the estimator counts
    with it."""
    check_window(size, overlap)
    if n_tokens <= 0:
        return []
    if n_tokens <= size:
        return [(0, n_tokens)]
    stride = size - overlap
    out = [(start, start + size) for start in range(0, n_tokens - size, stride)]
    out.append((n_tokens - size, n_tokens))
    return out


def chunk_texts(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    size: int,
    overlap: int,
    *,
    prefix: str = "",
    max_piece_chars: int = MAX_PIECE_CHARS,
) -> ChunkColumns:
    """Chunk documents (see the module docstring); empty, whitespace-only and token-less documents give no chunk.

    Documents are batch-encoded without special tokens and read lazily near the cuts, so the Python work grows
    with chunks, not tokens. Documents longer than `max_piece_chars` are tokenized in pieces cut at spaces (same
    chunks, bounded memory); `tokenizer` must not truncate (see `load_tokenizer`). `prefix` is the text the engine
    puts before every chunk; `n_tokens` counts what each chunk adds to it. Raises SourceError when `size` is too
    small for a piece of text that cannot be cut further.
    """
    check_window(size, overlap)
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError("the tokenizer truncates or pads, which would cut documents silently; use load_tokenizer()")
    if max_piece_chars < 64:
        raise ValueError(f"max_piece_chars must be at least 64, got {max_piece_chars}")
    counter = _Counter(tokenizer, prefix)
    out = ChunkColumns(documents=len(texts), tokens_per_doc=[0] * len(texts))
    batch: list[int] = []
    batch_chars = 0
    for i, text in enumerate(texts):
        if not text or text.isspace():
            out.empty_documents += 1
            continue
        if len(text) > max_piece_chars:
            _chunk_batch(counter, texts, batch, size, overlap, out)
            batch, batch_chars = [], 0
            _chunk_long(counter, text, i, size, overlap, max_piece_chars, out)
            continue
        if batch and (batch_chars + len(text) > BATCH_CHARS or len(batch) >= BATCH_DOCS):
            _chunk_batch(counter, texts, batch, size, overlap, out)
            batch, batch_chars = [], 0
        batch.append(i)
        batch_chars += len(text)
    _chunk_batch(counter, texts, batch, size, overlap, out)
    return out


def _chunk_batch(
    counter: _Counter, texts: Sequence[str], indices: list[int], size: int, overlap: int, out: ChunkColumns
) -> None:
    """Encode documents in one call, place and verify their chunks together, and add them in document order."""
    if not indices:
        return
    encodings = counter.tokenizer.encode_batch([texts[i] for i in indices], add_special_tokens=False)
    plans: list[_Plan | int | None] = []
    for i, enc in zip(indices, encodings, strict=True):
        text, n = texts[i], len(enc)
        if n == 0:
            plans.append(None)
        elif n <= size and not counter.prefix and not text[0].isspace() and not text[-1].isspace():
            plans.append(n)  # the whole document is the chunk, and its tokens are the document's: nothing to check
        else:
            plans.append(_Plan(i, text, _EncodingTokens(enc), size, overlap))
    _run([p for p in plans if isinstance(p, _Plan)], counter)
    for i, plan in zip(indices, plans, strict=True):
        if plan is None:
            out.empty_documents += 1
        elif isinstance(plan, int):
            out.doc_tokens += plan
            out.tokens_per_doc[i] = plan
            out._add(i, 0, 0, len(texts[i]), plan, texts[i])
        else:
            _add_plan(plan, out)


def _chunk_long(
    counter: _Counter, text: str, doc: int, size: int, overlap: int, max_piece_chars: int, out: ChunkColumns
) -> None:
    """Add the chunks of a document too long to encode in one piece."""
    tokens: _Tokens | None = _long_doc_tokens(counter.tokenizer, text, max_piece_chars)
    if tokens is None:  # a cut would have changed the tokens: encode it whole (correct, more memory)
        tokens = _EncodingTokens(counter.tokenizer.encode(text, add_special_tokens=False))
    if tokens.n == 0:
        out.empty_documents += 1
        return
    plan = _Plan(doc, text, tokens, size, overlap)
    _run([plan], counter)
    _add_plan(plan, out)


def _add_plan(plan: _Plan, out: ChunkColumns) -> None:
    """Add a finished plan's chunks, leaving out empty ones (a window of whitespace-only tokens)."""
    out.doc_tokens += plan.n
    out.tokens_per_doc[plan.doc] = plan.n
    k = 0
    for a, b, count in plan.chunks:
        if b > a:
            out._add(plan.doc, k, a, b, count, plan.text[a:b])
            k += 1


def _run(plans: list[_Plan], counter: _Counter) -> None:
    """Place and verify the chunks of several documents in lockstep, one `encode_batch` of probes per round."""
    active = plans
    while active:
        proposed = [plan.propose() for plan in active]
        counts = counter.counts([(plan, p) for plan, props in zip(active, proposed, strict=True) for p in props])
        at = 0
        for plan, props in zip(active, proposed, strict=True):
            plan.settle(props, counts[at : at + len(props)])
            at += len(props)
        active = [plan for plan in active if not plan.done]


class _Tokens(Protocol):
    """A document's tokens as the planner reads them: count, character span and pre-token (word) index of each."""

    n: int
    span: Callable[[int], tuple[int, int]]
    word: Callable[[int], int]


class _EncodingTokens:
    """The tokens of an Encoding, read one at a time (no per-token lists are built)."""

    __slots__ = ("n", "span", "word")

    def __init__(self, enc: Encoding) -> None:
        self.n = len(enc)
        self.span = enc.token_to_chars
        self.word = enc.token_to_word


class _ArrayTokens:
    """The tokens of a document encoded in pieces, as arrays."""

    __slots__ = ("n", "_starts", "_ends", "_words")

    def __init__(self, starts: np.ndarray, ends: np.ndarray, words: np.ndarray) -> None:
        self.n = len(starts)
        self._starts, self._ends, self._words = starts, ends, words

    def span(self, t: int) -> tuple[int, int]:
        return int(self._starts[t]), int(self._ends[t])

    def word(self, t: int) -> int:
        return int(self._words[t])


class _Lazy:
    """A list computed from an iterator as far as it is read."""

    __slots__ = ("_items", "_source")

    def __init__(self, source: Iterator[int]) -> None:
        self._items: list[int] = []
        self._source = source

    def get(self, k: int) -> int | None:
        while len(self._items) <= k:
            item = next(self._source, None)
            if item is None:
                return None
            self._items.append(item)
        return self._items[k]


@dataclass(frozen=True, slots=True)
class _Step:
    """Where a document's plan stands: the next chunk's candidates, best first, and which one is being tried.

    A regular step has a fixed start and candidate ends; a final step (the chunk that ends at the document's end)
    has candidate starts and keeps the regular start it falls back to.
    """

    prev_start: int
    prev_end: int
    start: int
    final: bool
    candidates: _Lazy
    tried: int = 0


@dataclass(frozen=True, slots=True)
class _Proposal:
    """One placed chunk awaiting its count: its tokens, its characters, and the step that follows if it fits."""

    step: _Step
    start: int
    end: int
    char_start: int
    char_end: int
    after: _Step | None


def _readers(text: str, tokens: _Tokens) -> tuple[Callable[[int], Any], ...]:
    """Cached readers of a document's tokens, each a function of token t (closures, so a plan holds no cycle):

    span: token t's characters; word_start: whether t begins a pre-token (the document's ends count);
    level: how good a cut before t is: 2 at whitespace or the document's ends, 1 at a pre-token boundary, 0 inside
    a word, -1 inside a character (tokens sharing it); start_char: where a chunk starting at t begins (after token
    t-1, past whitespace); end_char: where a chunk ending before t ends (at t's start, before whitespace).
    """
    n = tokens.n
    span = cache(tokens.span)
    word = tokens.word

    @cache
    def word_start(t: int) -> bool:
        return t <= 0 or t >= n or word(t) != word(t - 1)

    @cache
    def level(t: int) -> int:
        if t <= 0 or t >= n:
            return 2
        a0, a1 = span(t - 1)
        b0, b1 = span(t)
        if b0 < a1:
            return -1
        if b0 > a1 and (text[a1].isspace() or any(map(str.isspace, text[a1 + 1 : b0]))):
            return 2  # whitespace between the two tokens
        if (b1 > b0 and text[b0].isspace()) or (a1 > a0 and text[a1 - 1].isspace()):
            return 2  # a token that begins or ends with whitespace (Metaspace's "▁word", byte-level spaces)
        return 1 if word(t) != word(t - 1) else 0

    @cache
    def start_char(t: int) -> int:
        found = _NON_SPACE.search(text, span(t - 1)[1] if t > 0 else 0)
        return found.start() if found else len(text)

    @cache
    def end_char(t: int) -> int:
        b = span(t)[0] if t < n else len(text)
        width = 64
        while b > 0:  # strip back in doubling steps: linear in the whitespace, whatever its length
            lo = max(0, b - width)
            kept = len(text[lo:b].rstrip())
            if kept:
                return lo + kept
            b, width = lo, width * 2
        return 0

    return span, word_start, level, start_char, end_char


class _Plan:
    """One document's chunks, placed one after another; each is verified before the next counts as placed.

    Placement runs up to `ahead` chunks in front of verification (as if each fitted); a misfit discards the rest.
    """

    def __init__(self, doc: int, text: str, tokens: _Tokens, size: int, overlap: int) -> None:
        self.doc, self.text, self.tokens, self.n = doc, text, tokens, tokens.n
        self.size, self.overlap = size, overlap
        self.chunks: list[tuple[int, int, int]] = []
        self.done = False
        self.ahead = 4
        self.span, self.word_start, self.level, self._start_char, self._end_char = _readers(text, tokens)
        self._last: dict[int, int] = {}
        self._first: dict[int, int] = {}
        self.step = self._final_step(-1, 0, 0) if self.n <= size else self._regular_step(-1, 0, 0)

    def propose(self) -> list[_Proposal]:
        """The next chunks, placed as if each fitted."""
        out: list[_Proposal] = []
        step: _Step | None = self.step
        while step is not None and len(out) < self.ahead:
            step, start, end = self._resolve(step)
            char_start, char_end = self._chars(start, end)
            after = self._after(start, end)
            out.append(_Proposal(step, start, end, char_start, char_end, after))
            step = after
        return out

    def settle(self, proposals: list[_Proposal], counts: list[int]) -> None:
        """Keep the proposed chunks up to the first that does not fit; that one is retried with its next candidate."""
        for p, count in zip(proposals, counts, strict=True):
            if count > self.size:
                self.step = replace(p.step, tried=p.step.tried + 1)
                self.ahead = max(1, self.ahead // 2)
                return
            self.chunks.append((p.char_start, p.char_end, count))
            if p.after is None:
                self.done = True
                return
            self.step = p.after
        self.ahead = min(MAX_AHEAD, self.ahead * 2)

    def _chars(self, start: int, end: int) -> tuple[int, int]:
        """The characters of tokens [start, end), with what lies between them and their neighbours, stripped."""
        a, b = self._start_char(start), self._end_char(end)
        return (a, b) if a < b else (a, a)

    def _last_start(self, end: int) -> int:
        """The last token a chunk may start at after a chunk ending before token `end`: `end`, or past the
        whitespace-only tokens that follow it (a start there leaves out no character but whitespace)."""
        got = self._last.get(end)
        if got is None:
            floor = self._start_char(end)  # a chunk from t begins there too while token t-1 ends by it
            got = end
            while got + 1 < self.n and self.span(got)[1] <= floor:
                got += 1
            self._last[end] = got
        return got

    def _first_end(self, prev_end: int) -> int:
        """The first token a chunk may end before after a chunk ending before token `prev_end`: one whose end lies
        at a later character (past whitespace-only tokens, and characters no token holds)."""
        got = self._first.get(prev_end)
        if got is None:
            found = _NON_SPACE.search(self.text, self._end_char(prev_end))
            floor = found.start() if found else len(self.text)  # the next character a later end must include
            got = prev_end + 1
            while got < self.n and self.span(got)[0] <= floor:
                got += 1
            self._first[prev_end] = got
        return got

    def _later_start(self, start: int, hi: int) -> int:
        """The first token after `start`, up to `hi`, whose chunk would begin at a later character (a start on a
        whitespace-only token begins where the next token's does)."""
        floor = self._start_char(start)
        return next((t for t in range(start + 1, hi) if self.span(t - 1)[1] > floor), hi)

    def _regular_step(self, prev_start: int, prev_end: int, start: int) -> _Step:
        lo, hi = max(self._first_end(prev_end), start + 1), min(start + self.size, self.n)
        return _Step(prev_start, prev_end, start, False, _Lazy(self._ends(start, lo, hi)))

    def _final_step(self, prev_start: int, prev_end: int, start: int) -> _Step:
        # Within `size` of the end, and beginning after the predecessor does; at most at its end (no gap).
        lo = max(self.n - self.size, 0 if prev_start < 0 else self._later_start(prev_start, start))
        return _Step(prev_start, prev_end, start, True, _Lazy(self._starts(lo, self._last_start(prev_end))))

    def _ends(self, start: int, lo: int, hi: int) -> Iterator[int]:
        """Ends in [lo, hi] for a chunk from `start`, best first: word boundaries in the back half (whitespace, then
        pre-token; latest first), then in the front half, then any token boundary."""
        mid = min(max(lo, start + self.size // 2), hi + 1)
        level = self.level
        for top, bottom in ((hi, mid), (mid - 1, lo)):
            pre_token: list[int] = []
            for t in range(top, bottom - 1, -1):
                got = level(t)
                if got == 2:
                    yield t
                elif got == 1:
                    pre_token.append(t)
            yield from pre_token
        yield from (t for t in range(hi, lo - 1, -1) if level(t) == 0)

    def _starts(self, lo: int, hi: int) -> Iterator[int]:
        """Starts in [lo, hi] for the last chunk, best first: whitespace, then pre-token, then any boundary;
        earliest first, so the last chunk is as full as it can be."""
        pre_token: list[int] = []
        inside: list[int] = []
        for t in range(lo, hi + 1):
            got = self.level(t)
            if got == 2:
                yield t
            elif got == 1:
                pre_token.append(t)
            elif got == 0:
                inside.append(t)
        yield from pre_token
        yield from inside

    def _next_start(self, start: int, end: int) -> int:
        """The start after chunk [start, end): `overlap` tokens before its end, at the nearest word start, and
        beginning at a later character than the chunk does."""
        hi = self._last_start(end)
        lo = self._later_start(start, hi)
        target = max(end - self.overlap, lo)
        back = range(target, max(lo, target - WORD_TOKENS) - 1, -1)
        forward = range(target + 1, min(hi, target + WORD_TOKENS) + 1)
        level = self.level
        for want in (2, 1):
            for t in chain(back, forward):
                if level(t) == want:
                    return t
        for t in chain(range(target, lo - 1, -1), range(target + 1, hi + 1)):
            if level(t) >= 0:
                return t
        return end  # unreachable: `end` was a cut

    def _after(self, start: int, end: int) -> _Step | None:
        """The step after chunk [start, end) fits: none at the document's end (or only whitespace tokens left), the
        last chunk once the rest fits."""
        if end >= self.n or self._end_char(end) >= self._end_char(self.n):
            return None
        nxt = self._next_start(start, end)
        if self.n - nxt <= self.size:
            return self._final_step(start, end, nxt)
        return self._regular_step(start, end, nxt)

    def _resolve(self, step: _Step) -> tuple[_Step, int, int]:
        """The chunk `step` tries, moving on to fallbacks when its candidates run out."""
        while True:
            got = step.candidates.get(step.tried)
            if got is not None:
                return (step, got, self.n) if step.final else (step, step.start, got)
            if step.final:  # the rest cannot be one chunk: cut it like any other
                step = self._regular_step(step.prev_start, step.prev_end, step.start)
                continue
            # No end from this start fits: start later, but early enough to reach past the predecessor's end and the
            # whitespace after it, and within that, so that nothing but whitespace is left out.
            first = max(step.start + 1, self._first_end(step.prev_end) - self.size)
            later = next((t for t in range(first, self._last_start(step.prev_end) + 1) if self.level(t) >= 0), None)
            if later is None:
                at = self._chars(step.start, min(step.start + 1, self.n))[0]
                raise SourceError(
                    f"document {self.doc}: no chunk of at most {self.size} tokens can be cut at character {at} "
                    f"({self.text[at : at + 20]!r}...); chunking.size is too small for this text"
                )
            step = self._regular_step(step.prev_start, step.prev_end, later)


class _Counter:
    """Exact token counts of placed chunks (`n_tokens`), from probes at their cut edges (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, prefix: str) -> None:
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.prefix_tokens = len(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0

    def counts(self, items: list[tuple[_Plan, _Proposal]]) -> list[int]:
        """`len(encode(prefix + text)) - len(encode(prefix))` of each proposed chunk's text."""
        counts = [0] * len(items)
        deltas: dict[int, list[int | None]] = {}  # item -> [head, tail] corrections; None: not known yet
        for k, (plan, p) in enumerate(items):
            if p.char_end <= p.char_start:
                continue
            head = bool(self.prefix) or p.start > 0 or p.char_start > 0
            tail = p.end < plan.n or p.char_end < len(plan.text)
            if head or tail:
                deltas[k] = [None if head else 0, None if tail else 0]
            else:  # the chunk is the whole document: its tokens are the document's
                counts[k] = p.end - p.start
        for length in PROBE_TOKENS:
            jobs = [
                (k, side)
                for k, known in deltas.items()
                for side in (0, 1)
                if known[side] is None and items[k][1].end - items[k][1].start > 2 * length
            ]
            if not jobs:
                break
            probes = [self._probe(*items[k], side, length) for k, side in jobs]
            for (k, side), enc in zip(jobs, self.tokenizer.encode_batch(probes, add_special_tokens=False), strict=True):
                plan, p = items[k]
                find = self._head if side == 0 else self._tail
                deltas[k][side] = find(plan, p, enc, length)
        whole: list[int] = []
        for k, (head_delta, tail_delta) in deltas.items():
            if head_delta is None or tail_delta is None:
                whole.append(k)
            else:
                counts[k] = items[k][1].end - items[k][1].start + head_delta + tail_delta
        if whole:
            texts = [self.prefix + items[k][0].text[items[k][1].char_start : items[k][1].char_end] for k in whole]
            for k, enc in zip(whole, self.tokenizer.encode_batch(texts, add_special_tokens=False), strict=True):
                counts[k] = len(enc) - self.prefix_tokens
        return counts

    def _probe(self, plan: _Plan, p: _Proposal, side: int, length: int) -> str:
        """The text re-encoded at one cut edge: the chunk's first `length` document tokens after the prefix (head),
        or its last `length` (tail)."""
        if side == 0:
            return self.prefix + plan.text[p.char_start : plan.span(p.start + length - 1)[1]]
        return plan.text[plan.span(p.end - length)[0] : p.char_end]

    def _head(self, plan: _Plan, p: _Proposal, probe: Encoding, length: int) -> int | None:
        """Chunk tokens minus document tokens before the first pre-token where the head probe and the document
        agree; None if they do not within the probe. The probe's tokens are the chunk's except in its last
        pre-token (cut by the probe's end), so that one never counts as agreeing."""
        offsets, words = probe.offsets, probe.word_ids
        skip, shift = len(self.prefix), p.char_start - len(self.prefix)
        i, j = 0, p.start
        while i < len(offsets) and words[i] != words[-1]:
            k = i + 1
            while words[k] == words[i]:
                k += 1
            x0 = offsets[i][0]
            if x0 >= skip and (i == 0 or offsets[i - 1][1] <= x0):
                while j < p.end and plan.span(j)[0] < x0 + shift:
                    j += 1
                if j == p.end:
                    return None
                if plan.span(j)[0] == x0 + shift and _same_pre_token(plan, j, offsets[i:k], shift):
                    return (i - self.prefix_tokens) - (j - p.start)
            i = k
        return None

    def _tail(self, plan: _Plan, p: _Proposal, probe: Encoding, length: int) -> int | None:
        """Chunk tokens minus document tokens after the last pre-token where the tail probe and the document
        agree; None if they do not within the probe. The probe's tokens are the chunk's except in its first
        pre-token (cut by the probe's start), so that one never counts as agreeing."""
        offsets, words = probe.offsets, probe.word_ids
        first = p.end - length
        shift = plan.span(first)[0]
        k, j = len(offsets), p.end - 1
        while k > 0 and words[k - 1] != words[0]:
            i = k - 1
            while words[i - 1] == words[k - 1]:
                i -= 1
            y1 = offsets[k - 1][1]
            if k == len(offsets) or offsets[k][0] >= y1:
                while j >= first and plan.span(j)[1] > y1 + shift:
                    j -= 1
                if j < first:
                    return None
                if plan.span(j)[1] == y1 + shift and _same_pre_token(plan, j - (k - i) + 1, offsets[i:k], shift):
                    return (len(offsets) - k) - (p.end - 1 - j)
            k = i
        return None


def _same_pre_token(plan: _Plan, t: int, probe: list[tuple[int, int]], shift: int) -> bool:
    """True if the document's tokens from t are exactly one pre-token whose tokens have the probe tokens' spans
    (plus `shift`), cleanly cut from their neighbours: the two token sequences meet at its two ends."""
    end = t + len(probe)
    if t < 0 or end > plan.n or not plan.word_start(t) or not plan.word_start(end):
        return False
    span, word_start = plan.span, plan.word_start
    for u, (x0, x1) in enumerate(probe):
        if (u and word_start(t + u)) or span(t + u) != (x0 + shift, x1 + shift):
            return False
    return (t == 0 or span(t - 1)[1] <= probe[0][0] + shift) and (end == plan.n or span(end)[0] >= probe[-1][1] + shift)


def _long_doc_tokens(tokenizer: Tokenizer, text: str, max_piece_chars: int) -> _ArrayTokens | None:
    """Spans and pre-token indices of every token of `text`, encoded in pieces; None if a cut would change them.

    Each piece reads `margin` characters past its cut; no token may straddle the cut, and the tokens it sees past
    the cut must equal the next piece's first tokens, which then take the offsets (and word starts) seen in
    context (a post-processor may trim the first token of a sequence differently). The tokens that agree must hold
    the next piece's first pre-token whole and lie before the piece's own last one (each cut by a piece's edge,
    so they can tokenize differently from the whole text while agreeing in part). So the pieces join into the
    tokens of the whole text.
    """
    margin = min(PIECE_MARGIN_CHARS, max_piece_chars // 8)
    cuts = _piece_cuts(text, max_piece_chars, margin)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    word_starts: list[np.ndarray] = []
    seen: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # the previous piece's tokens past its cut
    last = len(cuts) - 2
    for group_start in range(0, last + 1, PIECES_PER_CALL):
        group = range(group_start, min(group_start + PIECES_PER_CALL, last + 1))
        pieces = [text[cuts[k] : cuts[k + 1] + margin] for k in group]
        for k, enc in zip(group, tokenizer.encode_batch(pieces, add_special_tokens=False), strict=True):
            ids = np.asarray(enc.ids, dtype=np.int64)
            offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            words = np.asarray(enc.word_ids, dtype=np.int64)
            new_word = np.ones(len(ids), dtype=bool)
            new_word[1:] = words[1:] != words[:-1]
            if seen is not None:
                agreed = _agreed_offsets(seen[:2], (ids, offs), margin // 2)
                if agreed is None or not _whole_pre_tokens(seen[2], new_word, len(agreed)):
                    return None
                offs[: len(agreed)] = agreed
                new_word[: len(agreed)] = seen[2][: len(agreed)]
            if k < last:
                cut = cuts[k + 1] - cuts[k]
                if np.any((offs[:, 0] < cut) & (offs[:, 1] > cut)):
                    return None
                keep = offs[:, 0] < cut
                seen = (ids[~keep], offs[~keep] - cut, new_word[~keep])
                offs, new_word = offs[keep], new_word[keep]
            starts.append(offs[:, 0] + cuts[k])
            ends.append(offs[:, 1] + cuts[k])
            word_starts.append(new_word)
    return _ArrayTokens(
        np.concatenate(starts), np.concatenate(ends), np.cumsum(np.concatenate(word_starts), dtype=np.int64)
    )


def _whole_pre_tokens(before: np.ndarray, after: np.ndarray, count: int) -> bool:
    """True if the first `count` tokens past a cut end the next piece's first pre-token and start another (`after`'s
    word starts), alike in both pieces, before the previous piece's last pre-token begins (`before`'s)."""
    starts_after = np.flatnonzero(after[1:count]) + 1
    later_before = np.flatnonzero(before[1:]) + 1
    return (
        len(starts_after) > 0
        and np.array_equal(before[1:count], after[1:count])
        and len(later_before) > 0
        and count <= later_before[-1]
    )


def _agreed_offsets(
    before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray], limit: int
) -> np.ndarray | None:
    """The offsets `before` saw for the tokens ending within `limit` of the cut, if `after` starts with the same ones.

    None when they differ, or when `after`'s first token ends beyond `limit` and so cannot be checked.
    """
    (ids_a, offs_a), (ids_b, offs_b) = before, after
    if len(ids_b) == 0:
        return offs_a[:0] if len(ids_a) == 0 else None
    count = int(np.count_nonzero(offs_b[:, 1] <= limit))
    if count == 0 or count != int(np.count_nonzero(offs_a[:, 1] <= limit)):
        return None
    if not (offs_a[:count, 1] <= limit).all() or not (offs_b[:count, 1] <= limit).all():
        return None
    # The first token's offsets may differ (trimmed at a sequence start); ids, and every later offset, may not.
    if not np.array_equal(ids_a[:count], ids_b[:count]) or not np.array_equal(offs_a[1:count], offs_b[1:count]):
        return None
    return offs_a[:count]


def _piece_cuts(text: str, max_piece_chars: int, margin: int) -> list[int]:
    """Cut positions [0, ..., len(text)] so each piece plus its margin fits in `max_piece_chars`."""
    cuts = [0]
    while len(text) - cuts[-1] > max_piece_chars:
        lo = cuts[-1] + max_piece_chars // 2
        hi = cuts[-1] + max_piece_chars - margin
        cuts.append(_cut_point(text, lo, hi))
    cuts.append(len(text))
    return cuts


def _cut_point(text: str, lo: int, hi: int) -> int:
    """Where to start the next piece in [lo, hi): at a space between two words if any, else before a word.

    A piece that begins with the single space before a word tokenizes like the text around it for the usual
    pre-tokenizers (BERT, byte-level BPE, Metaspace); the caller verifies it anyway.
    """
    pos = text.rfind(" ", lo, hi)
    while pos > lo:
        if not text[pos - 1].isspace() and not text[pos + 1].isspace():
            return pos
        pos = text.rfind(" ", lo, pos)
    found = None
    for match in _SPACE_BEFORE_WORD.finditer(text, lo, hi):
        found = match.start()
    return found if found is not None and found > lo else hi
