"""The local backend end to end, through the CLI as a user runs it: outputs, resume, failures, estimates."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from volembed_runner import store
from volembed_runner.cli import app
from volembed_runner.loading import load_spec
from volembed_runner.plan import make_plan

runner = CliRunner()
WORDS = [
    "river", "mountain", "Zürich", "café", "naïve", "data", "embedding", "token", "window", "chunk", "model",
    "vector", "search", "index", "archive", "library", "museum", "theory", "quantum", "garden", "harbour",
]

SPEC = """\
version: 1
name: e2e
backend: local
volume: testvol
dataset:
  files: [docs.jsonl]
  keep_columns: [title]
  shard_rows: {shard_rows}
chunking:
  size: 64
  overlap: 8
  workers: 2
embedding:
  model: sentence-transformers/all-MiniLM-L6-v2
  precision: fp32
output:
  include_text: true
"""


def make_docs(folder: Path, n: int, seed: int = 0) -> Path:
    """Documents of varied length (empty, tiny, several windows), written as jsonl."""
    rng = random.Random(seed)
    path = folder / "docs.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            length = rng.choice([0, 1, 5, 40, 63, 64, 65, 150, 400])
            text = " ".join(rng.choice(WORDS) for _ in range(length))
            fh.write(json.dumps({"text": text, "title": f"doc {i}"}) + "\n")
    return path


def write_spec(folder: Path, shard_rows: int = 25) -> Path:
    path = folder / "spec.yaml"
    path.write_text(SPEC.format(shard_rows=shard_rows))
    return path


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def outputs(spec: Path, stage: str) -> dict[str, bytes]:
    plan = make_plan(load_spec(spec), spec)
    root = plan.local_root()
    folder = (store.chunks_dir(root, plan.name, plan.chunk.fingerprint) if stage == "chunk"
              else store.embeddings_dir(root, plan.name, plan.embed.fingerprint))
    return {s: store.shard_path(folder, s).read_bytes() for s in store.done_shards(folder)}


@pytest.mark.slow
def test_local_run_writes_vectors_every_reader_opens(tmp_path: Path) -> None:
    make_docs(tmp_path, 120)
    spec = write_spec(tmp_path)
    code, out = run_cli(str(spec), "--json")
    assert code == 0, out
    summary = json.loads(out[out.index("{"):])
    assert summary["status"] == "succeeded" and summary["vectors"] == summary["chunks"] > 0
    assert summary["empty_documents"] > 0 and summary["documents"] == 120

    folder = Path(summary["outputs"]["embeddings"])
    files = sorted(folder.glob("shard-*.parquet"))
    assert len(files) == 5
    table = pq.read_table(files[0])
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[384]"
    assert {"doc_id", "chunk_index", "char_start", "char_end", "n_tokens", "title", "text"} <= set(table.column_names)

    import datasets
    import duckdb

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    assert ds.num_rows == summary["vectors"] and len(ds[0]["embedding"]) == 384
    con = duckdb.connect()
    rows, dim = con.execute(
        f"select count(*), max(len(embedding)) from read_parquet('{folder}/shard-*.parquet')").fetchone()
    assert (rows, dim) == (summary["vectors"], 384)

    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert manifest["status"] == "succeeded" and manifest["spec"]["name"] == "e2e"
    assert manifest["totals"]["vectors"] == summary["vectors"]
    assert manifest["versions"]["volembed-runner"] is not None and "git" in manifest
    assert manifest["engine"]["engine"] == "local" and manifest["engine"]["device"] in ("cpu", "cuda")
    stats = json.loads((Path(summary["manifest"]).parent / "stats.json").read_text())
    assert sum(stats["tokens_per_chunk"].values()) == summary["chunks"]

    code, out = run_cli(str(spec), "--json")
    again = json.loads(out[out.index("{"):])
    assert code == 0 and again["vectors"] == summary["vectors"]
    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert manifest["stages"]["embed"]["skipped"] == manifest["stages"]["embed"]["total"] == 5


def test_until_chunk_stops_before_embedding(tmp_path: Path) -> None:
    make_docs(tmp_path, 60)
    spec = write_spec(tmp_path)
    code, out = run_cli(str(spec), "--until", "chunk", "--json")
    assert code == 0, out
    summary = json.loads(out[out.index("{"):])
    assert summary["stages"] == ["download", "chunk"] and summary["chunks"] > 0 and summary["vectors"] == 0
    assert len(outputs(spec, "chunk")) == 3 and outputs(spec, "embed") == {}


def test_new_chunk_settings_write_a_new_folder_and_keep_the_old(tmp_path: Path) -> None:
    make_docs(tmp_path, 30)
    spec = write_spec(tmp_path)
    assert run_cli(str(spec), "--until", "chunk")[0] == 0
    before = outputs(spec, "chunk")
    assert run_cli(str(spec), "--until", "chunk", "--set", "chunking.overlap=16")[0] == 0
    assert outputs(spec, "chunk") == before


def _kill_after_first_marker(cmd: list[str], env: dict[str, str], folder: Path) -> None:
    """Start the CLI in a subprocess and SIGKILL it as soon as one shard of `folder` is marked done."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if list(folder.glob("*/shard-*.done")):
            break
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):  # it may have finished on its own: resume then has nothing to do
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(folder.glob("*/shard-*.done"))


def _killed_then_resumed_equals_clean(tmp_path: Path, docs: int, shard_rows: int, until: str) -> None:
    stage_folder = "chunks" if until == "chunk" else "embeddings"
    make_docs(tmp_path, docs, seed=3)
    spec = write_spec(tmp_path, shard_rows=shard_rows)
    command = [sys.executable, "-m", "volembed_runner", str(spec), "--until", until]

    def env(home: str) -> dict[str, str]:
        return {**os.environ, "VOLEMBED_HOME": str(tmp_path / home)}

    killed = tmp_path / "home-a" / "volumes" / "testvol" / "runs" / "e2e" / stage_folder
    _kill_after_first_marker(command, env("home-a"), killed)
    resumed = subprocess.run(command, env=env("home-a"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run(command, env=env("home-b"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr

    def files(home: str) -> dict[str, bytes]:
        folder = next((tmp_path / home / "volumes" / "testvol" / "runs" / "e2e" / stage_folder).iterdir())
        return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.parquet"))}

    resumed_files, clean_files = files("home-a"), files("home-b")
    assert len(clean_files) == -(-docs // shard_rows) and resumed_files == clean_files
    assert [p for p in killed.rglob("*") if p.name.endswith(".tmp")] == []


def test_chunk_run_killed_mid_shard_resumes_to_identical_files(tmp_path: Path) -> None:
    _killed_then_resumed_equals_clean(tmp_path, docs=400, shard_rows=10, until="chunk")


@pytest.mark.slow
def test_embed_run_killed_mid_shard_resumes_to_identical_files(tmp_path: Path) -> None:
    _killed_then_resumed_equals_clean(tmp_path, docs=120, shard_rows=10, until="embed")


def test_failed_shards_are_listed_and_retried_on_the_next_run(tmp_path: Path) -> None:
    make_docs(tmp_path, 50)
    spec = write_spec(tmp_path)
    assert run_cli(str(spec), "--until", "download")[0] == 0
    plan = make_plan(load_spec(spec), spec)
    data = store.data_dir(plan.local_root(), plan.data.fingerprint)
    victim = sorted(data.glob("shard-*.parquet"))[1]
    good = victim.read_bytes()
    victim.write_bytes(b"not parquet")

    code, out = run_cli(str(spec), "--until", "chunk")
    assert code == 3  # an unreadable shard: the same rerun alone fails again, so it is not advised
    assert "1 shard(s) failed" in out and "fix it, then rerun" in out
    manifest = json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())
    failed = manifest["stages"]["chunk"]["failed"]
    assert list(failed) == [victim.name[len("shard-"):-len(".parquet")]] and manifest["status"] == "failed"

    victim.write_bytes(good)
    code, out = run_cli(str(spec), "--until", "chunk")
    assert code == 0, out
    manifest = json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())
    assert manifest["stages"]["chunk"]["failed"] == {} and manifest["stages"]["chunk"]["skipped"] == 1


def test_embedding_endpoint_runs_the_embed_stage_through_a_tei_server_under_faults(tmp_path: Path) -> None:
    from collections import Counter

    import numpy as np

    from .tei_server import TEIServer, expected_vector

    make_docs(tmp_path, 80)
    spec = write_spec(tmp_path)
    with TEIServer(max_client_batch_size=8, max_concurrent_requests=16) as server:
        server.schedule.extend([503, "drop", 429, None, 500])
        code, out = run_cli(str(spec), "--json", "--set", f"embedding.endpoint={server.url}",
                            "--set", "embedding.prefix='passage: '")
        embedded = Counter(server.embedded)
    assert code == 0, out
    summary = json.loads(out[out.index("{"):])
    table = pq.read_table(sorted(Path(summary["outputs"]["embeddings"]).glob("shard-*.parquet")))
    texts = table["text"].to_pylist()
    assert table.num_rows == summary["chunks"] == summary["vectors"]
    assert all(embedded[f"passage: {t}"] >= 1 for t in texts)
    assert sum(embedded.values()) == len(texts)  # each chunk embedded exactly once, faults notwithstanding
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    want = np.stack([expected_vector(f"passage: {t}", server.dim) for t in texts])
    assert np.allclose(got, want, atol=1e-6)


def test_dry_run_estimate_matches_what_the_run_produces(tmp_path: Path) -> None:
    make_docs(tmp_path, 12_000, seed=7)  # more than the dry run samples, so it extrapolates
    spec = write_spec(tmp_path, shard_rows=4000)
    code, out = run_cli(str(spec), "--dry-run", "--json")
    assert code == 0, out
    est = json.loads(out[out.index("{"):])
    assert est["sample"]["documents"] < 12_000 and not est["sample"]["complete"]
    assert est["cost_usd"] == 0.0  # nothing is spent locally
    code, out = run_cli(str(spec), "--until", "chunk", "--json")
    assert code == 0, out
    ran = json.loads(out[out.index("{"):])
    assert abs(est["chunks"] - ran["chunks"]) <= 0.02 * ran["chunks"]
    assert abs(est["embedded_tokens"] - ran["chunk_tokens"]) <= 0.02 * ran["chunk_tokens"]  # both "chunk tokens"
    assert abs(est["tokens"] - ran["tokens"]) <= 0.02 * ran["tokens"]  # both the documents' tokens
    assert est["documents"] == ran["documents"]


def test_status_reads_a_local_runs_manifest(tmp_path: Path) -> None:
    make_docs(tmp_path, 30)
    spec = write_spec(tmp_path)
    code, out = run_cli("status", str(spec))
    assert code == 4 and "has not run here yet" in out
    assert run_cli(str(spec), "--until", "chunk")[0] == 0
    code, out = run_cli("status", str(spec))
    assert code == 0 and "e2e: succeeded" in out and "chunk" in out


def test_a_second_run_of_a_live_spec_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    from volembed_runner.lease import FileLeaseStore, Holder, Lease

    make_docs(tmp_path, 10)
    spec = write_spec(tmp_path)
    plan = make_plan(load_spec(spec), spec)
    live = Lease.acquire(FileLeaseStore(store.lease_dir(plan.local_root(), plan.name)), Holder.here("local"))
    code, output = run_cli(str(spec), "--until", "chunk")
    assert code == 6
    (line,) = output.strip().splitlines()
    assert line.startswith("error: this run is being written by") and f"pid {os.getpid()}" in line
    assert not store.manifest_path(plan.local_root(), plan.name).exists()  # nothing of the live run touched
    live.release()
    assert run_cli(str(spec), "--until", "chunk")[0] == 0


@pytest.mark.parametrize("fault", ["wrong_dim", "null", "few"])
def test_a_server_answering_bad_vectors_fails_its_shards_and_writes_nothing(tmp_path: Path, fault: str) -> None:
    from .tei_server import TEIServer

    make_docs(tmp_path, 30)
    spec = write_spec(tmp_path)
    with TEIServer(max_client_batch_size=8, vector_fault=fault) as server:
        code, out = run_cli(str(spec), "--set", f"embedding.endpoint={server.url}")
    assert code == 1
    plan = make_plan(load_spec(spec, [f"embedding.endpoint={server.url}"]), spec)
    folder = store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint)
    assert store.done_shards(folder) == [] and not list(folder.glob("shard-*.parquet"))
    manifest = json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())
    causes = list(manifest["stages"]["embed"]["failed"].values())
    assert causes and all("check failed" in c and "chunk " in c and server.url in c for c in causes), causes


def test_a_server_for_another_model_is_refused_before_any_chunk_is_sent(tmp_path: Path) -> None:
    from .tei_server import TEIServer

    make_docs(tmp_path, 10)
    spec = write_spec(tmp_path)
    with TEIServer(model_id="BAAI/bge-small-en-v1.5") as server:
        code, out = run_cli(str(spec), "--set", f"embedding.endpoint={server.url}")
        assert server.requests == []
    assert code == 1 and "serves model 'BAAI/bge-small-en-v1.5'" in out


def test_pointing_a_spec_at_another_server_keeps_the_first_servers_vectors_apart(tmp_path: Path) -> None:
    make_docs(tmp_path, 5)
    spec = write_spec(tmp_path)
    first = make_plan(load_spec(spec, ["embedding.endpoint=http://tei-a:8080"]), spec)
    second = make_plan(load_spec(spec, ["embedding.endpoint=http://user:secret@tei-b:8080"]), spec)
    assert first.embed.fingerprint != second.embed.fingerprint
    assert second.embed.server == "http://tei-b:8080"  # credentials never reach the plan's record
