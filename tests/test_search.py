"""`volembed-run search`: a query embedded with the run's model and query prefix, the nearest chunks first.

The local paths run on the session's one finished run (tests/after_run.py) with the real local engine; the exact
scan is checked against brute force on files of its own; the endpoint path runs a small run through the
TEI-protocol test server; the Modal path reads the same run through the stand-in of the Volume SDK calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from volembed_runner import search as search_module
from volembed_runner import store
from volembed_runner.cli import app
from volembed_runner.plan import Plan

from .after_run import SPEC, own_copy

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def run(finished_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Plan]:
    """This test's own copy of the finished run: (spec, plan)."""
    return own_copy(finished_run, tmp_path, monkeypatch)


def chunks(plan: Plan) -> pa.Table:
    folder = store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint)
    return pq.read_table([store.shard_path(folder, s) for s in store.done_shards(folder)])


def test_a_query_equal_to_a_chunks_text_finds_that_chunk_first(run) -> None:
    spec, plan = run
    table = chunks(plan)
    row = table.slice(3, 1).to_pylist()[0]  # a chunk of the Zürich document
    code, out = cli("search", str(spec), row["text"], "-k", "3", "--json")
    assert code == 0, out
    found = json.loads(out)
    top = found["hits"][0]
    assert top["text"] == row["text"] and top["score"] > 0.999  # the text came from the chunk shard (no text kept)
    assert found["method"] == "exact" and found["scanned"] == table.num_rows and len(found["hits"]) == 3
    assert top["columns"]["title"].startswith("doc ") and found["query_prefix"] == ""


def test_search_refuses_an_empty_query_or_a_bad_k_in_one_line(run) -> None:
    spec, _ = run
    code, out = cli("search", str(spec), "  ")
    assert code == 2 and out.strip().startswith("error: QUERY") and "Traceback" not in out
    code, out = cli("search", str(spec), "rivers", "-k", "0")
    assert code == 2 and "-k: must be between 1 and 10,000, got 0" in out


def _vector_file(path: Path, vectors: np.ndarray, first: int) -> None:
    rows = len(vectors)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])
    pq.write_table(pa.table({"doc_id": [f"d{first + i}" for i in range(rows)], "chunk_index": [0] * rows,
                             "text": [f"t{first + i}" for i in range(rows)], "embedding": column}),
                   path, row_group_size=5)


def test_exact_scan_streams_batches_and_keeps_the_true_top_k(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(search_module, "BATCH_ROWS", 7)  # many batches per file, and batches across row groups
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(53, 8)).astype(np.float32)
    vectors[40] = vectors[12]  # a tie: the row seen first ranks first
    files = []
    for i, (start, end) in enumerate([(0, 20), (20, 21), (21, 53)]):
        _vector_file(tmp_path / f"{i}.parquet", vectors[start:end], start)
        files.append((f"{i:05d}", tmp_path / f"{i}.parquet"))
    query = vectors[12] / np.linalg.norm(vectors[12])
    scanned_files: list[int] = []
    best, scanned = search_module.scan(iter(files), query, 6, ["doc_id", "chunk_index", "text"],
                                       on_file=lambda: scanned_files.append(1))
    cosine = vectors @ query / np.linalg.norm(vectors, axis=1)
    want = sorted(range(53), key=lambda i: (-cosine[i], i))[:6]
    assert [row["doc_id"] for _, row in best] == [f"d{i}" for i in want]
    assert best[0][1]["doc_id"] == "d12" and best[1][1]["doc_id"] == "d40"
    assert np.allclose([score for score, _ in best], cosine[want], atol=1e-6)
    assert scanned == 53 and len(scanned_files) == 3
    assert best[2][1]["__shard"] in {"00000", "00001", "00002"}

    everything, _ = search_module.scan(iter(files), query, 100, ["doc_id"])
    assert len(everything) == 53  # k over the rows there are: all of them, best first
    with pytest.raises(Exception, match="8-dim but the query's is 4-dim"):
        search_module.scan(iter(files), query[:4], 3, ["doc_id"])


def test_search_through_the_endpoint_sends_the_query_prefix_and_ranks_exactly(tmp_path: Path) -> None:
    from .tei_server import TEIServer, expected_vector

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("output: {include_text: false}", "output: {include_text: true}"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t, "title": f"doc {i}"}) + "\n" for i, t in
                                                 enumerate(["Rivers carry water.", "A library lends books.",
                                                            "Gardens need light.", "Ships need a harbour."])))
    sets = ["--set", "embedding.prefix='passage: '", "--set", "embedding.query_prefix='query: '"]
    with TEIServer() as server:
        sets += ["--set", f"embedding.endpoint={server.url}"]
        code, out = cli(str(spec), *sets)
        assert code == 0, out
        server.embedded.clear()
        code, out = cli("search", str(spec), "water", "-k", "4", "--json", *sets)
        assert code == 0, out
        sent = list(server.embedded)
    assert sent == ["query: water"]  # the query-side prefix, never the document's
    found = json.loads(out)
    query = expected_vector("query: water", server.dim)
    texts = ["Rivers carry water.", "A library lends books.", "Gardens need light.", "Ships need a harbour."]
    scores = {t: float(expected_vector(f"passage: {t}", server.dim) @ query) for t in texts}
    assert [h["text"] for h in found["hits"]] == sorted(texts, key=lambda t: -scores[t])
    assert np.allclose([h["score"] for h in found["hits"]], sorted(scores.values(), reverse=True), atol=1e-5)
    assert found["query_prefix"] == "query: " and found["engine"].startswith("http://127.0.0.1")


@pytest.mark.slow
def test_search_on_a_modal_volume_reads_the_vectors_through_the_sdk(run, monkeypatch) -> None:
    import modal

    from .test_results import FolderModalVolume

    spec, plan = run
    volume = FolderModalVolume(plan.local_root())
    monkeypatch.setattr(modal.Volume, "from_name", lambda name, **kw: volume)
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    modal_spec = spec.with_name("modal.yaml")
    modal_spec.write_text(SPEC.replace("backend: local", "backend: modal"))
    first = chunks(plan).slice(0, 1).to_pylist()[0]
    code, out = cli("search", str(modal_spec), first["text"], "-k", "1")
    assert code == 0, out
    assert "1.0000" in out and first["title"] in out and first["text"] in out
    assert "1 of" in out and "exact (cosine)" in out and "local engine" in out
    assert "read from modal volume aftervol through the SDK; no Modal container was started" in out
    embeddings = store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint)
    assert volume.read_bytes >= sum(p.stat().st_size for p in embeddings.glob("*.parquet"))  # every vector file
