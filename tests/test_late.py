"""Late interaction (ColBERT through PyLate): spec rules, the multi-vector layout, token vectors equal to PyLate's own,
resume, fingerprints, the token index and MaxSim search.

The model is PyLate's ColBERT built from the packaged all-MiniLM-L6-v2 with a projection drawn from a fixed seed
(the catalog's `volembed/colbert-minilm-demo`): no ColBERT weights can be downloaded here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from volembed_runner import catalog, store
from volembed_runner import late as late_facts
from volembed_runner.cli import app
from volembed_runner.errors import SpecError
from volembed_runner.loading import load_spec
from volembed_runner.plan import Plan, make_plan

from .test_local_run import _kill_after_first_marker

runner = CliRunner()
WORDS = ["river", "mountain", "Zürich", "café", "harbour", "museum", "quantum", "garden", "library", "theory",
         "violin", "glacier", "pepper", "comet", "lantern", "orchard", "falcon", "marble", "tundra", "saffron"]

SPEC = """\
version: 1
name: late
backend: {backend}
volume: testvol
dataset:
  files: [docs.jsonl]
  keep_columns: [title]
  shard_rows: 8
chunking:
  size: {size}
  overlap: 8
  workers: 1
embedding:
  kind: late_interaction
  model: {model}
  precision: fp32
"""


def write(folder: Path, *, model: str = "volembed/colbert-minilm-demo", size: int = 64, backend: str = "local",
          docs: int = 20, extra: str = "") -> Path:
    rng = random.Random(7)
    with (folder / "docs.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 8, 20, 90])))
            fh.write(json.dumps({"text": text, "title": f"doc {i}"}) + "\n")
    path = folder / "spec.yaml"
    path.write_text(SPEC.format(model=model, size=size, backend=backend) + extra)
    return path


def plan_of(spec: Path) -> Plan:
    return make_plan(load_spec(spec), spec)


def issue(spec: Path) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    return str(caught.value.issues[0])


def test_a_colbert_model_needs_the_late_interaction_kind(tmp_path: Path) -> None:
    spec = write(tmp_path)
    spec.write_text(spec.read_text().replace("  kind: late_interaction\n", ""))
    assert "embedding.kind" in issue(spec) and "set embedding.kind: late_interaction" in issue(spec)
    spec = write(tmp_path, model="sentence-transformers/all-MiniLM-L6-v2")
    assert "needs a ColBERT model" in issue(spec)


@pytest.mark.parametrize("extra", ["  dimensions: 64\n", "  normalize: false\n", "  endpoint: http://tei:80\n",
                                   "  query_prefix: 'query: '\n"])
def test_dense_only_settings_are_refused_for_late_interaction(tmp_path: Path, extra: str) -> None:
    spec = write(tmp_path, extra=extra)
    field = extra.split(":")[0].strip()
    assert f"embedding.{field}" in issue(spec) and "does not apply to late_interaction" in issue(spec)


def test_the_gpu_probe_is_refused_for_late_interaction(tmp_path: Path) -> None:
    spec = write(tmp_path, model="colbert-ir/colbertv2.0", backend="modal")
    result = runner.invoke(app, ["calibrate", str(spec)])
    assert result.exit_code != 0 and "late-interaction job runs PyLate" in result.output


def test_the_dense_lancedb_index_is_refused_for_late_interaction(tmp_path: Path) -> None:
    assert "output.index" in issue(write(tmp_path, extra="output: {index: lancedb}\n"))  # it has its token index


def test_chunks_must_fit_the_colbert_document_length_with_its_markers(tmp_path: Path) -> None:
    assert "177" in issue(write(tmp_path, size=178))  # 180 tokens with [CLS], [D] and [SEP]
    load_spec(write(tmp_path, size=177))


def test_the_built_demo_model_is_refused_on_modal(tmp_path: Path) -> None:
    assert "built on this machine" in issue(write(tmp_path, backend="modal"))


@pytest.mark.parametrize("how", [["--backend", "modal"], ["--set", "backend=modal"]])
def test_the_local_only_demo_model_is_refused_with_backend_modal_from_the_command_line(tmp_path: Path,
                                                                                        how: list[str]) -> None:
    spec = write(tmp_path)
    for command in (["run", str(spec), "--dry-run", *how], ["validate", str(spec), *how]):
        if command[0] == "validate" and how[0] == "--backend":
            continue  # validate takes no --backend
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "embedding.model" in lines[0] and "local only" in lines[0], result.output
    result = runner.invoke(app, ["render", str(spec), "-o", str(tmp_path / "app.py")])  # render is Modal's
    assert result.exit_code == 2 and "local only" in result.output
    assert not (tmp_path / "app.py").exists()


@pytest.mark.parametrize("model", ["answerdotai/answerai-colbert-small-v1", "lightonai/GTE-ModernColBERT-v1"])
def test_the_catalogs_colbert_models_resolve_with_their_own_dimension_and_document_length(tmp_path: Path,
                                                                                          model: str) -> None:
    known = catalog.find_model(model)
    assert known is not None and known.kind == "late_interaction" and known.files and known.source
    fits = known.max_input_tokens - known.special_tokens
    plan = plan_of(write(tmp_path, model=model, backend="modal", size=fits))
    assert plan.late is not None and plan.model.dim == known.dim and plan.embed.dim == known.dim
    assert plan.late.query_length == known.query_length and plan.late.markers == known.markers
    assert plan.late.index_bytes_per_token == known.dim * 4 + plan.late.index_m * 8 + late_facts.INDEX_OVERHEAD_BYTES
    refused = issue(write(tmp_path, model=model, backend="modal", size=fits + 1))
    assert "chunking.size" in refused and f"= {fits})" in refused
    dense = write(tmp_path, model=model, backend="modal", size=fits)
    dense.write_text(dense.read_text().replace("  kind: late_interaction\n", ""))
    assert "embedding.kind" in issue(dense)
    assert "embedding.dimensions" in issue(write(tmp_path, model=model, backend="modal", size=fits,
                                                 extra="  dimensions: 64\n"))


def test_answerai_colbert_small_gives_96_dim_token_vectors_not_128() -> None:
    known = catalog.find_model("answerdotai/answerai-colbert-small-v1")
    assert known is not None and known.dim == 96 and "96" in (known.source or "")


def test_the_modal_image_bakes_the_files_pylate_loads_for_each_colbert_model(tmp_path: Path) -> None:
    from volembed_runner.backends.modal import render

    stanford = render.late_model_files(plan_of(write(tmp_path, model="colbert-ir/colbertv2.0", backend="modal")))
    assert {"artifact.metadata", "model.safetensors", "vocab.txt"} <= set(stanford)
    assert "pytorch_model.bin" not in stanford  # PyLate reads model.safetensors first; the .bin is 438 MB more
    answerai = render.late_model_files(plan_of(write(tmp_path, model="answerdotai/answerai-colbert-small-v1",
                                                     backend="modal", size=297)))
    assert {"0_Transformer/*", "1_Dense/*"} <= set(answerai)  # its modules.json loads these folders
    assert render.late_model_files(plan_of(write(tmp_path, model=str(tmp_path), backend="modal"))) \
        == render.LATE_MODEL_FILES  # a model the catalog does not know: every layout PyLate reads


def test_the_index_shard_bound_is_derived_from_the_index_containers_memory(tmp_path: Path) -> None:
    spec = write(tmp_path)
    plan = plan_of(spec)
    late = plan.late
    assert late is not None and late.index_memory_mib == plan.compute.embed.memory_mib
    assert late.index_shard_tokens == late_facts.max_index_shard_tokens(late.index_memory_mib, 128)
    assert late.index_shard_tokens * late.index_bytes_per_token <= late.index_memory_mib * 2**20 * 0.5
    bounded = tmp_path / "bounded.yaml"
    bounded.write_text(spec.read_text() + "output:\n  late:\n    index_shard_tokens: 500\n")
    small = plan_of(bounded)
    assert small.late and small.late.index_shard_tokens == 500 and small.late.fingerprint != late.fingerprint
    assert small.embed.fingerprint == plan.embed.fingerprint  # only the index is rebuilt for a new bound


@pytest.mark.parametrize(("value", "words"), [(100, "cannot hold one chunk"), (10**9, "GiB of RAM"),
                                              (0, "greater than or equal to 1")])
def test_an_index_shard_bound_that_cannot_work_is_refused(tmp_path: Path, value: int, words: str) -> None:
    found = issue(write(tmp_path, extra=f"output:\n  late:\n    index_shard_tokens: {value}\n"))
    assert "output.late.index_shard_tokens" in found and words in found


def test_output_late_is_refused_for_a_dense_job(tmp_path: Path) -> None:
    spec = write(tmp_path, model="sentence-transformers/all-MiniLM-L6-v2",
                 extra="output:\n  late:\n    index_shard_tokens: 500\n")
    spec.write_text(spec.read_text().replace("  kind: late_interaction\n", ""))
    assert "output.late" in issue(spec) and "late_interaction only" in issue(spec)


def test_the_plan_carries_the_query_side_and_an_index_fingerprint(tmp_path: Path) -> None:
    plan = plan_of(write(tmp_path))
    assert plan.late is not None and plan.late.query_length == 32 and plan.late.index == "voyager"
    assert plan.embed.server.startswith("pylate:") and plan.model.dim == 128
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    modal = plan_of(write(tmp_path, model="colbert-ir/colbertv2.0", backend="modal"))
    assert modal.embed.engine == "pylate" and modal.late and modal.late.fingerprint != plan.late.fingerprint


def test_token_vectors_round_trip_through_the_multivector_layout() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 1, 7)]
    column, counts = store.multivector_columns(vectors, 8)
    assert str(column.type) == "list<item: fixed_size_list<item: halffloat>[8]>"
    assert counts.to_pylist() == [3, 1, 7]
    back = store.read_multivectors(column.slice(1))
    assert [b.shape for b in back] == [(1, 8), (7, 8)]
    np.testing.assert_array_equal(back[1], vectors[2].astype(np.float16))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Plan]:
    """One finished late-interaction run of 20 small documents, through the CLI."""
    folder = tmp_path_factory.mktemp("late")
    home = folder / "home"
    old = os.environ.get("VOLEMBED_HOME")
    os.environ["VOLEMBED_HOME"] = str(home)
    try:
        spec = write(folder)
        result = runner.invoke(app, [str(spec)])
        assert result.exit_code == 0, result.output
        return spec, plan_of(spec)
    finally:
        os.environ.pop("VOLEMBED_HOME") if old is None else os.environ.__setitem__("VOLEMBED_HOME", old)


def _home(monkeypatch: pytest.MonkeyPatch, spec: Path) -> None:
    monkeypatch.setenv("VOLEMBED_HOME", str(spec.parent / "home"))


def _rows(plan: Plan) -> tuple[list[str], list[np.ndarray]]:
    folder = store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint)
    texts, vectors = [], []
    for unit in store.done_shards(folder):
        table = pq.read_table(store.shard_path(folder, unit))
        chunks = pq.read_table(store.shard_path(store.chunks_dir(plan.local_root(), plan.name,
                                                                 plan.chunk.fingerprint), unit.split(".")[0]))
        texts += chunks["text"].to_pylist()
        vectors += store.read_multivectors(table["embedding"])
        assert table["n_vectors"].to_pylist() == [len(v) for v in store.read_multivectors(table["embedding"])]
    return texts, vectors


@pytest.mark.slow
def test_pipeline_vectors_equal_pylates_own_encode(finished, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, plan = finished
    _home(monkeypatch, spec)
    from pylate.models import ColBERT

    from volembed_runner.stages.late import demo_model_dir

    texts, stored = _rows(plan)
    assert len(texts) >= 20
    reference = ColBERT(str(demo_model_dir(plan)), device="cpu").encode(texts, is_query=False,
                                                                       show_progress_bar=False)
    for got, want in zip(stored, reference, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3)


@pytest.mark.slow
def test_a_query_equal_to_a_chunks_text_ranks_that_chunk_first(finished, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, plan = finished
    _home(monkeypatch, spec)
    from volembed_runner.stages import late

    rows = pq.read_table(late.shard_dir(late.index_folder(plan.local_root(), plan), 0) / late.ROWS_FILE).to_pylist()
    picked = [r for r in rows if len(r["snippet"].split()) <= 20][:4]
    results = late.search(plan.local_root(), plan, [r["snippet"] for r in picked], k=3)
    for row, hits in zip(picked, results, strict=True):
        assert (hits[0].doc_id, hits[0].chunk_index) == (row["doc_id"], row["chunk_index"])
        assert hits[0].columns["title"] == row["title"] and hits[0].score >= hits[-1].score
    result = runner.invoke(app, ["search", str(spec), picked[0]["snippet"], "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["method"] == "voyager" and found["measure"] == "MaxSim"
    assert (found["hits"][0]["doc_id"], found["hits"][0]["chunk_index"]) == (picked[0]["doc_id"],
                                                                              picked[0]["chunk_index"])
    assert found["hits"][0]["shard"] == picked[0]["shard"]


SHARD_BOUND = 200  # token vectors per index shard: a bit more than one chunk's (180), so 20 documents make several
BOUNDED = f"output:\n  late:\n    index_shard_tokens: {SHARD_BOUND}\n"


@pytest.fixture(scope="module")
def sharded(finished: tuple[Path, Plan]) -> Plan:
    """The finished run's token index built again in index shards of at most SHARD_BOUND token vectors (the same
    embedding files: only the index stage runs)."""
    spec, _ = finished
    path = spec.parent / "sharded.yaml"
    path.write_text(SPEC.format(model="volembed/colbert-minilm-demo", size=64, backend="local") + BOUNDED)
    old = os.environ.get("VOLEMBED_HOME")
    os.environ["VOLEMBED_HOME"] = str(spec.parent / "home")
    try:
        result = runner.invoke(app, [str(path)])
        assert result.exit_code == 0, result.output
        return plan_of(path)
    finally:
        os.environ.pop("VOLEMBED_HOME") if old is None else os.environ.__setitem__("VOLEMBED_HOME", old)


@pytest.mark.slow
def test_a_tiny_index_shard_bound_builds_several_shards_each_within_it(finished, sharded: Plan,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spec, plan = finished
    _home(monkeypatch, spec)
    from volembed_runner.stages import late

    root = plan.local_root()
    one = store.read_json(store.marker_path(late.index_folder(root, plan)))
    many = store.read_json(store.marker_path(late.index_folder(root, sharded)))
    assert sharded.embed.fingerprint == plan.embed.fingerprint and many["units"] == one["units"]
    assert one["index_shards"] == 1 and many["index_shards"] >= 3
    folder = late.index_folder(root, sharded)
    shards = [store.read_json(store.marker_path(late.shard_dir(folder, n))) for n in range(many["index_shards"])]
    assert all(0 < s["token_vectors"] <= SHARD_BOUND for s in shards)
    assert many["largest_shard_tokens"] <= SHARD_BOUND
    _, vectors = _rows(plan)
    assert sum(s["token_vectors"] for s in shards) == one["token_vectors"] == sum(len(v) for v in vectors)
    assert sum(s["chunks"] for s in shards) == one["chunks"] == len(vectors)


@pytest.mark.slow
def test_searching_the_index_shards_finds_what_one_index_finds(finished, sharded: Plan,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spec, plan = finished
    _home(monkeypatch, spec)
    from volembed_runner.stages import late

    root = plan.local_root()
    rows = pq.read_table(late.shard_dir(late.index_folder(root, plan), 0) / late.ROWS_FILE).to_pylist()
    queries = [rows[i]["snippet"] for i in range(0, len(rows), max(1, len(rows) // 4))] + ["quantum garden", "comet"]
    embedder = late.engine(plan)
    one = late.search(root, plan, queries, k=3, embedder=embedder)
    many = late.search(root, sharded, queries, k=3, embedder=embedder)
    for a, b in zip(one, many, strict=True):
        assert [(h.doc_id, h.chunk_index) for h in a] == [(h.doc_id, h.chunk_index) for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-3)
        assert [h.columns for h in a] == [h.columns for h in b] and [h.shard for h in a] == [h.shard for h in b]


@pytest.mark.slow
def test_a_killed_index_build_resumes_per_index_shard(tmp_path: Path) -> None:
    spec = write(tmp_path, docs=24, extra=BOUNDED)
    env = {**os.environ, "VOLEMBED_HOME": str(tmp_path / "home")}
    embedded = subprocess.run([sys.executable, "-m", "volembed_runner", str(spec), "--until", "embed"], env=env,
                              capture_output=True, text=True)
    assert embedded.returncode == 0, embedded.stderr
    index = tmp_path / "home" / "volumes" / "testvol" / "runs" / "late" / "index"
    _kill_after_first_marker([sys.executable, "-m", "volembed_runner", str(spec)], env, index)
    (folder,) = [p for p in index.iterdir() if p.is_dir()]
    done = sorted(p.name for p in folder.glob("shard-*.done"))

    def shard_bytes(names: list[str]) -> dict[str, bytes]:
        return {str(f.relative_to(folder)): f.read_bytes() for name in names
                for f in sorted((folder / name.removesuffix(".done")).rglob("*")) if f.is_file()}

    before = shard_bytes(done)
    resumed = subprocess.run([sys.executable, "-m", "volembed_runner", str(spec), "--json"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    stats = json.loads(folder.with_name(folder.name + ".done").read_text())
    assert len(done) < stats["index_shards"], "the kill came after the last shard: nothing left to resume"
    assert stats["index_shards_built"] == stats["index_shards"] - len(done)  # only the rest was built
    assert shard_bytes(done) == before  # the shards finished before the kill are untouched
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no half-built shard left


@pytest.mark.slow
def test_changing_only_the_model_reruns_only_embed_and_index(finished, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, plan = finished
    _home(monkeypatch, spec)
    demo = catalog.find_model("volembed/colbert-minilm-demo")
    other = dataclasses.replace(demo, id="test/colbert-minilm-seed1", build=catalog.BuiltModel(demo.build.base, 1))
    monkeypatch.setitem(catalog.models(), other.id, other)
    spec.write_text(spec.read_text().replace("volembed/colbert-minilm-demo", other.id))
    result = runner.invoke(app, [str(spec), "--json"])
    assert result.exit_code == 0, result.output
    assert "chunk: 0 of" in result.output or '"chunk"' in result.output
    new = plan_of(spec)
    manifest = json.loads(store.manifest_path(new.local_root(), new.name).read_text())
    stages = manifest["stages"]
    assert stages["chunk"].get("skipped") == stages["chunk"].get("total")
    assert stages["embed"].get("skipped", 0) == 0 and stages["index"].get("skipped", 0) == 0
    assert new.chunk.fingerprint == plan.chunk.fingerprint and new.embed.fingerprint != plan.embed.fingerprint
    assert new.late and plan.late and new.late.fingerprint != plan.late.fingerprint
    _, before = _rows(plan)
    _, after = _rows(new)
    assert not np.allclose(before[0].astype(np.float32), after[0].astype(np.float32))


@pytest.mark.slow
def test_a_killed_late_run_resumes_to_byte_identical_shards(tmp_path: Path) -> None:
    spec = write(tmp_path, docs=24)
    command = [sys.executable, "-m", "volembed_runner", str(spec), "--until", "embed"]

    def env(home: str) -> dict[str, str]:
        return {**os.environ, "VOLEMBED_HOME": str(tmp_path / home)}

    killed = tmp_path / "home-a" / "volumes" / "testvol" / "runs" / "late" / "embeddings"
    _kill_after_first_marker(command, env("home-a"), killed)
    for home in ("home-a", "home-b"):
        done = subprocess.run(command, env=env(home), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def files(home: str) -> dict[str, bytes]:
        folder = next((tmp_path / home / "volumes" / "testvol" / "runs" / "late" / "embeddings").iterdir())
        return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.parquet"))}

    assert len(files("home-b")) == 3 and files("home-a") == files("home-b")
    assert [p for p in killed.rglob("*") if p.name.endswith(".tmp")] == []


def test_the_modal_app_runs_pylate_on_its_gpu_image_and_builds_the_index_there(tmp_path: Path) -> None:
    from tests.fake_modal import fake_modal_server
    from tests.test_modal_app import REPO, build_kwargs, build_steps, import_offline, no_network, pipeline_plan
    from volembed_runner.backends.modal import render

    plan = pipeline_plan(REPO / "pipelines" / "colbert-pdfs.yaml")
    module = import_offline(render.render_app(plan), tmp_path / "colbert_app.py")
    assert module.ENGINE == "pylate" and module.MODEL_ID == "colbert-ir/colbertv2.0"
    with no_network():
        embed, index = module.Embedder().embed.info(), module.index.info()
    assert embed.gpus == [("A100-40GB", 1)] and embed.method_names == ["embed"]
    assert index.gpus == [] and {p: v.name for p, v in index.volumes.items()} == {"/vol": "colbert-pdfs"}
    with fake_modal_server() as rec:
        module.app.deploy()
    fns = rec.functions()
    assert {"Embedder.*", "index", "orchestrate"} <= set(fns)
    assert fns["index"].image_id == fns["Embedder.*"].image_id  # the token index is built where PyLate is
    lines = rec.dockerfile(fns["Embedder.*"].image_id)
    assert lines[0].startswith("FROM ") and "text-embeddings-inference" not in lines[0]
    installs = [line for line in lines if "uv pip install" in line]
    assert all(pkg in installs[0].split() for pkg in render.LATE_PACKAGES) and "torch==2.13.0" in installs[0]
    assert "--no-deps" in installs[1] and render.PYLATE_PACKAGE in installs[1]
    (weights,) = build_steps(rec, "Embedder.*")
    assert build_kwargs(weights)["allow_patterns"] == list(catalog.find_model("colbert-ir/colbertv2.0").files)
    assert "torch" not in " ".join(rec.dockerfile(fns["chunk"].image_id))  # CPU stages stay light


def test_the_dry_run_counts_every_token_vector_and_prices_the_index_stage(tmp_path: Path) -> None:
    from tests.test_modal_app import REPO

    pdfs = REPO / "pipelines" / "colbert-pdfs.yaml"
    late = tmp_path / "late.yaml"
    late.write_text(pdfs.read_text().replace('"${PDF_DIR:-pdfs}"', str(REPO / "pipelines" / "pdfs")))
    dense = tmp_path / "dense.yaml"
    dense.write_text(late.read_text().replace("  kind: late_interaction\n", "")
                     .replace("colbert-ir/colbertv2.0", "BAAI/bge-small-en-v1.5"))

    def storage(spec: Path) -> dict:
        result = runner.invoke(app, [str(spec), "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        estimate = json.loads(result.output)
        stages = {s["name"]: s for s in estimate["stages"]}
        assumptions = "\n".join(estimate["assumptions"])
        assert ("token index:" in assumptions) == ("index" in stages)  # the bound's formula is stated with it
        return (stages.get("storage") or {}) | {"tokens": estimate["tokens"], "index": stages.get("index")}

    late_storage, dense_storage = storage(late), storage(dense)
    assert late_storage["index"]["cost_usd"] > 0 and late_storage["index"]["gpu_hours"] == 0  # CPU, priced
    assert "index shard" in late_storage["index"]["note"] and "token vectors" in late_storage["index"]["note"]
    assert dense_storage["index"] is None  # a dense spec without output.index has no index stage
    local = tmp_path / "local.yaml"
    local.write_text(late.read_text().replace("backend: modal", "backend: local"))
    local_index = storage(local)["index"]
    assert local_index["seconds"] > 0 and local_index["cost_usd"] == 0  # local: time only
    assert "token vectors" in late_storage["note"] and "token index" in late_storage["note"]
    assert late_storage["cost_usd"] > 3 * dense_storage["cost_usd"]  # one 128-dim vector per token vs one per chunk
