"""Chunking: chunks that fit the model once re-encoded, cut on word boundaries, with offsets into the original text;
the chunk shard written atomically.

Three tokenizer families: the packaged WordPiece (all-MiniLM-L6-v2, the bert-base-uncased vocabulary), and a
byte-level BPE and a Unigram/Metaspace tokenizer trained here on real English (the Python docs' topics).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from volembed_runner import chunking, store
from volembed_runner.chunking import chunk_texts, load_tokenizer, windows
from volembed_runner.errors import ModelError, SourceError
from volembed_runner.models import tokenizer_file
from volembed_runner.stages import chunk as chunk_stage
from volembed_runner.stages.chunk import chunk_shard

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
KINDS = ("wordpiece", "byte_level", "metaspace")

PROSE = (
    "The quick brown fox jumps over the lazy dog . Café naïve Über ÉCOLE façade Ångström smörgåsbord "
    "internationalization 1999 3.14 e-mail don't (parenthesis) 北京大学 東京 한국어 😀 🎉 👍🏽 résumé"
)
WORDS = PROSE.split()
# Characters the tokenizer keeps (letters, digits, punctuation, CJK, emoji) and whitespace it splits on.
KEPT = list("aAzZéÉüÜßøñçÅ0189.,;:!?'-()北京大学東京日本語한국어😀🎉") + ["👍🏽"]
SPACES = [" ", "  ", "\n", "\n\n", "\t", "\u3000", "\xa0", " \n "]
# Code, and "words" longer than a window: a URL, base64, a run of CJK, minified code, emoji.
CODE = ["def f(x):\n    return x ** 2\n", "for (i = 0; i < n; i++) { a[i] += b[i]; }", "x = {'k': [1, 2.5, None]}"]
LONG_WORDS = [
    "https://example.com/" + "/".join(f"p{i}x{i * 7}" for i in range(60)) + "?q=1&r=2",
    "".join(chr(65 + (i * 7919) % 58) for i in range(400)).replace("[", "+").replace("]", "/"),
    "北京大学東京日本語한국어" * 30,
    "function(a,b){return a.map(c=>c*b).filter(Boolean)};" * 12,
    "😀🎉👍🏽" * 40,
]
PREFIXES = ["", "passage: ", "query:", "search_document: "]

texts_from_words = st.lists(st.sampled_from(WORDS + SPACES[1:]), max_size=120).map(" ".join)
texts_from_chars = st.lists(st.sampled_from(KEPT + SPACES), max_size=300).map("".join)
mixed_texts = st.lists(
    st.one_of(
        st.sampled_from(WORDS),
        st.sampled_from(CODE),
        st.sampled_from(LONG_WORDS),
        st.sampled_from(SPACES).flatmap(lambda s: st.integers(1, 40).map(lambda k: s * k)),
        st.text(min_size=1, max_size=30),
    ),
    max_size=40,
).map(" ".join)
any_text = st.one_of(texts_from_words, texts_from_chars, mixed_texts)
size_overlap = st.integers(8, 64).flatmap(lambda size: st.tuples(st.just(size), st.integers(0, size - 1)))


def _training_lines() -> list[str]:
    """About 60k characters of real English (the standard library's pydoc topics), plus the test prose."""
    from pydoc_data.topics import topics

    lines, chars = [], 0
    for text in topics.values():
        for line in text.splitlines():
            if line.strip() and chars < 60_000:
                lines.append(line)
                chars += len(line)
    return lines + [PROSE] * 20


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    """A byte-level BPE (GPT-2/RoBERTa style) and a Unigram with Metaspace (T5/XLM-R style), trained once, with
    special tokens added around every input as those models do."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    lines = _training_lines()
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=alphabet, special_tokens=["<s>", "</s>"])
    byte_level.train_from_iterator(lines, bpe)
    byte_level.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]),
        ]
    )
    metaspace = Tokenizer(models.Unigram())
    metaspace.normalizer = normalizers.NFKC()
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    metaspace.decoder = decoders.Metaspace(prepend_scheme="always")
    unigram = trainers.UnigramTrainer(vocab_size=800, unk_token="<unk>", special_tokens=["<unk>", "</s>"])
    metaspace.train_from_iterator(lines, unigram)
    metaspace.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return {"byte_level": byte_level, "metaspace": metaspace}


@pytest.fixture(scope="module")
def tok_path() -> Path:
    try:
        return tokenizer_file(MODEL, download=False)
    except ModelError as exc:
        pytest.skip(f"{MODEL} is not installed here ({exc})")


@pytest.fixture(scope="module")
def tok(tok_path: Path) -> Tokenizer:
    return load_tokenizer(tok_path)


@pytest.fixture(params=KINDS)
def family(request: pytest.FixtureRequest, trained: dict[str, Tokenizer]) -> Tokenizer:
    """Each tokenizer family in turn (the WordPiece one only where its package is installed)."""
    if request.param == "wordpiece":
        return request.getfixturevalue("tok")
    return trained[request.param]


def english_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic prose-like text of about `n_chars` characters."""
    rng = random.Random(seed)
    words = rng.choices(WORDS, k=n_chars // 6 + 1)
    for i in range(0, len(words), 97):
        words[i] += "\n\n"
    return " ".join(words)[:n_chars].rstrip() + "."


def write_input(path: Path, ids: list[str], texts: list[str | None], **extra: list) -> Path:
    pq.write_table(pa.table({"id": ids, "text": pa.array(texts, pa.string()), **extra}), path)
    return path


def read_chunks(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def n_tokens(tokenizer: Tokenizer, text: str, special: bool = False) -> int:
    return len(tokenizer.encode(text, add_special_tokens=special))


def spans(cols: chunking.ChunkColumns, doc: int = 0) -> list[tuple[int, int]]:
    return [(a, b) for d, a, b in zip(cols.doc_index, cols.char_start, cols.char_end, strict=True) if d == doc]


# --- windows ----------------------------------------------------------------------------------------------------


@settings(max_examples=500)
@given(n=st.integers(0, 3000), so=st.integers(1, 64).flatmap(lambda s: st.tuples(st.just(s), st.integers(0, s - 1))))
def test_windows_cover_every_token_and_never_repeat_a_predecessor(n: int, so: tuple[int, int]) -> None:
    size, overlap = so
    got = windows(n, size, overlap)
    if n == 0:
        assert got == []
        return
    assert got[0][0] == 0 and got[-1][1] == n
    covered = set()
    for start, end in got:
        assert 0 <= start < end <= n
        assert end - start == min(size, n)
        covered.update(range(start, end))
    assert covered == set(range(n))
    for k, ((s0, e0), (s1, e1)) in enumerate(pairwise(got)):
        assert s1 > s0 and e1 > e0, "a window contained in its predecessor"
        shared = e0 - s1
        if k + 2 < len(got):
            assert shared == overlap
            assert s1 == (k + 1) * (size - overlap)
        else:
            assert overlap <= shared < size


@pytest.mark.parametrize(("size", "overlap"), [(10, 3), (8, 0), (5, 4), (1, 0), (254, 32)])
def test_window_edge_lengths(size: int, overlap: int) -> None:
    stride = size - overlap
    assert windows(0, size, overlap) == []
    assert windows(1, size, overlap) == [(0, 1)]
    assert windows(size, size, overlap) == [(0, size)]
    assert windows(size + 1, size, overlap) == [(0, size), (1, size + 1)]
    if size > 1:
        assert windows(size - 1, size, overlap) == [(0, size - 1)]
    for k in (2, 3, 7):
        n = k * stride + overlap
        exact = windows(n, size, overlap)
        assert exact == [(j * stride, j * stride + size) for j in range(k)]
        longer = windows(n + 1, size, overlap)
        assert longer == [*exact, (n + 1 - size, n + 1)]
        shorter = windows(n - 1, size, overlap)
        if stride == 1:  # one token shorter is exactly one window fewer
            assert shorter == exact[:-1]
        else:
            assert shorter == [*exact[:-1], (n - 1 - size, n - 1)]


def test_last_window_ends_at_document_end_with_no_pure_overlap_tail() -> None:
    assert windows(11, 10, 3) == [(0, 10), (1, 11)]
    assert windows(21, 10, 3) == [(0, 10), (7, 17), (11, 21)]


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (10, 10), (10, 11), (10, -1)])
def test_bad_window_settings_raise(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        windows(100, size, overlap)


# --- chunks fit the model, on three tokenizer families ----------------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(text=any_text, so=size_overlap, prefix=st.sampled_from(PREFIXES))
@example(text="Café Müller ÉCOLE naïve 北京大学 😀  \n\t end", so=(8, 1), prefix="")
@example(text=LONG_WORDS[1] + " tail", so=(8, 0), prefix="query:")
def test_every_chunk_re_encoded_with_prefix_and_special_tokens_fits(
    family: Tokenizer, text: str, so: tuple[int, int], prefix: str
) -> None:
    size, overlap = so
    cols = chunk_texts(family, [text], size, overlap, prefix=prefix)
    in_prefix = n_tokens(family, prefix) if prefix else 0
    special = family.num_special_tokens_to_add(False)
    for chunk, count in zip(cols.text, cols.n_tokens, strict=True):
        assert count == n_tokens(family, prefix + chunk) - in_prefix, "n_tokens is not the re-encoded count"
        assert count <= size
        assert (
            n_tokens(family, prefix + chunk, special=True) == count + in_prefix + special <= size + in_prefix + special
        )


@PROPERTY
@given(text=any_text, so=size_overlap, prefix=st.sampled_from(PREFIXES))
@example(text="  Café Müller\n\n" + LONG_WORDS[2] + "  ", so=(8, 3), prefix="")
def test_chunks_slice_the_text_cover_it_and_end_at_its_end(
    family: Tokenizer, text: str, so: tuple[int, int], prefix: str
) -> None:
    size, overlap = so
    cols = chunk_texts(family, [text], size, overlap, prefix=prefix)
    got = spans(cols)
    assert cols.text == [text[a:b] for a, b in got], "a chunk's text is not its slice of the document"
    assert cols.chunk_index == list(range(len(got)))
    assert all(t and t == t.strip() for t in cols.text)
    if not n_tokens(family, text) or text.isspace():
        assert got == [] and cols.empty_documents == 1
        return
    covered = bytearray(len(text))
    for a, b in got:
        covered[a:b] = b"\1" * (b - a)
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace()), "a character is in no chunk"
    assert got[-1][1] == len(text.rstrip()), "the last chunk does not end at the document's end"
    for (a0, b0), (a1, b1) in pairwise(got):
        assert a1 > a0 and b1 > b0, "a chunk lies within its predecessor (or its predecessor within it)"
        assert a1 <= b0 or text[b0:a1].isspace()


@PROPERTY
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=150),
    size=st.integers(32, 64),
    data=st.data(),
    prefix=st.sampled_from(PREFIXES),
)
def test_chunks_start_and_end_on_word_boundaries_and_overlap_to_within_a_word(
    family: Tokenizer, words: list[str], size: int, data: st.DataObject, prefix: str
) -> None:
    overlap = data.draw(st.integers(0, size // 2 - 1))
    text = " ".join(words)
    cols = chunk_texts(family, [text], size, overlap, prefix=prefix)
    got = spans(cols)
    for a, b in got:
        assert a == 0 or text[a - 1] == " ", f"chunk starts inside a word: {text[max(0, a - 10) : a + 10]!r}"
        assert b == len(text) or text[b] == " ", f"chunk ends inside a word: {text[max(0, b - 10) : b + 10]!r}"
    longest = max(n_tokens(family, w) for w in WORDS) + 1  # a word, with its space in some tokenizers
    offsets = family.encode(text, add_special_tokens=False).offsets
    # A token is shared when its characters, less the space a Metaspace or byte-level token carries, lie in both.
    bare = [(x0 + len(text[x0:x1]) - len(text[x0:x1].lstrip()), x1) for x0, x1 in offsets]
    for k, ((_, b0), (a1, _)) in enumerate(pairwise(got)):
        shared = sum(1 for x0, x1 in bare if x0 >= a1 and x1 <= b0)
        if k + 2 < len(got):  # the nearest word start, searched backwards first
            assert shared >= overlap - 1, "overlap not honoured"
            assert shared <= overlap + longest, "the start moved more than a word"
        else:  # the last chunk starts as early as it fits, which can be a word later than the overlap asks
            assert shared >= overlap - longest, "overlap not honoured to within a word"


@pytest.mark.parametrize("size", [8, 32])
def test_documents_of_0_1_size_and_size_plus_1_tokens(family: Tokenizer, size: int) -> None:
    def doc(n: int) -> str:
        text = " ".join(["the"] * n)
        assert n_tokens(family, text) == n, "'the' is no longer one token in this tokenizer"
        return text

    cols = chunk_texts(family, [doc(0), doc(1), doc(size), doc(size + 1)], size, 2)
    assert cols.documents == 4 and cols.empty_documents == 1
    assert cols.doc_index == [1, 2, 3, 3]
    assert cols.text[:2] == ["the", doc(size)] and cols.n_tokens[:2] == [1, size]
    # size + 1 tokens: a full window from the start, and the last one full too, ending at the document's end
    assert cols.text[2:] == [doc(size), doc(size)] and cols.n_tokens[2:] == [size, size]
    assert spans(cols, 3) == [(0, len(doc(size))), (4, len(doc(size + 1)))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(any_text, min_size=1, max_size=12), so=size_overlap, prefix=st.sampled_from(PREFIXES))
def test_long_documents_split_into_pieces_give_the_same_chunks(
    family: Tokenizer, parts: list[str], so: tuple[int, int], prefix: str
) -> None:
    size, overlap = so
    texts = [" ".join(parts), *parts]
    whole = chunk_texts(family, texts, size, overlap, prefix=prefix)
    for max_piece_chars in (256, 64):
        assert chunk_texts(family, texts, size, overlap, prefix=prefix, max_piece_chars=max_piece_chars) == whole


def test_a_prefix_that_merges_with_the_first_word_is_counted(trained: dict[str, Tokenizer]) -> None:
    tok, prefix = trained["metaspace"], "query:"  # no space: "▁query:Accessing" is one pre-token
    text = "Accessing " + " ".join(["the"] * 20)
    in_prefix = n_tokens(tok, prefix)
    assert n_tokens(tok, prefix + text) > in_prefix + n_tokens(tok, text), "the junction no longer adds tokens"
    size = n_tokens(tok, text)
    assert chunk_texts(tok, [text], size, 0).text == [text]
    cols = chunk_texts(tok, [text], size, 0, prefix=prefix)
    assert len(cols) == 2, "the document fits alone but not after the prefix: it must be cut"
    assert all(n_tokens(tok, prefix + t) <= in_prefix + size for t in cols.text)


def test_a_size_too_small_for_one_character_is_a_clear_error(trained: dict[str, Tokenizer]) -> None:
    tok = trained["byte_level"]
    assert n_tokens(tok, "🦜") > 2  # four bytes the training text never merged
    with pytest.raises(SourceError, match=r"document 1: .* at most 2 tokens .* chunking.size is too small"):
        chunk_texts(tok, ["fine", "a 🦜 b"], 2, 0)


@pytest.mark.parametrize(("size", "limit"), [(254, 256), (510, 512)])
def test_chunks_cut_at_the_model_limit_fit_it(tok: Tokenizer, size: int, limit: int) -> None:
    """MiniLM (254 + [CLS] + [SEP] = 256) and bge-base (510 + 2 = 512), on the bert-base-uncased vocabulary."""
    docs = [english_text(n, seed=n) for n in range(500, 60_000, 1_500)]
    docs += [" ".join([*LONG_WORDS, *CODE, PROSE] * 8), PROSE * 200]
    cols = chunk_texts(tok, docs, size, 50)
    lengths = [n_tokens(tok, t, special=True) for t in cols.text]
    assert len(lengths) > 100 and max(lengths) <= limit
    # The same documents cut into plain token windows (today's spans, no word boundaries) do not fit: this data
    # would catch a chunker that trusts the document's token count.
    over = 0
    for text in docs:
        offs = tok.encode(text, add_special_tokens=False).offsets
        over += sum(
            n_tokens(tok, text[offs[s][0] : offs[e - 1][1]], special=True) > limit
            for s, e in windows(len(offs), size, 50)
        )
    assert over > 0


# --- chunk_texts with the packaged WordPiece tokenizer -----------------------------------------------------------


def test_chunk_text_keeps_case_accents_and_inner_spacing(tok: Tokenizer) -> None:
    text = "  Café Müller, ÉCOLE   naïve — e\u0301te\u0301 北京大学 😀\n\n Straße.  "
    cols = chunk_texts(tok, [text], 254, 0)
    assert cols.text == ["Café Müller, ÉCOLE   naïve — e\u0301te\u0301 北京大学 😀\n\n Straße."]
    assert (cols.char_start, cols.char_end) == ([2], [len(text) - 2])


def test_tokenizer_file_truncation_is_turned_off(tok_path: Path, tok: Tokenizer) -> None:
    raw = Tokenizer.from_file(str(tok_path))
    assert raw.truncation is not None and raw.truncation["max_length"] == 128, "the file no longer truncates"
    assert tok.truncation is None and tok.padding is None
    with pytest.raises(ValueError, match="truncates"):
        chunk_texts(raw, ["some text"], 254, 32)
    text = english_text(6000)
    cols = chunk_texts(tok, [text], 254, 32)
    assert cols.doc_tokens > 1000
    assert len(cols) > 1
    assert cols.char_end[-1] == len(text)


def test_empty_and_whitespace_only_documents_give_no_chunk_and_are_counted(tok: Tokenizer) -> None:
    texts = ["", "   ", "\n\t\u3000", "\u200b\u200b", "real text", "\xa0"]
    cols = chunk_texts(tok, texts, 16, 4)
    assert cols.documents == 6
    assert cols.empty_documents == 5
    assert cols.doc_index == [4] and cols.text == ["real text"]


def test_short_documents_are_one_chunk_however_short(tok: Tokenizer) -> None:
    cols = chunk_texts(tok, ["a", "Hello world.", english_text(200)], 254, 32)
    assert cols.doc_index == [0, 1, 2] and cols.chunk_index == [0, 0, 0]
    assert cols.text[:2] == ["a", "Hello world."]


def test_ten_megabyte_document_is_chunked_in_pieces(
    tmp_path: Path, tok_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = chunking._long_doc_tokens

    def spy(*args, **kwargs):
        calls.append(result := real(*args, **kwargs))
        return result

    monkeypatch.setattr(chunking, "_long_doc_tokens", spy)
    text = english_text(10_000_000, seed=1)
    size, overlap = 254, 32
    src = write_input(tmp_path / "in.parquet", ["short", "long"], ["short one", text])
    out = tmp_path / "shard-00000.parquet"
    stats = chunk_shard(src, out, tokenizer_path=tok_path, size=size, overlap=overlap, keep_columns=[])
    assert len(calls) == 1 and calls[0] is not None, "the long document was not tokenized in pieces"
    table = pq.read_table(out)
    assert table.column("doc_id").to_pylist() == ["short"] + ["long"] * (table.num_rows - 1)
    nominal = windows(stats["doc_tokens"] - 2, size, overlap)
    assert table.num_rows - 1 >= len(nominal) > 10_000
    counts = table.column("n_tokens").to_pylist()[1:]
    assert max(counts) <= size and sum(counts) / len(counts) > size - 8, "chunks are not nearly full"
    starts = table.column("char_start").to_pylist()[1:]
    ends = table.column("char_end").to_pylist()[1:]
    assert starts[0] == 0 and ends[-1] == len(text)
    for k in range(len(starts) - 1):
        assert starts[k] < starts[k + 1] < ends[k] < ends[k + 1]
    texts = table.column("text").to_pylist()[1:]
    for k in range(0, len(texts), 997):
        assert texts[k] == text[starts[k] : ends[k]]
        assert n_tokens(tok, texts[k]) == counts[k]


@pytest.mark.slow
def test_ten_megabyte_document_pieces_equal_a_whole_encode(tok: Tokenizer) -> None:
    text = english_text(10_000_000, seed=2)
    assert chunk_texts(tok, [text], 254, 32) == chunk_texts(tok, [text], 254, 32, max_piece_chars=len(text))


def test_load_tokenizer_reports_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="tokenizer.json"):
        load_tokenizer(bad)


# --- chunk_shard ------------------------------------------------------------------------------------------------


def test_chunk_shard_writes_columns_keeps_columns_and_stats(tmp_path: Path, tok_path: Path) -> None:
    texts = ["", "Short doc.", english_text(3000, seed=3), None, "   "]
    src = write_input(
        tmp_path / "in.parquet",
        ["d0", "d1", "d2", "d3", "d4"],
        texts,
        url=["u0", "u1", "u2", "u3", "u4"],
        year=pa.array([2000, 2001, 2002, 2003, 2004], pa.int16()),
    )
    out = tmp_path / "chunks" / "shard-00000.parquet"
    stats = chunk_shard(src, out, tokenizer_path=tok_path, size=64, overlap=16, keep_columns=["url", "year"])
    assert store.is_done(out) and store.read_marker(out) == stats
    table = pq.read_table(out)
    assert table.schema.names == ["doc_id", "chunk_index", "char_start", "char_end", "n_tokens", "text", "url", "year"]
    assert [str(t) for t in table.schema.types] == [
        "string", "int32", "int64", "int64", "int32", "string", "string", "int16",
    ]  # fmt: skip
    rows = table.to_pylist()
    assert {r["doc_id"] for r in rows} == {"d1", "d2"}
    for r in rows:
        doc = int(r["doc_id"][1:])
        assert r["text"] == texts[doc][r["char_start"] : r["char_end"]]
        assert (r["url"], r["year"]) == (f"u{doc}", 2000 + doc)
    d2 = [r for r in rows if r["doc_id"] == "d2"]
    assert [r["chunk_index"] for r in d2] == list(range(len(d2))) and len(d2) > 2
    assert stats["documents"] == 5 and stats["empty_documents"] == 3
    assert stats["chunks"] == len(rows)
    assert stats["tokens"] == sum(r["n_tokens"] for r in rows)
    tok = load_tokenizer(tok_path)
    assert stats["doc_tokens"] == sum(len(tok.encode(t, add_special_tokens=False)) for t in texts[1:3])
    assert stats["tiny_chunks"] == sum(r["n_tokens"] < 8 for r in rows) == 1
    assert sum(stats["token_histogram"].values()) == stats["chunks"]
    assert list(stats["token_histogram"]) == ["1", "2-3", "4-7", "8-15", "16-31", "32-63", "64"]
    # d2's chunks end on word boundaries within a few tokens of the size
    assert stats["token_histogram"]["32-63"] + stats["token_histogram"]["64"] == len(d2)
    assert all(56 <= r["n_tokens"] <= 64 for r in d2[:-1]) and stats["token_histogram"]["2-3"] == 1
    assert stats["chunks_per_doc_histogram"]["0"] == 3 and stats["chunks_per_doc_histogram"]["1"] == 1
    assert sum(stats["chunks_per_doc_histogram"].values()) == stats["documents"]


def test_kept_columns_of_any_type_repeat_per_chunk_and_ids_become_strings(tmp_path: Path, tok_path: Path) -> None:
    table = pa.table(
        {
            "id": [7, 8],
            "text": pa.array(["one two three four five six", "seven"], pa.large_string()),
            "tags": [["a", "b"], []],
            "meta": [{"k": 1}, {"k": 2}],
            "kind": pa.array(["p", "q"], pa.string_view()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "shard-00000.parquet"
    chunk_shard(
        tmp_path / "in.parquet", out, tokenizer_path=tok_path, size=4, overlap=1, keep_columns=["tags", "meta", "kind"]
    )
    rows = read_chunks(out)
    assert [(r["doc_id"], r["chunk_index"], r["text"]) for r in rows] == [
        ("7", 0, "one two three four"),
        ("7", 1, "three four five six"),
        ("8", 0, "seven"),
    ]
    assert [(r["tags"], r["meta"], r["kind"]) for r in rows] == [(["a", "b"], {"k": 1}, "p")] * 2 + [
        ([], {"k": 2}, "q")
    ]


def test_chunk_shard_rerun_is_byte_identical(tmp_path: Path, tok_path: Path) -> None:
    texts = [english_text(n, seed=n) for n in range(0, 20_000, 700)]
    src = write_input(tmp_path / "in.parquet", [f"id{i}" for i in range(len(texts))], texts)
    first = tmp_path / "a" / "shard-00000.parquet"
    second = tmp_path / "b" / "shard-00000.parquet"
    stats_a = chunk_shard(src, first, tokenizer_path=tok_path, size=128, overlap=16, keep_columns=[])
    stats_b = chunk_shard(src, second, tokenizer_path=tok_path, size=128, overlap=16, keep_columns=[])
    assert first.read_bytes() == second.read_bytes()
    assert stats_a == stats_b
    chunk_shard(src, first, tokenizer_path=tok_path, size=128, overlap=16, keep_columns=[])
    assert first.read_bytes() == second.read_bytes()


def test_half_written_output_is_not_taken_as_done(tmp_path: Path, tok_path: Path) -> None:
    src = write_input(tmp_path / "in.parquet", ["a", "b"], ["one document", "another document"])
    out = tmp_path / "chunks" / "shard-00000.parquet"
    out.parent.mkdir()
    out.write_bytes(b"PAR1 torn")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed_writer = f"{store.writer_tag().rsplit('-', 1)[0]}-{dead.stdout.strip()}"  # a writer that is gone
    (out.parent / f".{out.name}.{killed_writer}.x1y2.tmp").write_bytes(b"PAR1 partial")
    assert not store.is_done(out) and store.done_shards(out.parent) == []
    chunk_shard(src, out, tokenizer_path=tok_path, size=8, overlap=2, keep_columns=[])
    assert store.done_shards(out.parent) == ["00000"]
    assert [r["text"] for r in read_chunks(out)] == ["one document", "another document"]
    assert not list(out.parent.glob("*.tmp")), "the stale temporary file was left behind"


def test_killed_mid_shard_leaves_nothing_done_and_rerun_matches_clean_run(tmp_path: Path, tok_path: Path) -> None:
    texts = [english_text(400, seed=i) for i in range(3 * chunk_stage.READ_BATCH_ROWS)]
    src = write_input(tmp_path / "in.parquet", [str(i) for i in range(len(texts))], texts)
    out = tmp_path / "chunks" / "shard-00000.parquet"
    code = (
        "import sys; from pathlib import Path; from volembed_runner.stages.chunk import chunk_shard; "
        "chunk_shard(Path(sys.argv[1]), Path(sys.argv[2]), tokenizer_path=Path(sys.argv[3]), size=64, overlap=8, "
        "keep_columns=[])"
    )

    def partly_written() -> bool:
        """The temporary file exists and holds at least one row group."""
        tmps = list(out.parent.glob(f".{out.name}.*.tmp")) if out.parent.is_dir() else []
        return any(t.stat().st_size > 4096 for t in tmps if t.exists())

    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(out), str(tok_path)])
    try:
        deadline = time.monotonic() + 60
        while not partly_written():
            assert proc.poll() is None, "the shard finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert list(out.parent.glob("*.tmp")), "the killed run left no temporary file"
    assert not store.is_done(out) and not out.exists()
    chunk_shard(src, out, tokenizer_path=tok_path, size=64, overlap=8, keep_columns=[])
    clean = tmp_path / "clean" / "shard-00000.parquet"
    chunk_shard(src, clean, tokenizer_path=tok_path, size=64, overlap=8, keep_columns=[])
    assert store.is_done(out) and out.read_bytes() == clean.read_bytes()
    assert not list(out.parent.glob("*.tmp"))


def test_empty_shard_gives_an_empty_chunk_file(tmp_path: Path, tok_path: Path) -> None:
    src = write_input(tmp_path / "in.parquet", [], [])
    out = tmp_path / "shard-00000.parquet"
    stats = chunk_shard(src, out, tokenizer_path=tok_path, size=8, overlap=2, keep_columns=[])
    assert stats["documents"] == stats["chunks"] == 0 and store.is_done(out)
    assert pq.read_table(out).num_rows == 0


@pytest.mark.parametrize(
    ("table", "keep", "message"),
    [
        (pa.table({"id": ["a"], "body": ["x"]}), [], "no column 'text'"),
        (pa.table({"id": ["a"], "text": [1]}), [], "column 'text' must hold strings"),
        (pa.table({"id": ["a"], "text": ["x"]}), ["url"], "no column 'url'"),
        (pa.table({"id": ["a"], "text": ["x"]}), ["text"], "clash"),
        (
            pa.table({"id": ["a", "b"], "text": pa.array([b"ok", b"bad\xff"], pa.binary()).view(pa.string())}),
            [],
            "row 1",
        ),
    ],
)
def test_bad_input_raises_source_error_and_writes_nothing(
    tmp_path: Path, tok_path: Path, table: pa.Table, keep: list[str], message: str
) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    out = tmp_path / "chunks" / "shard-00000.parquet"
    with pytest.raises(SourceError, match=message):
        chunk_shard(src, out, tokenizer_path=tok_path, size=8, overlap=2, keep_columns=keep)
    assert not out.exists() and not store.marker_path(out).exists()
    assert not out.parent.is_dir() or not list(out.parent.glob("*.tmp"))


def test_unreadable_shard_raises_source_error(tmp_path: Path, tok_path: Path) -> None:
    src = tmp_path / "in.parquet"
    src.write_bytes(b"this is not parquet")
    with pytest.raises(SourceError, match="in.parquet"):
        chunk_shard(src, tmp_path / "out.parquet", tokenizer_path=tok_path, size=8, overlap=2, keep_columns=[])


def test_failed_rerun_leaves_the_finished_chunk_file_in_place(tmp_path: Path, tok_path: Path) -> None:
    good = write_input(tmp_path / "good.parquet", ["a"], ["a finished document"])
    out = tmp_path / "chunks" / "shard-00000.parquet"
    chunk_shard(good, out, tokenizer_path=tok_path, size=8, overlap=2, keep_columns=[])
    finished = out.read_bytes()
    unreadable = tmp_path / "unreadable.parquet"
    unreadable.write_bytes(b"not parquet")
    with pytest.raises(SourceError):
        chunk_shard(unreadable, out, tokenizer_path=tok_path, size=8, overlap=2, keep_columns=[])
    assert store.is_done(out) and out.read_bytes() == finished
    bad_utf8 = tmp_path / "bad.parquet"
    texts = ["fine"] * (chunk_stage.READ_BATCH_ROWS + 1) + [b"\xff"]
    column = pa.array([t.encode() if isinstance(t, str) else t for t in texts], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": column}), bad_utf8)
    with pytest.raises(SourceError, match=f"row {len(texts) - 1}"):
        chunk_shard(bad_utf8, out, tokenizer_path=tok_path, size=8, overlap=2, keep_columns=[])
    assert out.read_bytes() == finished and not list(out.parent.glob("*.tmp"))


def test_max_rows_chunks_only_the_first_rows_in_shard_order(tmp_path: Path, tok_path: Path) -> None:
    n = chunk_stage.READ_BATCH_ROWS + 5
    src = write_input(tmp_path / "in.parquet", [f"d{i}" for i in range(n)], [f"document number {i}" for i in range(n)])
    out = tmp_path / "shard-00000.parquet"
    keep = chunk_stage.READ_BATCH_ROWS + 2
    stats = chunk_shard(src, out, tokenizer_path=tok_path, size=8, overlap=2, keep_columns=[], max_rows=keep)
    assert stats["documents"] == keep
    assert pq.read_table(out).column("doc_id").to_pylist() == [f"d{i}" for i in range(keep)]
