"""Token-window chunking: cut documents into windows of the embedding model's own tokens, with character offsets.

Windows of `size` tokens start every `size - overlap` tokens, and the last window is a full window ending at the
document's end, so no chunk is pure overlap of its predecessor. A chunk's text is a slice of the original text
(case, accents and spacing kept), never a decode. Pure functions, no I/O: the chunk stage (`stages/chunk.py`)
reads shards, calls `chunk_texts` and writes the chunk shards.

Offsets are Unicode code-point positions (Python `str` indices) into the document's text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from volembed_runner.errors import ModelError

# Documents longer than this many characters are tokenized in pieces, so memory stays bounded by the piece.
MAX_PIECE_CHARS = 100_000
# Characters each piece reads past its cut, to confirm the cut leaves the tokens unchanged.
PIECE_MARGIN_CHARS = 2_000
# Pieces of one long document handed to one `encode_batch` call (spread over cores by the tokenizer).
PIECES_PER_CALL = 8
# One `encode_batch` call holds at most this many characters / documents (bounds the Encodings held at once).
BATCH_CHARS = 262_144
BATCH_DOCS = 1_024
_SPACE_BEFORE_WORD = re.compile(r"\s(?=\S)")


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
    """Token windows [start, end) of `size` every `size - overlap` tokens; the last is full and ends at `n_tokens`."""
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
    tokenizer: Tokenizer, texts: Sequence[str], size: int, overlap: int, *, max_piece_chars: int = MAX_PIECE_CHARS
) -> ChunkColumns:
    """Chunk documents into token windows; empty, whitespace-only and token-less documents give no chunk.

    Documents are batch-encoded without special tokens; only each window's two boundary offsets are read, so the
    Python work grows with chunks, not tokens. Documents longer than `max_piece_chars` are tokenized in pieces cut
    at spaces (same windows, bounded memory); `tokenizer` must not truncate (see `load_tokenizer`).
    """
    check_window(size, overlap)
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError("the tokenizer truncates or pads, which would cut documents silently; use load_tokenizer()")
    if max_piece_chars < 64:
        raise ValueError(f"max_piece_chars must be at least 64, got {max_piece_chars}")
    out = ChunkColumns(documents=len(texts))
    batch: list[int] = []
    batch_chars = 0
    for i, text in enumerate(texts):
        if not text or text.isspace():
            out.empty_documents += 1
            continue
        if len(text) > max_piece_chars:
            _chunk_batch(tokenizer, texts, batch, size, overlap, out)
            batch, batch_chars = [], 0
            _chunk_long(tokenizer, text, i, size, overlap, max_piece_chars, out)
            continue
        if batch and (batch_chars + len(text) > BATCH_CHARS or len(batch) >= BATCH_DOCS):
            _chunk_batch(tokenizer, texts, batch, size, overlap, out)
            batch, batch_chars = [], 0
        batch.append(i)
        batch_chars += len(text)
    _chunk_batch(tokenizer, texts, batch, size, overlap, out)
    return out


def _chunk_batch(
    tokenizer: Tokenizer, texts: Sequence[str], indices: list[int], size: int, overlap: int, out: ChunkColumns
) -> None:
    """Encode documents in one call and add their windows, reading offsets only at window boundaries."""
    if not indices:
        return
    encodings = tokenizer.encode_batch([texts[i] for i in indices], add_special_tokens=False)
    for i, enc in zip(indices, encodings, strict=True):
        _add_encoding(enc, texts[i], i, size, overlap, out)


def _add_encoding(enc: Encoding, text: str, doc: int, size: int, overlap: int, out: ChunkColumns) -> None:
    """Add one encoded document's windows to `out`."""
    n = len(enc)
    if n == 0:
        out.empty_documents += 1
        return
    out.doc_tokens += n
    to_chars = enc.token_to_chars
    for k, (start, end) in enumerate(windows(n, size, overlap)):
        char_start = to_chars(start)[0]
        char_end = max(char_start, to_chars(end - 1)[1])
        out._add(doc, k, char_start, char_end, end - start, text[char_start:char_end])


def _chunk_long(
    tokenizer: Tokenizer, text: str, doc: int, size: int, overlap: int, max_piece_chars: int, out: ChunkColumns
) -> None:
    """Add the windows of a document too long to encode in one piece."""
    offsets = _long_doc_offsets(tokenizer, text, max_piece_chars)
    if offsets is None:  # a cut would have changed the tokens: encode it whole (correct, more memory)
        _add_encoding(tokenizer.encode(text, add_special_tokens=False), text, doc, size, overlap, out)
        return
    starts, ends = offsets
    n = len(starts)
    if n == 0:
        out.empty_documents += 1
        return
    out.doc_tokens += n
    bounds = np.asarray(windows(n, size, overlap), dtype=np.int64)
    char_starts = starts[bounds[:, 0]].tolist()
    char_ends = np.maximum(ends[bounds[:, 1] - 1], starts[bounds[:, 0]]).tolist()
    for k, ((start, end), char_start, char_end) in enumerate(zip(bounds.tolist(), char_starts, char_ends, strict=True)):
        out._add(doc, k, char_start, char_end, end - start, text[char_start:char_end])


def _long_doc_offsets(tokenizer: Tokenizer, text: str, max_piece_chars: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Start and end offsets of every token of `text`, encoded in pieces; None if a cut would change the tokens.

    Each piece reads `margin` characters past its cut; no token may straddle the cut, and the tokens it sees past
    the cut must equal the next piece's first tokens, which then take the offsets seen in context (a post-processor
    may trim the first token of a sequence differently). So the pieces join into the tokens of the whole text.
    """
    margin = min(PIECE_MARGIN_CHARS, max_piece_chars // 8)
    cuts = _piece_cuts(text, max_piece_chars, margin)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    seen: tuple[np.ndarray, np.ndarray] | None = None  # previous piece's tokens past its cut, relative to the cut
    last = len(cuts) - 2
    for group_start in range(0, last + 1, PIECES_PER_CALL):
        group = range(group_start, min(group_start + PIECES_PER_CALL, last + 1))
        pieces = [text[cuts[k] : cuts[k + 1] + margin] for k in group]
        for k, enc in zip(group, tokenizer.encode_batch(pieces, add_special_tokens=False), strict=True):
            ids = np.asarray(enc.ids, dtype=np.int64)
            offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            if seen is not None:
                agreed = _agreed_offsets(seen, (ids, offs), margin // 2)
                if agreed is None:
                    return None
                offs[: len(agreed)] = agreed
            if k < last:
                cut = cuts[k + 1] - cuts[k]
                if np.any((offs[:, 0] < cut) & (offs[:, 1] > cut)):
                    return None
                keep = offs[:, 0] < cut
                seen = (ids[~keep], offs[~keep] - cut)
                offs = offs[keep]
            starts.append(offs[:, 0] + cuts[k])
            ends.append(offs[:, 1] + cuts[k])
    return np.concatenate(starts), np.concatenate(ends)


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
