"""The TEI client against the strict TEI 1.9.3 stand-in on loopback: packing, permits, retries, splits, no silent
drops. Token counts are the stand-in's own (the model's tokenizer, with special tokens, as TEI counts)."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volembed_runner.embedders.tei import TEIClient, pack_requests
from volembed_runner.errors import EmbedderError

from .tei_server import TEIServer, expected_vector

FAST = {"backoff_base": 0.001, "backoff_max": 0.005}
DIM = 8  # the width does not matter to packing; small answers keep these tests fast
# Words that are one WordPiece token each, so a text of k words (plus its number) is about k + 3 tokens.
WORDS = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by", "he", "at", "from", "his", "an",
    "were", "are", "which", "this", "also", "be", "or", "has", "had", "first", "one", "their", "its", "new", "after",
    "who", "they", "two", "her", "she", "been", "other", "when", "time", "during", "there", "into", "school", "more",
]


def make_texts(n: int, *, seed: int = 0, max_words: int = 40) -> list[str]:
    """n distinct texts of 1 to max_words - 1 common words after their number."""
    rng = np.random.default_rng(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS, int(rng.integers(1, max_words)))) for i in range(n)]


def expected_matrix(texts: list[str], dim: int, **kwargs: object) -> np.ndarray:
    return np.stack([expected_vector(t, dim, **kwargs) for t in texts])


def embed(server: TEIServer, texts: list[str], **kwargs: object) -> tuple[np.ndarray, TEIClient]:
    async def go() -> tuple[np.ndarray, TEIClient]:
        async with TEIClient(server.url, **{**FAST, **kwargs}) as client:
            return await client.embed(texts, server.count_tokens(texts)), client

    return asyncio.run(go())


def test_every_chunk_embedded_once_under_faults() -> None:
    texts = make_texts(300)
    schedule = [500, "drop", 429, 503, 0.01, 502, "drop", 500, 429, "drop", 503, 504]
    with TEIServer(dim=DIM, max_client_batch_size=16, max_batch_tokens=200, schedule=schedule) as server:
        vectors, client = embed(server, texts, max_retries=len(schedule) + 1)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert Counter(server.embedded) == Counter(texts)
    faults = sum(1 for a in schedule if not isinstance(a, float))
    assert client.stats.retries == faults
    assert client.stats.retry_causes["RemoteProtocolError"] == 3
    assert client.stats.tokens == sum(server.count_tokens(texts))
    assert client.stats.texts == len(texts)


def test_rows_come_back_in_input_order_when_lengths_vary() -> None:
    texts = make_texts(200, seed=3, max_words=120)
    with TEIServer(dim=DIM, max_client_batch_size=8, max_batch_tokens=300) as server:
        vectors, _ = embed(server, texts)
    assert vectors.dtype == np.float32 and vectors.shape == (200, server.dim)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))


def test_request_never_exceeds_client_batch_size() -> None:
    texts = make_texts(100)
    with TEIServer(dim=DIM, max_client_batch_size=7) as server:
        embed(server, texts)
    sizes = [r.n_inputs for r in server.requests]
    assert max(sizes) == 7
    assert set(server.statuses()) == {200}


def test_request_tokens_stay_within_max_batch_tokens() -> None:
    texts = make_texts(150, max_words=60)
    with TEIServer(dim=DIM, max_batch_tokens=120) as server:
        embed(server, texts)
    for record in server.requests:
        assert record.n_inputs == 1 or record.tokens <= 120


def test_text_over_token_budget_goes_alone() -> None:
    # TEI caps max_input_length at max_batch_tokens, so such a text only gets through when the user opted in to
    # truncation: it is cut to 20 tokens, and packed on its own.
    long = " ".join(["long"] * 50)
    texts = ["short one", long, "short two"]
    with TEIServer(dim=DIM, max_batch_tokens=20) as server:
        vectors, client = embed(server, texts, truncate=True)
    cut = " ".join(["long"] * 18)  # 18 words + [CLS] + [SEP] = the 20 tokens the model saw
    np.testing.assert_array_equal(vectors, expected_matrix(["short one", cut, "short two"], server.dim))
    assert sorted(r.n_inputs for r in server.requests) == [1, 2]
    assert client.truncated == 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 600), st.integers(3, 3000)), max_size=200),
    st.integers(1, 64),
    st.integers(1, 5000),
    st.integers(3, 20000),
)
def test_packing_never_exceeds_a_limit(
    texts: list[tuple[int, int]], max_texts: int, max_tokens: int, max_bytes: int
) -> None:
    n_tokens = [t for t, _ in texts]
    sizes = [b for _, b in texts]
    batches = pack_requests(n_tokens, sizes, max_texts=max_texts, max_tokens=max_tokens, max_bytes=max_bytes)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    for batch in batches:
        assert 1 <= len(batch) <= max_texts
        if len(batch) > 1:
            assert sum(n_tokens[i] for i in batch) <= max_tokens
            assert sum(sizes[i] for i in batch) + len(batch) - 1 <= max_bytes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 120),
    batch=st.integers(1, 40),
    batch_tokens=st.integers(8, 400),
    permits=st.integers(1, 64),
    payload=st.integers(600, 6000),
    seed=st.integers(0, 1000),
)
def test_requests_fit_every_server_limit(
    n: int, batch: int, batch_tokens: int, permits: int, payload: int, seed: int
) -> None:
    texts = make_texts(n, seed=seed, max_words=max(2, min(40, batch_tokens - 2)))  # each fits max_input_length
    with TEIServer(
        dim=DIM,
        max_client_batch_size=batch,
        max_batch_tokens=batch_tokens,
        max_concurrent_requests=permits,
        payload_limit=payload,
    ) as server:
        vectors, client = embed(server, texts, payload_limit=payload)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert set(server.statuses()) == {200}
    assert client.stats.retries == client.stats.splits == 0
    for record in server.requests:
        assert record.n_inputs <= min(batch, permits)
        assert record.n_bytes < payload
        assert record.n_inputs == 1 or record.tokens <= batch_tokens


def test_splits_on_413_down_to_single_texts() -> None:
    texts = [f"text number {i} " + "pad " * 30 for i in range(12)]
    with TEIServer(dim=DIM, payload_limit=260) as server:
        vectors, client = embed(server, texts)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert 413 in server.statuses()
    assert {r.n_inputs for r in server.requests if r.status == 200} == {1}
    assert client.stats.splits == len(texts) - 1
    assert Counter(server.embedded) == Counter(texts)


def test_splits_on_422_when_server_enforces_a_smaller_batch_than_it_reports() -> None:
    texts = make_texts(40)
    with TEIServer(dim=DIM, max_client_batch_size=5, info={"max_client_batch_size": 32}) as server:
        vectors, client = embed(server, texts)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert 422 in server.statuses() and client.stats.splits > 0
    assert max(r.n_inputs for r in server.requests if r.status == 200) <= 5


def test_splits_on_424_for_batches_the_backend_cannot_fit() -> None:
    texts = make_texts(64)
    with TEIServer(dim=DIM, fail_batches_over=3) as server:
        vectors, client = embed(server, texts)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert max(r.n_inputs for r in server.requests if r.status == 200) <= 3
    assert client.stats.splits > 0
    assert Counter(server.embedded) == Counter(texts)


def test_in_flight_texts_never_exceed_permits() -> None:
    calls = [make_texts(120, seed=s) for s in range(4)]

    async def go(server: TEIServer) -> tuple[list[np.ndarray], TEIClient]:
        async with TEIClient(server.url, **FAST) as client:
            results = await asyncio.gather(*(client.embed(t, server.count_tokens(t)) for t in calls))
            return list(results), client

    with TEIServer(dim=DIM, max_client_batch_size=8, max_concurrent_requests=24, delay=0.02) as server:
        results, client = asyncio.run(go(server))
    for texts, vectors in zip(calls, results, strict=True):
        np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert 429 not in server.statuses()
    assert client.stats.retries == 0
    assert server.peak_in_flight <= 24
    assert server.peak_in_flight > 8, "several requests should be in flight at once"


def test_permits_smaller_than_client_batch_cap_requests() -> None:
    texts = make_texts(50)
    with TEIServer(dim=DIM, max_client_batch_size=32, max_concurrent_requests=5, delay=0.005) as server:
        vectors, client = embed(server, texts)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert 429 not in server.statuses() and server.peak_in_flight <= 5


def test_prefix_applied_exactly_once() -> None:
    prefix = "search_document: "
    texts = make_texts(30)
    with TEIServer(dim=DIM, fail_batches_over=4, schedule=[503]) as server:
        vectors, _ = embed(server, texts, prefix=prefix)
    assert Counter(server.embedded) == Counter(prefix + t for t in texts)
    np.testing.assert_array_equal(vectors, expected_matrix([prefix + t for t in texts], server.dim))


def test_permanent_failure_raises_not_drops() -> None:
    texts = make_texts(40)
    failure = r"text 17 after 3 attempts: HTTP 424: Backend error: NaN"
    with TEIServer(dim=DIM, poison={texts[17]}) as server, pytest.raises(EmbedderError, match=failure):
        embed(server, texts, max_retries=2)
    assert texts[17] not in server.embedded


def test_retries_are_bounded() -> None:
    failure = r"after 4 attempts.*HTTP 503"
    with TEIServer(dim=DIM, fail_status=503) as server, pytest.raises(EmbedderError, match=failure):
        embed(server, ["hello world"], max_retries=3)
    assert server.statuses() == [503] * 4


def test_read_timeouts_are_retried() -> None:
    texts = make_texts(5)
    with TEIServer(dim=DIM, schedule=[2.0]) as server:
        vectors, client = embed(server, texts, timeout=0.2)
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))
    assert client.stats.retry_causes["ReadTimeout"] == 1


def test_overlong_text_raises_with_server_message_without_retrying() -> None:
    texts = ["fine text", " ".join(["word"] * 20)]
    limit = r"text 1: HTTP 422: .*must have less than 10 tokens"
    with TEIServer(dim=DIM, max_input_length=10) as server, pytest.raises(EmbedderError, match=limit):
        embed(server, texts)
    assert server.statuses().count(422) == 2


def test_empty_text_raises_before_sending() -> None:
    with TEIServer(dim=DIM) as server, pytest.raises(EmbedderError, match="text 2 is empty"):
        embed(server, ["a", "b", "", "d"])
    assert server.requests == []


def test_text_over_payload_limit_raises_before_sending() -> None:
    failure = "text 1 is .* over the 200-byte payload limit"
    with TEIServer(dim=DIM) as server, pytest.raises(EmbedderError, match=failure):
        embed(server, ["short", "x" * 300], payload_limit=200)
    assert server.requests == []


def test_failed_call_releases_its_permits_for_the_next() -> None:
    texts = make_texts(60)

    async def go(server: TEIServer) -> np.ndarray:
        async with TEIClient(server.url, max_retries=0, **FAST) as client:
            with pytest.raises(EmbedderError):
                await client.embed(texts, server.count_tokens(texts))
            server.fail_status = None
            while server.in_flight:  # requests the failed call abandoned still hold server permits
                await asyncio.sleep(0.001)
            return await client.embed(texts, server.count_tokens(texts))

    with TEIServer(dim=DIM, max_client_batch_size=4, max_concurrent_requests=8, fail_status=500, delay=0.005) as server:
        vectors = asyncio.run(go(server))
    np.testing.assert_array_equal(vectors, expected_matrix(texts, server.dim))


def test_tokens_counted_from_compute_tokens_header() -> None:
    texts = make_texts(50)
    with TEIServer(dim=DIM, max_client_batch_size=6) as server:
        _, client = embed(server, texts)
    assert client.stats.tokens == sum(r.tokens for r in server.requests) == sum(server.count_tokens(texts))
    assert client.stats.requests == len(server.requests)


def test_dimensions_and_normalize_are_sent() -> None:
    texts = make_texts(10)
    with TEIServer(dim=16) as server:
        vectors, client = embed(server, texts, dimensions=4, normalize=False)
    assert client.dim == 4
    np.testing.assert_array_equal(vectors, expected_matrix(texts, 16, normalize=False, dimensions=4))


def test_info_falls_back_to_tei_defaults() -> None:
    async def go(server: TEIServer) -> object:
        async with TEIClient(server.url) as client:
            return await client.info()

    with TEIServer(dim=DIM, max_client_batch_size=7) as server:
        for key in ("max_client_batch_size", "max_batch_tokens", "max_input_length", "max_concurrent_requests"):
            server.info.pop(key)
        info = asyncio.run(go(server))
    assert (info.max_client_batch_size, info.max_batch_tokens) == (32, 16384)
    assert (info.max_input_length, info.max_concurrent_requests) == (512, 512)


def test_empty_input_returns_empty_matrix_without_requests() -> None:
    with TEIServer(dim=DIM) as server:
        vectors, _ = embed(server, [], dimensions=4)
    assert vectors.shape == (0, 4) and server.requests == []


def test_bad_settings_raise_embedder_error() -> None:
    with pytest.raises(EmbedderError, match="base_url"):
        TEIClient("")
    with pytest.raises(EmbedderError, match="max_retries"):
        TEIClient("http://127.0.0.1:1", max_retries=-1)


def test_concurrent_calls_queue_their_requests_one_call_after_another() -> None:
    # Embed units sharing one client finish one by one, so the next unit's requests are already queued while one
    # unit's last requests run (no wave of units that all end, and all restart, at the same moment). The server
    # takes one request of 8 texts at a time, so the order it sees is the order the client granted them: without
    # the client's queue the two calls' requests would alternate.
    first, second = make_texts(64, seed=1), [f"second {t}" for t in make_texts(64, seed=2)]

    async def go() -> None:
        async with TEIClient(server.url, **FAST) as client:
            await asyncio.gather(client.embed(first, server.count_tokens(first)),
                                 client.embed(second, server.count_tokens(second)))

    with TEIServer(max_client_batch_size=8, max_concurrent_requests=8, delay=0.01) as server:
        asyncio.run(go())
    order = ["second" if t.startswith("second ") else "first" for t in server.embedded]
    assert order == ["first"] * 64 + ["second"] * 64
