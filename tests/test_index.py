"""The index stage (`output.index: lancedb`): the run's vectors as a LanceDB table (the real library), which
`search` uses; on the local backend, and in the generated app's `index` function (deployed to the fake control
plane; its body runs through `.local()` over a folder Volume in test_modal_stages_local.py)."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest

from volembed_runner import plan as plan_module
from volembed_runner import store
from volembed_runner.backends.modal import launch, render
from volembed_runner.loading import load_spec
from volembed_runner.plan import make_plan
from volembed_runner.stages import index as index_stage

from .after_run import SPEC
from .conftest import REPO
from .fake_modal import fake_modal_server
from .test_search import chunks, cli

INDEX = ["--set", "output.index=lancedb"]


@pytest.fixture
def run(finished_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """This test's own copy of the finished run: (spec, its VOLEMBED_HOME)."""
    spec, home = finished_run
    shutil.copytree(home, tmp_path / "home")
    monkeypatch.setenv("VOLEMBED_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return spec, tmp_path / "home"


@pytest.mark.slow
def test_index_stage_writes_the_runs_table_and_search_uses_it(run) -> None:
    spec, _ = run
    code, out = cli(str(spec), *INDEX)  # download, chunk and embed are done: only the index stage runs
    assert code == 0, out
    plan = make_plan(load_spec(spec, ["output.index=lancedb"]), spec)
    root = plan.local_root()
    current = json.loads(store.current_path(root, plan.name).read_text())
    assert current["folders"]["index"] == f"runs/{plan.name}/index/{plan.index.fingerprint}"
    manifest = json.loads(store.manifest_path(root, plan.name).read_text())
    assert manifest["stages"]["index"]["done"] == 1 and manifest["stages"]["embed"]["skipped"] > 0

    table = index_stage.open_table(store.index_dir(root, plan.name, plan.index.fingerprint))
    want = chunks(plan)
    assert table.count_rows() == want.num_rows and not table.list_indices()  # 21 rows: under ANN_MIN_ROWS
    got = table.to_arrow().sort_by([("doc_id", "ascending"), ("chunk_index", "ascending")])
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert {"doc_id", "chunk_index", "title", "shard"} <= set(got.column_names) and "text" not in got.column_names
    assert sorted(got["title"].to_pylist()) == sorted(want["title"].to_pylist())

    text = want["text"][5].as_py()
    code, out = cli("search", str(spec), text, "-k", "2", "--json", *INDEX)
    assert code == 0, out
    found = json.loads(out)
    assert found["method"] == "lancedb" and found["hits"][0]["text"] == text and found["hits"][0]["score"] > 0.999

    code, out = cli(str(spec), *INDEX, "--json")  # nothing changed: the table is not rewritten
    assert code == 0 and json.loads(out)["stages"][-1] == "index"
    manifest = json.loads(store.manifest_path(root, plan.name).read_text())
    assert manifest["stages"]["index"]["skipped"] == 1

    code, out = cli(str(spec))  # the spec without the index: its table is stale, and gc says so
    assert code == 0, out
    code, out = cli("gc", str(spec), "--json")
    stale = [s["path"] for s in json.loads(out)["stale"] if s["kind"] == "index"]
    assert stale == [f"runs/{plan.name}/index/{plan.index.fingerprint}"]


def test_a_large_enough_table_gets_an_ann_index_that_search_uses(run, monkeypatch) -> None:
    spec, _ = run
    monkeypatch.setattr(plan_module, "ANN_MIN_ROWS", 16)  # the run's 21 chunks count as large
    code, out = cli(str(spec), *INDEX)
    assert code == 0, out
    plan = make_plan(load_spec(spec, ["output.index=lancedb"]), spec)
    table = index_stage.open_table(store.index_dir(plan.local_root(), plan.name, plan.index.fingerprint))
    (ann,) = table.list_indices()
    assert ann.columns == ["embedding"] and ann.index_type == "IvfHnswSq"
    marker = json.loads(store.marker_path(index_stage.table_path(plan.local_root(), plan)).read_text())
    assert marker["ann_index"] == "IVF_HNSW_SQ" and marker["rows"] == 21
    text = chunks(plan)["text"][0].as_py()
    code, out = cli("search", str(spec), text, "-k", "1", "--json", *INDEX)
    found = json.loads(out)
    assert found["method"] == "lancedb ANN" and found["hits"][0]["text"] == text


def test_lancedb_is_pinned_alike_in_pyproject_and_the_rendered_cpu_image(tmp_path: Path) -> None:
    import lancedb

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["index"] == [f"lancedb=={plan_module.LANCEDB_VERSION}"]
    assert render.read_pins()["lancedb"] == plan_module.LANCEDB_VERSION  # constraints.txt: what CI installs
    assert lancedb.__version__ == plan_module.LANCEDB_VERSION  # the tests run the version the image installs
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "x", "title": "t"}) + "\n")
    modal_spec = SPEC.replace("backend: local", "backend: modal")
    spec = tmp_path / "spec.yaml"
    spec.write_text(modal_spec.replace("output: {include_text: false}", "output: {include_text: false, index: "
                                                                          "lancedb}"))
    plain = tmp_path / "plain.yaml"
    plain.write_text(modal_spec)
    indexed = make_plan(load_spec(spec), spec)
    module = launch.import_app(render.write_app(indexed, tmp_path / "app.py"))
    assert f"lancedb=={plan_module.LANCEDB_VERSION}" in module.CPU_PACKAGES
    assert not any(p.startswith("lancedb") for p in launch.import_app(
        render.write_app(make_plan(load_spec(plain), plain), tmp_path / "plain.py")).CPU_PACKAGES)
    with fake_modal_server() as rec:
        module.app.deploy()
    functions = rec.functions()
    info = functions["index"]
    assert info.image_id == functions["chunk"].image_id and not info.resources.gpu_config.count
    assert (info.resources.milli_cpu, info.resources.memory_mb) == (int(indexed.index.cpu * 1000),
                                                                    indexed.index.memory_mib)
    lines = " ".join(rec.dockerfile(info.image_id))
    assert re.search(rf"lancedb=={re.escape(plan_module.LANCEDB_VERSION)}\b", lines)


def test_an_index_stage_without_finished_vectors_fails_naming_the_embed_stage(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "x", "title": "t"}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("output: {include_text: false}", "output: {include_text: false, index: lancedb}"))
    plan = make_plan(load_spec(spec), spec)
    with pytest.raises(Exception, match="no finished embedding files .* run the embed stage first"):
        index_stage.build_index(plan.local_root(), plan)


def test_plan_and_files_name_the_index_folder_before_any_run(write_spec, tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "x", "title": "t"}) + "\n")
    spec = write_spec(SPEC.replace("output: {include_text: false}", "output: {include_text: false, index: lancedb}"))
    plan = make_plan(load_spec(spec), spec)
    code, out = cli("plan", str(spec))
    assert code == 0, out
    assert json.loads(out)["outputs"]["index"] == str(store.index_dir(plan.local_root(), plan.name,
                                                                      plan.index.fingerprint))
    code, out = cli("files", str(spec))
    assert code == 0 and f"index: {store.index_dir(plan.local_root(), plan.name, plan.index.fingerprint)}" in out
