"""Runs you can trust: failures of the input say so (exit 3, no "rerun to retry"), a full disk leaves the record
whole, the status tells the truth, nothing secret is recorded, and outputs land in one place whatever the cwd."""

from __future__ import annotations

import errno
import json
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
    chunk_files = {p.name: p.read_bytes() for p in chunk_dir.iterdir()}

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
    assert {p.name: p.read_bytes() for p in chunk_dir.iterdir()} == chunk_files
    run_folder = store.run_dir(plan.local_root(), plan.name)
    assert [p for p in run_folder.rglob("*.tmp")] == []

    monkeypatch.setattr(store, "write_bytes_atomic", real)  # space freed
    code, out = run_cli(str(spec))
    assert code == 0, out
    done = manifest_of(spec)
    assert done["status"] == "succeeded" and done["totals"]["vectors"] == done["totals"]["chunks"] > 0


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
