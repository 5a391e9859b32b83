"""The generated Modal app's own function bodies, run in-process with `.local()` (reference/modal-sdk.md §2.3).

The Volume is a temporary folder standing in for `/vol`, `.map` is a stand-in that calls each function's `.local()`,
and the TEI router is the TEI-protocol test server: so the code that will run in Modal's containers (download, chunk,
Embedder, orchestrate) runs here end to end on real files, with the real chunker and the real TEI client.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from modal._utils.async_utils import synchronizer

from volembed_runner import store
from volembed_runner.backends.modal import launch, render
from volembed_runner.backends.modal.runtime import ShardFailed
from volembed_runner.loading import load_spec
from volembed_runner.models import resolve_model_dir
from volembed_runner.plan import MODAL_ROOT, Plan, make_plan
from volembed_runner.units import parse_key

from .tei_server import FakeRouter, TEIServer, expected_vector

SPEC = """\
version: 1
name: modal-local
backend: modal
volume: vol
dataset:
  files: [docs.jsonl]
  keep_columns: [title]
  shard_rows: 7
chunking: {size: 32, overlap: 4, workers: 3}
embedding: {model: sentence-transformers/all-MiniLM-L6-v2, prefix: "passage: "}
compute: {gpu: L4, concurrency_limit: 2, allow_concurrent_inputs: 3}
"""


class FolderVolume:
    """A Volume whose commit and reload are no-ops: every 'container' here shares one folder."""

    def __init__(self) -> None:
        self.commits = 0
        self.reloads = 0

    def commit(self) -> None:
        self.commits += 1

    def reload(self) -> None:
        self.reloads += 1


class DictStandIn:
    """A `modal.Dict` for one process: `put(..., skip_if_exists=True)` writes only an absent key and says whether it
    wrote, as modal 1.6.4's `_Dict.put` returns `DictUpdateResponse.created`."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        if skip_if_exists and key in self.data:
            return False
        self.data[key] = json.loads(json.dumps(value))
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def pop(self, key: str, default: Any = None) -> Any:
        return self.data.pop(key, default)


LOOP = asyncio.new_event_loop()  # a container runs all its inputs on one event loop; so do these tests


def _call(fn: Any, *args: Any) -> Any:
    result = fn.local(*args)
    return LOOP.run_until_complete(result) if inspect.iscoroutine(result) else result


class LocalMapper:
    """`.map(..., order_outputs=False, return_exceptions=True)` as a loop over `.local()` calls."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.embedder = module.Embedder()
        # modal 1.6.4's `.local()` runs @modal.enter hooks before sync methods only (`_Obj._aenter` skips them for
        # async ones, unlike in a container), so enter the local instance as a container would.
        synchronizer._translate_in(self.embedder)._enter()

    def _run(self, fn: Any, key: Any, *args: Any) -> tuple[Any, Any]:
        try:
            reply = _call(fn, *args)
        except ShardFailed as exc:  # transient: Modal would retry it, then return it
            return key, exc
        if reply.get("error"):  # deterministic: returned once
            return key, ShardFailed(reply["key"], reply["error"])
        return key, reply["result"]

    def download(self, tasks: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
        for i, task in enumerate(tasks):
            yield self._run(self.module.download, task, str(i), task.to_dict())

    def chunk(self, shards: Iterator[tuple[str, int | None]]) -> Iterator[tuple[str, Any]]:
        for shard, cap in shards:
            yield self._run(self.module.chunk, shard, shard, cap)

    def embed(self, units: Iterator[str]) -> Iterator[tuple[str, Any]]:
        for unit in units:
            yield self._run(self.embedder.embed, unit, unit)

    def index(self, keys: Iterator[str]) -> Iterator[tuple[str, Any]]:
        for key in keys:
            yield self._run(self.module.index, key, key)


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               request: pytest.FixtureRequest) -> Iterator[tuple[ModuleType, Path, Plan, TEIServer]]:
    with (tmp_path / "docs.jsonl").open("w") as fh:
        for i in range(30):
            fh.write(json.dumps({"title": f"t{i}", "text": f"Document {i}. " + "Words of Zürich café. " * i}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(getattr(request, "param", SPEC))  # a test may render another spec (indirect parametrize)
    plan = make_plan(load_spec(spec), spec)
    module = launch.import_app(_write(tmp_path / "app.py", render.render_app(plan)))

    root = tmp_path / "vol"
    plan_json = json.dumps(module.PLAN)
    for local, remote in zip(plan.data.files, json.loads(plan_json)["data"]["files"], strict=True):
        target = root / remote[len(MODAL_ROOT) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(local).read_bytes())  # what `volembed-run` uploads before the run
    remote = json.loads(plan_json.replace(f'"{MODAL_ROOT}/', f'"{root}/'))
    # The images hold the model's files at MODEL_DIR; here, the packaged model folder stands in for that copy.
    remote["model"]["files_dir"] = str(resolve_model_dir(plan.model.ref, download=False))
    monkeypatch.setattr(module, "PLAN", remote)
    monkeypatch.setattr(module, "ROOT", str(root))
    monkeypatch.setattr(module, "volume", FolderVolume())
    monkeypatch.setattr(module, "leases", DictStandIn())
    monkeypatch.setattr(module, "TEIRouter", FakeRouter)
    fast_retries = {"max_retries": 1, "backoff_base": 0.01, "backoff_max": 0.05}  # a poisoned text fails fast
    monkeypatch.setattr(module, "TEI_CLIENT", {**module.TEI_CLIENT, **fast_retries})
    monkeypatch.setattr(module, "ModalMapper", lambda **kwargs: LocalMapper(module))
    with TEIServer(max_client_batch_size=4) as server, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "executing locally, no access to the mounted Volume": it's a folder here
        monkeypatch.setattr(module, "TEI_URL", server.url)
        yield module, root, Plan.from_dict(module.PLAN), server


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_orchestrator_runs_every_stage_of_the_generated_app(app_module, capsys: pytest.CaptureFixture) -> None:
    module, root, plan, server = app_module
    summary = _call(module.orchestrate, "", 1)
    assert summary["ok"] and summary["stages"] == ["download", "chunk", "embed"] and summary["next_call"] is None
    log = capsys.readouterr().out  # the orchestrator's log, as Modal streams it: each stage's end, priced
    for stage in ("download", "chunk", "embed"):
        assert re.search(rf"^{stage}: done in \S+, \d+ shard\(s\) run.*, \$\d", log, re.M), log
    manifest = json.loads(store.manifest_path(root, plan.name).read_text())
    assert manifest["progress"]["cost_usd"] == manifest["cost"]["spent_usd"]  # one count: the Meter's

    folder = store.embeddings_dir(root, plan.name, plan.embed.fingerprint)
    chunk_folder = store.chunks_dir(root, plan.name, plan.chunk.fingerprint)
    shards = store.done_shards(chunk_folder)
    units = store.done_shards(folder)
    assert len(shards) == 5 and len(units) >= 2 * 3  # 30 documents, 7 per shard; every input slot got units
    # A chunk shard's vectors are its units' files in key order (row order), together its rows exactly once.
    table = pq.read_table([store.shard_path(folder, u) for u in units])
    chunks = pq.read_table([store.shard_path(chunk_folder, s) for s in shards])
    assert table.num_rows == chunks.num_rows and table["title"].to_pylist() == chunks["title"].to_pylist()
    want = np.stack([expected_vector(f"passage: {t}", server.dim) for t in chunks["text"].to_pylist()])
    assert np.allclose(np.array(table["embedding"].to_pylist(), dtype=np.float32), want, atol=1e-6)
    assert sorted(server.embedded) == sorted(f"passage: {t}" for t in chunks["text"].to_pylist())
    manifest = json.loads(store.manifest_path(root, plan.name).read_text())
    assert manifest["status"] == "succeeded" and manifest["totals"]["vectors"] == table.num_rows
    # each download task, chunk shard and embed unit commits, then the orchestrator
    assert module.volume.commits == 1 + 5 + len(units) + 1


def test_a_failing_shard_comes_back_keyed_and_is_listed(app_module, monkeypatch: pytest.MonkeyPatch) -> None:
    module, root, plan, server = app_module
    _call(module.orchestrate, "chunk", 1)
    chunk_folder = store.chunks_dir(root, plan.name, plan.chunk.fingerprint)
    first = store.done_shards(chunk_folder)[0]
    server.poison = {"passage: " + pq.read_table(store.shard_path(chunk_folder, first))["text"][3].as_py()}
    reply = _call(LocalMapper(module).embedder.embed, first)  # the text fails its GPU batch every time: returned
    assert reply["key"] == first and "HTTP 424" in reply["error"]
    summary = _call(module.orchestrate, "", 2)
    (failed,) = summary["failed"]["embed"]  # the one unit holding that chunk
    assert not summary["ok"] and parse_key(failed)[0] == first and (parse_key(failed)[1] or 0) <= 3


@pytest.mark.slow
@pytest.mark.parametrize("app_module", [SPEC + "output: {index: lancedb}\n"], indirect=True)
def test_the_orchestrator_ends_with_the_index_function_writing_the_lancedb_table(app_module) -> None:
    from volembed_runner.stages import index as index_stage

    module, root, plan, _ = app_module
    summary = _call(module.orchestrate, "", 1)
    assert summary["ok"] and summary["stages"] == ["download", "chunk", "embed", "index"]
    table_dir = index_stage.table_path(root, plan)
    assert store.is_done_folder(table_dir)  # on the Volume, beside the run's other folders
    folder = store.embeddings_dir(root, plan.name, plan.embed.fingerprint)
    vectors = pq.read_table([store.shard_path(folder, u) for u in store.done_shards(folder)])
    table = index_stage.open_table(table_dir.parent).to_arrow()
    assert table.num_rows == vectors.num_rows and sorted(table["title"].to_pylist()) == sorted(
        vectors["title"].to_pylist())
    current = json.loads(store.current_path(root, plan.name).read_text())
    assert current["folders"]["index"] == f"runs/{plan.name}/index/{plan.index.fingerprint}"
    assert _call(module.orchestrate, "", 2)["stages"][-1] == "index"  # a rerun finds the table done
    manifest = json.loads(store.manifest_path(root, plan.name).read_text())
    assert manifest["stages"]["index"]["skipped"] == 1
