"""Runs you can trust: failures of the input say so (exit 3, no "rerun to retry"), a full disk leaves the record
whole, the status tells the truth, nothing secret is recorded, and outputs land in one place whatever the cwd."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from volembed_runner import store
from volembed_runner.cli import app
from volembed_runner.loading import load_spec
from volembed_runner.plan import make_plan

from .test_local_run import SPEC, make_docs

runner = CliRunner()


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def spec_in(folder: Path, text: str = SPEC.format(shard_rows=25), **replace: str) -> Path:
    for old, new in replace.items():
        text = text.replace(old, new)
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


def manifest_of(spec: Path) -> dict:
    plan = make_plan(load_spec(spec), spec)
    return json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())


@pytest.mark.slow
def test_unreadable_rows_exit_3_naming_each_file_without_rerun_advice(tmp_path: Path) -> None:
    rows = {
        "bad-utf8.jsonl": b'{"text": "ok", "id": "a1", "title": "t"}\n{"text": "\xff\xfe", "id": "a2", "title": "t"}\n',
        "bad-type.jsonl": b'{"text": 5, "id": "b1", "title": "t"}\n',
        "no-text.jsonl": b'{"body": "x", "id": "c1", "title": "t"}\n',
        "bad-id.jsonl": b'{"text": "x", "id": [1], "title": "t"}\n',
    }
    for name, body in rows.items():
        (tmp_path / name).write_bytes(body)
    spec = spec_in(tmp_path, **{"files: [docs.jsonl]": f"files: [{', '.join(rows)}]\n  id_column: id"})
    code, out = run_cli(str(spec))
    assert code == 3, out
    assert "rerun the same command to retry" not in out and "a rerun cannot fix" in out
    failed = manifest_of(spec)["stages"]["download"]["failed"]
    assert {Path(k).name for k in failed} == set(rows)
    assert all(cause.startswith("SourceError: ") for cause in failed.values()), failed
    assert "already done" not in out


def test_summary_of_a_failed_embed_never_says_already_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from volembed_runner.embedders import local as local_engine

    class ZeroWidth:
        """An engine answering zero-dimension vectors (what the issue saw end in ArrowInvalid)."""

        dim = 0

        def __init__(self, **_: object) -> None:
            pass

        def embed(self, texts: list[str], n_tokens: list[int]) -> np.ndarray:
            return np.zeros((len(texts), 0), dtype=np.float32)

        def truncations(self, n_tokens: list[int]) -> int:
            return 0

    monkeypatch.setattr(local_engine, "LocalEmbedder", ZeroWidth)
    make_docs(tmp_path, 30)
    spec = spec_in(tmp_path, **{"workers: 2": "workers: 1"})
    code, out = run_cli(str(spec))
    assert code == 1, out
    assert "already done" not in out and "failed" in out
    assert "0-dim vectors" in out
    embed = manifest_of(spec)["stages"]["embed"]
    assert embed["failed"] and embed["done"] == 0


def test_disk_full_while_writing_the_manifest_keeps_it_whole_and_a_rerun_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_docs(tmp_path, 60)
    spec = spec_in(tmp_path, **{"workers: 2": "workers: 1"})
    code, _ = run_cli(str(spec), "--until", "chunk")
    assert code == 0
    before = manifest_of(spec)
    plan = make_plan(load_spec(spec), spec)
    chunk_dir = store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint)
    chunk_files = {p.name: p.read_bytes() for p in chunk_dir.glob("shard-*")}

    real = store.write_bytes_atomic
    writes = {"manifest": 0}

    def full_disk(path: Path, data: bytes, *, mode: int | None = None) -> None:
        if path.name == "manifest.json":
            writes["manifest"] += 1
            if writes["manifest"] > 2:  # the disk fills once the pass is under way, and stays full
                with store.atomic_path(path) as tmp:
                    tmp.write_bytes(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, mode=mode)

    monkeypatch.setattr(store, "write_bytes_atomic", full_disk)
    code, out = run_cli(str(spec))
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "manifest.json: No space left on device" in errors[0], out
    assert "Traceback" not in out
    after = manifest_of(spec)  # whole JSON: the last one written before the disk filled
    assert after["name"] == before["name"] and after["passes"] == before["passes"] + 1
    assert {p.name: p.read_bytes() for p in chunk_dir.glob("shard-*")} == chunk_files
    run_folder = store.run_dir(plan.local_root(), plan.name)
    assert [p for p in run_folder.rglob("*.tmp")] == []

    monkeypatch.setattr(store, "write_bytes_atomic", real)  # space freed
    code, out = run_cli(str(spec))
    assert code == 0, out
    done = manifest_of(spec)
    assert done["status"] == "succeeded" and done["totals"]["vectors"] == done["totals"]["chunks"] > 0
    assert done["stages"]["download"]["skipped"] == done["stages"]["download"]["total"] == 1  # kept on resume


@pytest.mark.parametrize("limit", [{"payload_limit": 150}, {"max_input_length": 24}])
def test_refused_texts_name_the_document_id(tmp_path: Path, limit: dict) -> None:
    from .tei_server import TEIServer

    make_docs(tmp_path, 30)
    spec = spec_in(tmp_path, **{"workers: 2": "workers: 1"})
    with TEIServer(max_client_batch_size=8, **limit) as server:
        code, out = run_cli(str(spec), "--set", f"embedding.endpoint={server.url}")
    assert code == 1, out
    causes = [c for c in manifest_of(spec)["stages"]["embed"]["failed"].values()]
    assert causes and all("document '" in c and "text 0" not in c for c in causes), causes


def _kill_when(cmd: list[str], env: dict[str, str], ready) -> None:
    """Start the CLI in a subprocess and SIGKILL its process group once `ready()` holds (or it ended)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_status_of_a_killed_run_says_interrupted_with_counts_from_the_disk(tmp_path: Path) -> None:
    make_docs(tmp_path, 400, seed=3)
    spec = spec_in(tmp_path, SPEC.format(shard_rows=10))
    plan = make_plan(load_spec(spec), spec)
    chunk_dir = store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint)
    env = {**os.environ, "VOLEMBED_HOME": os.environ["VOLEMBED_HOME"]}
    _kill_when([sys.executable, "-m", "volembed_runner", str(spec), "--until", "chunk"], env,
               lambda: len(list(chunk_dir.glob("shard-*.done"))) >= 3)
    on_disk = len(store.done_shards(chunk_dir))
    assert 3 <= on_disk < 40
    assert json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())["status"] == "running"

    code, out = run_cli("status", str(spec), "--backend", "local")
    assert code == 0, out
    assert "e2e: interrupted" in out and "during the chunk stage" in out
    code, out = run_cli("status", str(spec), "--json")
    shown = json.loads(out)
    assert shown["status"] == "interrupted" and shown["interrupted"]["stage"] == "chunk" and shown["interrupted"]["at"]
    assert list(shown["stages"]) == ["download", "chunk"]  # pipeline order, not the file's sorted keys
    assert shown["stages"]["chunk"]["done"] == on_disk
    assert shown["totals"]["chunk_shards_done"] == on_disk


def test_status_lists_stages_in_pipeline_order_with_output_paths(tmp_path: Path) -> None:
    make_docs(tmp_path, 30)
    spec = spec_in(tmp_path, **{"workers: 2": "workers: 1"})
    assert run_cli(str(spec))[0] == 0
    code, out = run_cli("status", str(spec))
    assert code == 0 and "e2e: succeeded" in out
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in
            ("download", "chunk", "embed")]
    assert rows == ["download", "chunk", "embed"]
    plan = make_plan(load_spec(spec), spec)
    assert str(store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint)) in out
    code, out = run_cli("status", str(spec), "--backend", "gpu")
    assert code == 2 and "--backend" in out


def test_done_index_follows_markers_and_is_repaired(tmp_path: Path) -> None:
    folder = tmp_path / "stage"
    for i in range(3):
        store.write_shard(store.shard_path(folder, f"{i:05d}"), lambda tmp, i=i: (tmp.write_bytes(b"x"),
                                                                               {"rows": i})[1])
    store.clear_done(store.shard_path(folder, "00001"))  # about to be rewritten
    assert store.indexed_done(folder) == {"shard-00000.parquet": {"rows": 0}, "shard-00002.parquet": {"rows": 2}}
    (next((folder / store.INDEX_DIR).iterdir())).open("ab").write(b'{"name": "shard-0')  # a killed writer's line
    store.mark_done(store.shard_path(folder, "00001"), {"rows": 1})
    store.marker_path(store.shard_path(folder, "00002")).unlink()  # lost without its index line
    store.repair_index(folder, store.done_shards(folder))
    assert store.indexed_done(folder) == {"shard-00000.parquet": {"rows": 0}, "shard-00001.parquet": {"rows": 1}}


def test_a_planted_secret_reaches_no_record_log_or_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .tei_server import TEIServer

    planted = "pl4nted-s3cret-value"
    monkeypatch.setenv("TEI_PASSWORD", planted)
    make_docs(tmp_path, 30)
    spec = spec_in(tmp_path, **{"workers: 2": "workers: 1"})
    with TEIServer(max_client_batch_size=8) as server:
        endpoint = server.url.replace("http://", "http://user:${TEI_PASSWORD}@")
        text = spec.read_text().replace("  precision: fp32\n", f"  precision: fp32\n  endpoint: {endpoint}\n")
        spec.write_text(text)
        server.schedule.extend([500])  # a retried failure is logged too
        code, run_out = run_cli(str(spec))
        assert code == 0, run_out
        outputs = [run_out, run_cli("status", str(spec))[1], run_cli("status", str(spec), "--json")[1],
                   run_cli("plan", str(spec))[1], run_cli("render", str(spec))[1]]
    home = Path(os.environ["VOLEMBED_HOME"])
    written = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written)
    for path in written:
        assert planted.encode() not in path.read_bytes(), path
    for out in outputs:
        assert planted not in out
    manifest = manifest_of(spec)
    assert manifest["spec"]["embedding"]["endpoint"].startswith("http://***@")


def test_scrub_masks_url_credentials_and_secret_query_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from volembed_runner.errors import describe
    from volembed_runner.redact import scrub

    monkeypatch.setenv("HF_TOKEN", "hf_planted_modal_secret")  # how a Modal Secret reaches a container
    assert describe(RuntimeError("401 for hf_planted_modal_secret")) == "RuntimeError: 401 for ${HF_TOKEN}"

    assert scrub("GET https://bob:hunter2@example.org/x?api_key=abc&page=2 failed") == \
        "GET https://***@example.org/x?api_key=***&page=2 failed"
    assert scrub("token is s3cret-value here", {"TOKEN": "s3cret-value"}) == "token is ${TOKEN} here"
    assert scrub("hf://datasets/org/name@main") == "hf://datasets/org/name@main"


def test_outputs_land_in_one_place_whatever_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLEMBED_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user-data"))
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "pipelines").mkdir()
    make_docs(repo / "pipelines", 20)
    spec = spec_in(repo / "pipelines")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    monkeypatch.chdir(repo / "pipelines")
    code, out = run_cli("spec.yaml", "--until", "download")
    assert code == 0, out
    assert f"outputs under {repo / '.volembed' / 'volumes' / 'testvol'}" in out
    assert (repo / ".volembed" / "volumes" / "testvol" / "runs" / "e2e" / "manifest.json").is_file()
    assert (repo / ".volembed" / ".gitignore").read_text().strip().endswith("*")

    monkeypatch.chdir(elsewhere)
    code, out = run_cli("status", str(spec))
    assert code == 0 and "e2e: succeeded" in out, out
    assert not (elsewhere / ".volembed").exists()

    outside = tmp_path / "loose"
    outside.mkdir()
    make_docs(outside, 20)
    code, out = run_cli(str(spec_in(outside)), "--until", "download")
    assert code == 0, out
    assert (tmp_path / "user-data" / "volembed" / "volumes" / "testvol" / "runs" / "e2e" / "manifest.json").is_file()


@pytest.mark.slow
def test_soak_sigkill_at_seeded_points_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    import random

    rng = random.Random(13)
    make_docs(tmp_path, 120, seed=5)
    spec = spec_in(tmp_path, SPEC.format(shard_rows=10))
    command = [sys.executable, "-m", "volembed_runner", str(spec)]

    def env(home: str) -> dict[str, str]:
        return {**os.environ, "VOLEMBED_HOME": str(tmp_path / home)}

    volume = tmp_path / "soak" / "volumes" / "testvol"
    run = volume / "runs" / "e2e"

    # (stage, what to count, how many): kill as the first data shard is being written, then after a seeded random
    # count of chunk and embed markers, each a seeded random moment later (often inside the next shard)
    kill_points = [("download", "data/*/*shard-*", 1),
                   ("chunk", "runs/e2e/chunks/*/shard-*.done", rng.randint(1, 8)),
                   ("embed", "runs/e2e/embeddings/*/shard-*.done", rng.randint(1, 8))]
    for _, pattern, count in kill_points:
        pause = rng.uniform(0.0, 0.3)

        def ready(pattern: str = pattern, count: int = count, pause: float = pause) -> bool:
            if len(list(volume.glob(pattern))) < count:
                return False
            time.sleep(pause)
            return True

        _kill_when(command, env("soak"), ready)
    resumed = subprocess.run(command, env=env("soak"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run(command, env=env("clean"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr

    def files(home: Path) -> dict[str, bytes]:
        """Every output file and done-marker, by path under the volume (records of the passes left out)."""
        out = {}
        for path in sorted(home.rglob("*")):
            rel = path.relative_to(home).as_posix()
            if path.is_file() and (rel.startswith("data/") or "/chunks/" in rel or "/embeddings/" in rel) \
                    and f"/{store.INDEX_DIR}/" not in f"/{rel}":
                out[rel] = path.read_bytes()
        return out

    soaked, fresh = files(volume), files(tmp_path / "clean" / "volumes" / "testvol")
    assert soaked.keys() == fresh.keys()
    assert [rel for rel in soaked if soaked[rel] != fresh[rel]] == []
    assert [p for p in volume.rglob("*.tmp")] == []
    names = set(soaked)
    for rel in names:
        if rel.endswith(store.DONE_SUFFIX) and "/shard-" in rel:
            assert rel[: -len(store.DONE_SUFFIX)] in names, f"marker without its file: {rel}"
        if rel.endswith(".parquet"):
            assert rel + store.DONE_SUFFIX in names, f"file without its marker: {rel}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["totals"]["vectors"] == manifest["totals"]["chunks"]
