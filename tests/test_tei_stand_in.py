"""The TEI stand-in's own rules, checked against the stand-in directly over HTTP.

Each test cites the line of huggingface/text-embeddings-inference at tag v1.9.3 that it mirrors, so a test that
passes against the stand-in passes against TEI. The model is the packaged all-MiniLM-L6-v2 (WordPiece: "word" is
one token, [CLS] and [SEP] are added), whose max_seq_length of 256 TEI reports as max_input_length.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest

from .tei_server import DEFAULT_MODEL, TEIServer, expected_vector


def words(n_tokens: int) -> str:
    """A text TEI encodes to exactly `n_tokens` tokens with [CLS] and [SEP]."""
    return " ".join(["word"] * (n_tokens - 2))


@pytest.fixture
def bge_like() -> Iterator[httpx.Client]:
    """A server whose model takes 512 tokens, as bge-base-en-v1.5 does."""
    with TEIServer(max_input_length=512) as server, httpx.Client(base_url=server.url) as client:
        yield client


def test_input_over_max_input_length_is_422_with_teis_message(bge_like: httpx.Client) -> None:
    # core/src/tokenization.rs:397-403 (the count includes special tokens: encode_input passes
    # add_special_tokens=true, :389); "Input validation error: " from core/src/lib.rs:14; 422 from
    # router/src/http/server.rs:1898.
    answer = bge_like.post("/embed", json={"inputs": [words(513)], "truncate": False})
    assert answer.status_code == 422
    assert answer.json() == {
        "error": "Input validation error: `inputs` must have less than 512 tokens. Given: 513",
        "error_type": "Validation",
    }


def test_input_of_exactly_max_input_length_passes(bge_like: httpx.Client) -> None:
    # core/src/tokenization.rs:399: `seq_len > max_input_length` is the refusal, so 512 of 512 passes.
    answer = bge_like.post("/embed", json={"inputs": [words(512)], "truncate": False})
    assert answer.status_code == 200 and answer.headers["x-compute-tokens"] == "512"


def test_truncating_request_is_cut_to_max_input_length(bge_like: httpx.Client) -> None:
    # core/src/tokenization.rs:380-385: LongestFirst truncation to max_input_length, specials kept;
    # x-compute-tokens counts the tokens embedded (core/src/infer.rs:368, router/src/lib.rs:675).
    answer = bge_like.post("/embed", json={"inputs": [words(513), "short"], "truncate": True})
    assert answer.status_code == 200
    assert answer.headers["x-compute-tokens"] == str(512 + 3)
    vectors = np.asarray(answer.json(), dtype=np.float32)
    np.testing.assert_array_equal(vectors[0], expected_vector(words(512), 384))  # the text the model saw


def test_truncate_absent_follows_auto_truncate() -> None:
    # router/src/http/server.rs:599: `req.truncate.unwrap_or(info.auto_truncate)`; auto-truncate defaults to true
    # since 1.9.0 (router/src/main.rs:90).
    for auto, status in ((True, 200), (False, 422)):
        with TEIServer(auto_truncate=auto) as server, httpx.Client(base_url=server.url) as client:
            assert client.post("/embed", json={"inputs": [words(300)]}).status_code == status


def test_more_texts_than_max_client_batch_size_is_422() -> None:
    # router/src/http/server.rs:652-664: checked before any permit or tokenization.
    with TEIServer(max_client_batch_size=4) as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/embed", json={"inputs": ["a", "b", "c", "d", "e"]})
    assert answer.status_code == 422
    assert answer.json() == {"error": "batch size 5 > maximum allowed batch size 4", "error_type": "Validation"}


def test_body_over_payload_limit_is_a_plain_text_413() -> None:
    # router/src/http/server.rs:1872 `DefaultBodyLimit::max(payload_limit)`: axum refuses before TEI reads the JSON.
    with TEIServer(payload_limit=100) as server, httpx.Client(base_url=server.url) as client:
        body = orjson.dumps({"inputs": ["x" * 100]})
        answer = client.post("/embed", content=body, headers={"content-type": "application/json"})
        fits = client.post("/embed", json={"inputs": ["x" * 50]})
    assert answer.status_code == 413
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.text == "Failed to buffer the request body: length limit exceeded"
    assert fits.status_code == 200


def test_too_many_characters_is_422_unless_truncating() -> None:
    # core/src/tokenization.rs:10 (250 characters per token), :300-309.
    with TEIServer(max_input_length=4) as server, httpx.Client(base_url=server.url) as client:
        refused = client.post("/embed", json={"inputs": ["a" * 1001], "truncate": False})
        cut = client.post("/embed", json={"inputs": ["a" * 1001], "truncate": True})
    assert refused.status_code == 422
    message = "Input validation error: `inputs` must have less than 1000 characters. Given: 1001"
    assert refused.json()["error"] == message
    assert cut.status_code == 200


def test_empty_batch_and_empty_text_are_400() -> None:
    # router/src/http/server.rs:639-650 (an empty list); core/src/tokenization.rs:76-80 via core/src/lib.rs:16-17
    # (an empty string anywhere fails the whole request); Empty is 400 (server.rs:1899).
    with TEIServer() as server, httpx.Client(base_url=server.url) as client:
        empty_list = client.post("/embed", json={"inputs": []})
        empty_text = client.post("/embed", json={"inputs": ["fine", ""]})
    assert (empty_list.status_code, empty_list.json()["error"]) == (400, "`inputs` cannot be empty")
    assert (empty_text.status_code, empty_text.json()) == (
        400, {"error": "Input validation error: `inputs` cannot be empty", "error_type": "Empty"}
    )


def test_the_first_failing_input_in_order_is_the_answer() -> None:
    # router/src/http/server.rs:694-698: results are collected in input order, the first error wins.
    with TEIServer() as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/embed", json={"inputs": ["fine", words(300), ""], "truncate": False})
    assert answer.status_code == 422 and "Given: 300" in answer.json()["error"]


def test_batch_without_enough_permits_is_429_at_once() -> None:
    # router/src/http/server.rs:670-678: one `try_acquire_permit` per input (core/src/infer.rs:94-104).
    with TEIServer(max_concurrent_requests=3) as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/embed", json={"inputs": ["a", "b", "c", "d"]})
        fits = client.post("/embed", json={"inputs": ["a", "b", "c"]})
    assert answer.status_code == 429
    assert answer.json() == {"error": "Model is overloaded", "error_type": "Overloaded"}
    assert fits.status_code == 200


def test_dimensions_are_validated_and_cut_before_normalizing() -> None:
    # core/src/infer.rs:248-255 (0), :273-283 (over the width), :285-301 (cut, then L2-normalize).
    with TEIServer() as server, httpx.Client(base_url=server.url) as client:
        zero = client.post("/embed", json={"inputs": ["a"], "dimensions": 0})
        wide = client.post("/embed", json={"inputs": ["a"], "dimensions": 385})
        cut = client.post("/embed", json={"inputs": ["a"], "dimensions": 64})
    assert (zero.status_code, zero.json()["error"]) == (422, "Input validation error: `dimensions` should be positive")
    assert wide.status_code == 422 and "smaller than the maximum embedding dimension" in wide.json()["error"]
    np.testing.assert_array_equal(np.asarray(cut.json()[0], dtype=np.float32), expected_vector("a", 384, dimensions=64))


def test_default_prompt_is_prepended_and_counted() -> None:
    # core/src/tokenization.rs:192-195 (the default prompt unless prompt_name) and :314-323 (prepended, then
    # encoded, so its tokens count toward max_input_length).
    with TEIServer(default_prompt="query: ") as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/embed", json={"inputs": [words(255)], "truncate": False})
    assert answer.status_code == 422 and "Given: 257" in answer.json()["error"]
    assert server.count_tokens(["x"]) == [5]  # [CLS] query : x [SEP]


def test_unknown_prompt_name_is_422() -> None:
    # core/src/tokenization.rs:271-280: all-MiniLM-L6-v2's config_sentence_transformers.json has no prompts.
    with TEIServer() as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/embed", json={"inputs": ["a"], "prompt_name": "query"})
    assert answer.status_code == 422 and "no prompts were found" in answer.json()["error"]


def test_wrong_field_types_are_axum_plain_text_422() -> None:
    # router/src/http/types.rs:411-446 deserialized by axum's Json extractor.
    with TEIServer() as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/embed", json={"inputs": ["a"], "normalize": "yes"})
    assert answer.status_code == 422 and answer.headers["content-type"].startswith("text/plain")
    assert answer.text.startswith("Failed to deserialize the JSON body into the target type")


def test_info_has_teis_fields_and_reports_the_flags_verbatim() -> None:
    # router/src/lib.rs:530-567 (the Info struct), filled at :320-336 (model_id = --model-id, model_sha =
    # --revision); served_model_name defaults to model_id (router/src/main.rs:239-241).
    with TEIServer(model_id="/models/all-minilm-l6-v2") as server, httpx.Client(base_url=server.url) as client:
        info = client.get("/info").json()
    assert set(info) == {
        "model_id", "model_sha", "model_dtype", "served_model_name", "model_type", "max_concurrent_requests",
        "max_input_length", "max_batch_tokens", "max_batch_requests", "max_client_batch_size", "auto_truncate",
        "tokenization_workers", "version", "sha", "docker_label",
    }
    assert info["model_id"] == info["served_model_name"] == "/models/all-minilm-l6-v2"
    assert info["model_sha"] is None and info["version"] == "1.9.3"
    assert info["max_input_length"] == 256  # sentence_bert_config.json max_seq_length


def test_max_input_length_is_capped_at_max_batch_tokens() -> None:
    # router/src/lib.rs:208-220: capped when auto-truncating, a startup error when not.
    with TEIServer(max_batch_tokens=100) as server:
        assert server.info["max_input_length"] == 100
    with pytest.raises(ValueError, match="exceeds --max-batch-tokens=100"):
        TEIServer(max_batch_tokens=100, auto_truncate=False)


def test_default_model_is_the_packaged_minilm() -> None:
    with TEIServer() as server:
        assert server.info["model_id"] == DEFAULT_MODEL and server.dim == 384
