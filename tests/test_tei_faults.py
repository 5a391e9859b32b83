"""Servers that answer 200 with bad vectors, or name another model, fail the TEI client loudly; a correct one passes.

Each fault of the stand-in (`tests/tei_server.py`, `vector_fault=`) must end in a `VectorCheckError` whose one-line
message names the server and the check, with no vectors returned; `/info` naming another model must fail before
any text is sent.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from volembed_runner.embedders.tei import TEIClient, TEIInfo, public_url
from volembed_runner.errors import EmbedderError, TextsFailedError, VectorCheckError

from .tei_server import DEFAULT_MODEL, VECTOR_FAULTS, TEIServer, expected_vector

FAST = {"backoff_base": 0.001, "backoff_max": 0.005, "max_retries": 1}
TEXTS = [f"chunk {i} of a document about the history of the city" for i in range(40)]

# The check each fault must trip (vectors/parse_vectors_json and check_vectors name them).
FAULT_CHECKS = {
    "wrong_dim": "dimension",
    "mixed_dim": "dimension",
    "ragged": "shape",
    "null": "numeric",
    "nan": "numeric",
    "overflow": "finite",
    "bool": "numeric",
    "string": "numeric",
    "few": "count",
    "many": "count",
    "not_json": "numeric",
    "unnormalized": "norm",
}


def run(
    server: TEIServer, texts: list[str] = TEXTS, n_tokens: list[int] | None = None, **kwargs: object
) -> tuple[np.ndarray, TEIClient]:
    """Embed `texts` through a fresh client; `n_tokens` default to the server's own counts."""

    async def go() -> tuple[np.ndarray, TEIClient]:
        async with TEIClient(server.url, **{**FAST, **kwargs}) as client:
            return await client.embed(texts, n_tokens or server.count_tokens(texts)), client

    return asyncio.run(go())


def test_every_fault_mode_has_a_check() -> None:
    assert set(FAULT_CHECKS) == set(VECTOR_FAULTS)


@pytest.mark.parametrize("fault", sorted(FAULT_CHECKS))
def test_a_bad_200_answer_fails_naming_the_server_and_the_check(fault: str) -> None:
    check = FAULT_CHECKS[fault]
    # 8 texts per request, so mixed_dim's second answer differs from the first; the catalog's width is expected.
    with TEIServer(max_client_batch_size=8, vector_fault=fault) as server, pytest.raises(VectorCheckError) as caught:
        run(server, dim=server.dim)
    message = str(caught.value)
    assert caught.value.check == check
    assert "\n" not in message
    assert message.startswith(f"TEI at {server.url}: text ") and f"{check} check failed" in message
    assert caught.value.indices and set(caught.value.indices) <= set(range(len(TEXTS)))


def test_a_correct_server_passes_every_check() -> None:
    with TEIServer(max_client_batch_size=8) as server:
        vectors, client = run(server, dim=server.dim, expected_model=DEFAULT_MODEL)
    want = np.stack([expected_vector(t, server.dim) for t in TEXTS])
    np.testing.assert_array_equal(vectors, want)
    assert client.dim == server.dim == 384


def test_first_answer_fixes_the_dimension_for_every_later_call() -> None:
    async def go(server: TEIServer) -> None:
        async with TEIClient(server.url, **FAST) as client:
            await client.embed(TEXTS[:4], server.count_tokens(TEXTS[:4]))
            assert client.dim == 384
            server.vector_fault = "wrong_dim"  # a relaunched server, another model's width: the next shard
            await client.embed(TEXTS[4:], server.count_tokens(TEXTS[4:]))

    with TEIServer() as server, pytest.raises(VectorCheckError, match="192-dim vectors, the run's vectors are 384"):
        asyncio.run(go(server))


def test_dimensions_must_be_honoured() -> None:
    with TEIServer(vector_fault="wrong_dim") as server, pytest.raises(VectorCheckError, match="dimension check"):
        run(server, dimensions=64)


def test_norm_is_not_checked_when_normalize_is_off() -> None:
    with TEIServer(vector_fault="unnormalized") as server:
        vectors, _ = run(server, normalize=False)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 7.0, rtol=1e-5)


def test_vectors_off_the_reference_still_pass_the_checks() -> None:
    # `drift` is for a quality probe: valid unit vectors that differ from the reference vectors.
    with TEIServer(drift=0.5) as server:
        vectors, _ = run(server)
    want = np.stack([expected_vector(t, server.dim) for t in TEXTS])
    cosines = (vectors * want).sum(axis=1)
    assert np.all(cosines < 0.95) and np.all(cosines > 0.8)


def test_another_model_in_info_fails_before_any_text_is_sent() -> None:
    with TEIServer(model_id="BAAI/bge-small-en-v1.5") as server, pytest.raises(EmbedderError) as caught:
        run(server, expected_model=DEFAULT_MODEL)
    message = str(caught.value)
    assert "serves model 'BAAI/bge-small-en-v1.5'" in message and f"not the expected {DEFAULT_MODEL!r}" in message
    assert "\n" not in message
    assert server.requests == []


def test_a_model_folder_passes_when_served_under_the_expected_name() -> None:
    # What the Modal app launches: --model-id /models/<slug> --served-model-name <hub id>.
    with TEIServer(model_id="/models/all-minilm-l6-v2", served_model_name=DEFAULT_MODEL) as server:
        vectors, _ = run(server, expected_model=DEFAULT_MODEL)
        info = asyncio.run(_info(server.url))
    assert vectors.shape == (len(TEXTS), 384)
    assert (info.model_id, info.served_model_name) == ("/models/all-minilm-l6-v2", DEFAULT_MODEL)


def test_a_model_folder_without_a_served_name_is_another_model() -> None:
    with TEIServer(model_id="/models/all-minilm-l6-v2") as server, pytest.raises(EmbedderError, match="--served-model"):
        run(server, expected_model=DEFAULT_MODEL)
    assert server.requests == []


def test_another_revision_fails_and_an_unreported_one_passes() -> None:
    with TEIServer(revision="main") as server, pytest.raises(EmbedderError, match="at revision 'main'"):
        run(server, expected_model=DEFAULT_MODEL, expected_revision="c9745ed1d9f207416be6d2e6f8de32d1f16199bf")
    assert server.requests == []
    with TEIServer() as server:  # no --revision: /info's model_sha is null, nothing to compare
        run(server, expected_model=DEFAULT_MODEL, expected_revision="c9745ed1d9f207416be6d2e6f8de32d1f16199bf")


def test_an_over_long_text_fails_naming_its_index_without_truncation() -> None:
    texts = [*TEXTS[:9], "word " * 300, *TEXTS[9:]]
    with TEIServer() as server, pytest.raises(TextsFailedError) as caught:
        run(server, texts)
    assert caught.value.indices == (9,)
    assert "text 9: HTTP 422: Input validation error: `inputs` must have less than 256 tokens. Given: 302" in str(
        caught.value
    )


def test_truncation_is_sent_only_when_opted_in_and_counted() -> None:
    texts = [*TEXTS[:3], "word " * 300, "word " * 254]  # 302 tokens (cut), and exactly 256 (kept whole)
    with TEIServer() as server:
        vectors, client = run(server, texts, truncate=True)
    assert client.truncated == client.stats.truncated == 1
    assert client.truncations(server.count_tokens(texts)) == 1
    np.testing.assert_array_equal(vectors[3], expected_vector(("word " * 254).rstrip(), server.dim))  # what was kept
    np.testing.assert_array_equal(vectors[4], expected_vector("word " * 254, server.dim))
    assert sum(r.tokens for r in server.requests) == sum(min(n, 256) for n in server.count_tokens(texts))


def test_prefix_and_special_tokens_count_toward_truncation() -> None:
    # n_tokens as the chunker stores them (no specials, no prefix) plus the overhead TEI adds to each.
    texts = ["word " * 252, "word " * 253]
    prefix = "passage: "
    with TEIServer() as server:
        prefix_tokens = server.count_tokens([prefix + "word"])[0] - server.count_tokens(["word"])[0]
        stored = [n - 2 for n in server.count_tokens(texts)]  # 252 and 253
        _, client = run(server, texts, stored, truncate=True, prefix=prefix, input_overhead=2 + prefix_tokens)
    assert prefix_tokens == 2
    assert client.truncations(stored) == 1 and client.truncated == 1
    assert [r.tokens for r in server.requests] == [256 + 256]  # 252 + 4 kept whole, 253 + 4 cut to 256


def test_server_identity_is_reported_for_the_manifest() -> None:
    with TEIServer(revision="abc123") as server:
        info = asyncio.run(_info(server.url))
    assert info.identity() == {
        "model_id": DEFAULT_MODEL, "model_sha": "abc123", "served_model_name": DEFAULT_MODEL,
        "model_dtype": "float16", "version": "1.9.3", "sha": server.info["sha"],
        "docker_label": server.info["docker_label"],
    }


def test_urls_lose_their_credentials_in_messages() -> None:
    assert public_url("https://user:secret@tei.example.com:8443/embed/?token=x#f") == "https://tei.example.com:8443/embed"

    async def source() -> str:
        async with TEIClient("http://u:p@127.0.0.1:9/") as client:
            return client.source

    assert asyncio.run(source()) == "TEI at http://127.0.0.1:9"


async def _info(url: str) -> TEIInfo:
    async with TEIClient(url, **FAST) as client:
        return await client.info()
