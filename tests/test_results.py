"""After a run, through the CLI: `files` (and current.json), `plan`'s output folders, `gc`, `fetch` and `report`.

One small local run (and a run with unnormalized vectors, which leaves a stale embeddings folder) is made once
per session (`finished_run`, tests/after_run.py) with the real local engine; each test works on its own copy of it.
The Modal code paths run over a stand-in for `modal.Volume` whose `listdir`, `read_file` and `remove_file` behave as
modal 1.6.4's (`modal/volume.py`: listing returns `modal.types.FileEntry` with paths relative to the Volume root, a
missing file raises FileNotFoundError, `remove_file(recursive=True)` deletes a folder).
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from modal.types import FileEntry, FileEntryType
from typer.testing import CliRunner

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


def chunk_table(plan: Plan) -> Any:
    folder = store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint)
    return pq.read_table([store.shard_path(folder, s) for s in store.done_shards(folder)])


# ── files, current.json, plan ────────────────────────────────────────────────────────────────────────────────────


def test_current_json_names_the_last_pass_and_files_globs_only_its_vectors(run) -> None:
    spec, plan = run
    current = json.loads(store.current_path(plan.local_root(), plan.name).read_text())
    assert current["fingerprints"]["embeddings"] == plan.embed.fingerprint and current["status"] == "succeeded"
    # the unnormalized run left its own folder beside the current one: a glob over embeddings/* would mix both
    assert len(list((plan.local_root() / "runs" / plan.name / "embeddings").iterdir())) == 2

    code, out = cli("files", str(spec), "--stage", "embeddings")
    assert code == 0, out
    glob = out.strip()
    assert glob == f"{store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint)}/*.parquet"
    table = pq.read_table(sorted(Path(glob).parent.glob("*.parquet")))
    assert table.num_rows == chunk_table(plan).num_rows
    assert table.schema.field("embedding").type.list_size == 384


def test_files_json_and_duckdb_read_the_current_folders(run) -> None:
    import duckdb

    spec, plan = run
    code, out = cli("files", str(spec), "--json")
    assert code == 0, out
    found = json.loads(out)
    assert found["recorded"] and found["fingerprints"]["chunks"] == plan.chunk.fingerprint
    assert found["files"]["embeddings"]["count"] == len(store.done_shards(
        store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint)))
    rows = duckdb.sql(f"select count(*) from '{found['paths']['embeddings']['glob']}'").fetchall()[0][0]
    assert rows == chunk_table(plan).num_rows


def test_files_says_when_the_spec_changed_since_the_last_pass(run) -> None:
    spec, plan = run
    code, out = cli("files", str(spec), "--set", "chunking.size=24")
    assert code == 0, out
    assert "the spec as written now changes chunks, embeddings" in out
    assert plan.embed.fingerprint in out  # still the last pass's folders


def test_files_before_any_run_shows_the_folders_the_spec_will_write(write_spec, tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    spec = write_spec(SPEC)
    code, out = cli("files", str(spec))
    assert code == 0, out
    assert "no pass of this run has ended yet" in out


def test_plan_shows_the_output_folders(run) -> None:
    spec, plan = run
    code, out = cli("plan", str(spec))
    assert code == 0, out
    outputs = json.loads(out)["outputs"]
    assert outputs["embeddings"] == str(store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint))
    assert outputs["data"] == str(store.data_dir(plan.local_root(), plan.data.fingerprint))


def test_files_rejects_an_unknown_stage(run) -> None:
    spec, _ = run
    code, out = cli("files", str(spec), "--stage", "vectors")
    assert code == 2 and "--stage: must be one of data, chunks, embeddings" in out


# ── gc ───────────────────────────────────────────────────────────────────────────────────────────────────────────


def _embedding_folders(plan: Plan) -> set[str]:
    return {p.name for p in (plan.local_root() / "runs" / plan.name / "embeddings").iterdir()}


def test_gc_lists_the_stale_folder_and_deletes_only_with_yes(run) -> None:
    spec, plan = run
    stale = _embedding_folders(plan) - {plan.embed.fingerprint}
    assert len(stale) == 1
    code, out = cli("gc", str(spec), "--json")
    assert code == 0, out
    listed = json.loads(out)
    assert [s["path"] for s in listed["stale"]] == [f"runs/{plan.name}/embeddings/{next(iter(stale))}"]
    assert listed["stale"][0]["bytes"] > 0 and not listed["removed"]
    assert len(_embedding_folders(plan)) == 2  # listing removes nothing

    code, out = cli("gc", str(spec), "--yes")
    assert code == 0, out
    assert "removed 1 folder(s)" in out
    assert _embedding_folders(plan) == {plan.embed.fingerprint}
    code, out = cli("files", str(spec), "--stage", "embeddings")
    assert pq.read_table(sorted(Path(out.strip()).parent.glob("*.parquet"))).num_rows == chunk_table(plan).num_rows


def test_gc_never_removes_another_runs_data(run, tmp_path: Path) -> None:
    spec, plan = run
    other = plan.local_root() / "runs" / "other-run"
    other.mkdir(parents=True)
    store.write_json_atomic(other / "current.json", {"fingerprints": {"data": "feedfacefeedface", "chunks": "a",
                                                                       "embeddings": "b"}})
    shared = store.data_dir(plan.local_root(), "feedfacefeedface")
    orphan = store.data_dir(plan.local_root(), "0123456789abcdef")
    for folder in (shared, orphan):
        folder.mkdir(parents=True)
        (folder / "shard-00000.parquet").write_bytes(b"x" * 10)
    code, out = cli("gc", str(spec), "--json")
    listed = {s["path"] for s in json.loads(out)["stale"]}
    assert "data/feedfacefeedface" not in listed and f"data/{plan.data.fingerprint}" not in listed
    # written just now: a download may be under way, so even the orphan stays until it has been quiet a while
    assert "data/0123456789abcdef" not in listed and "a download may be under way" in json.loads(out)["notes"][0]


def test_gc_refuses_while_a_pass_of_the_run_holds_its_lease(run) -> None:
    from volembed_runner.lease import FileLeaseStore, Holder, held

    spec, plan = run
    with held(FileLeaseStore(store.lease_dir(plan.local_root(), plan.name)), Holder.here("local")):
        code, out = cli("gc", str(spec), "--yes")
    assert code == 6 and "being written by" in out
    assert len(_embedding_folders(plan)) == 2


# ── fetch ────────────────────────────────────────────────────────────────────────────────────────────────────────


def chunk_shards(plan: Plan) -> list[str]:
    return store.done_shards(store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint))


def test_fetch_joins_one_shard_with_its_chunk_text(run, tmp_path: Path) -> None:
    spec, plan = run
    second = chunk_shards(plan)[1]
    code, out = cli("fetch", str(spec), "--shard", "1", "--json")  # by position; `--shard <id>` names the same
    assert code == 0, out
    fetched = json.loads(out)
    assert fetched["shards"] == [second] and fetched["joined_text"]
    assert fetched["path"] == f"after-shard-{second}.parquet"
    table = pq.read_table(tmp_path / fetched["path"])
    chunks = pq.read_table(store.shard_path(store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint),
                                            second))
    assert table.num_rows == chunks.num_rows == fetched["rows"]
    assert table["text"].to_pylist() == chunks["text"].to_pylist()
    assert table["title"].to_pylist() == chunks["title"].to_pylist()
    assert table.column_names[-1] == "embedding" and table.schema.field("embedding").type.list_size == 384


def test_fetch_all_as_jsonl_holds_every_chunk(run, tmp_path: Path) -> None:
    spec, plan = run
    code, out = cli("fetch", str(spec), "--all", "--format", "jsonl", "-o", str(tmp_path / "all.jsonl"))
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    chunks = chunk_table(plan)
    assert [(r["doc_id"], r["chunk_index"], r["text"]) for r in rows] == list(zip(
        chunks["doc_id"].to_pylist(), chunks["chunk_index"].to_pylist(), chunks["text"].to_pylist(), strict=True))
    assert all(len(r["embedding"]) == 384 for r in rows)
    assert not list(tmp_path.glob(".all.jsonl*.tmp"))


def test_fetch_names_the_shards_there_are(run) -> None:
    spec, plan = run
    code, out = cli("fetch", str(spec), "--shard", "42")
    assert code == 4 and f"no finished embedding shard '42'; it has {', '.join(chunk_shards(plan))}" in out
    code, out = cli("fetch", str(spec), "--shard", "1", "--all")
    assert code == 2 and "--shard K or --all" in out


# ── report ───────────────────────────────────────────────────────────────────────────────────────────────────────


class Page(HTMLParser):
    """The text, images and links of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src") or "")
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data.strip())

    def row(self, first: str) -> list[str]:
        return next(r for t in self.tables for r in t if r and r[0] == first)


def test_report_is_one_self_contained_page_with_the_runs_figures(run, tmp_path: Path) -> None:
    spec, plan = run
    code, out = cli("report", str(spec), "-o", str(tmp_path / "r.html"))
    assert code == 0, out
    assert f"wrote {tmp_path / 'r.html'} and {tmp_path / 'r-tokens.png'}" in out
    page = Page()
    page.feed((tmp_path / "r.html").read_text(encoding="utf-8"))
    text = " ".join(page.text)
    manifest = json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())
    stats = json.loads(store.stats_path(plan.local_root(), plan.name).read_text())

    assert not page.links  # nothing outside the page
    assert len(page.images) >= 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert base64.b64decode(page.images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "r-tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tokens per chunk" in text and "chunks per document" in text
    assert page.row("chunks under 8 tokens")[1] == f"{stats['tiny_chunks']:,}"
    assert page.row("empty documents (no chunk)")[1] == f"{manifest['totals']['empty_documents']:,}"
    assert page.row("chunks truncated by the engine")[1] == "0"
    assert "No shard failed in the last pass." in text
    embed = page.row("embed")
    assert embed[1] == f"{manifest['stages']['embed']['done']} / {manifest['stages']['embed']['total']}"
    assert "tokens/s" in embed[5] and embed[6] == "1"  # throughput, and the one pass that embedded
    assert page.row("wall time")[1] and page.row("cost")[2].startswith("$0")
    assert "recomputed from the spec when this report was made" in text
    assert plan.embed.fingerprint in text


def test_report_lists_failed_shards_with_their_causes(run, tmp_path: Path) -> None:
    spec, plan = run
    path = store.manifest_path(plan.local_root(), plan.name)
    manifest = json.loads(path.read_text())
    cause = "StageError: embedding shard 00000-0003: chunk 7#0: refused"
    manifest["stages"]["embed"]["failed"] = {"00000-0003": cause}
    path.write_text(json.dumps(manifest))
    code, out = cli("report", str(spec), "-o", str(tmp_path / "r.html"))
    assert code == 0, out
    page = Page()
    page.feed((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert ["embed", "00000-0003", cause] in [r for t in page.tables for r in t]
    assert page.row("failed shards (this pass)")[1] == "1"


# ── The Modal code paths, over a stand-in Volume ─────────────────────────────────────────────────────────────────


class FolderModalVolume:
    """`modal.Volume`'s client-side calls over a folder (modal 1.6.4 `volume.py`: `listdir` → `FileEntry`s with paths
    relative to the root, `read_file` yields bytes and raises FileNotFoundError for a missing path,
    `remove_file(path, recursive=True)` removes a folder, `hydrate` finds the Volume)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.read_bytes = 0
        self.removed: list[str] = []

    def hydrate(self) -> FolderModalVolume:
        return self

    def listdir(self, path: str, *, recursive: bool = False) -> list[FileEntry]:
        base = self.root / path
        if not base.exists():
            raise FileNotFoundError(path)
        found = base.rglob("*") if recursive else base.iterdir()
        return [FileEntry(path=p.relative_to(self.root).as_posix(),
                          type=FileEntryType.DIRECTORY if p.is_dir() else FileEntryType.FILE,
                          mtime=int(p.stat().st_mtime), size=0 if p.is_dir() else p.stat().st_size)
                for p in sorted(found)]

    def read_file(self, path: str) -> Iterator[bytes]:
        full = self.root / path
        if not full.is_file():
            raise FileNotFoundError(path)
        data = full.read_bytes()
        for i in range(0, len(data), 4096):  # blocks, as the SDK yields them
            self.read_bytes += len(data[i:i + 4096])
            yield data[i:i + 4096]

    def remove_file(self, path: str, recursive: bool = False) -> None:
        if not recursive:
            raise IsADirectoryError(path)
        shutil.rmtree(self.root / path)
        self.removed.append(path)


@pytest.fixture
def on_modal(run, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Plan, FolderModalVolume]:
    """The finished run's volume as a Modal Volume (same layout), and the spec switched to the Modal backend."""
    import modal

    spec, plan = run
    volume = FolderModalVolume(plan.local_root())
    names: list[str] = []
    monkeypatch.setattr(modal.Volume, "from_name", lambda name, **kw: names.append(name) or volume)
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    modal_spec = spec.with_name("modal.yaml")
    modal_spec.write_text(SPEC.replace("backend: local", "backend: modal"))
    return modal_spec, plan, volume


def test_fetch_from_a_modal_volume_downloads_through_the_sdk(on_modal, tmp_path: Path) -> None:
    spec, plan, volume = on_modal
    first = chunk_shards(plan)[0]
    code, out = cli("fetch", str(spec), "--shard", first, "-o", str(tmp_path / "s0.parquet"), "--json")
    assert code == 0, out
    fetched = json.loads(out)
    chunks = pq.read_table(store.shard_path(store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint),
                                            first))
    table = pq.read_table(tmp_path / "s0.parquet")
    assert table["text"].to_pylist() == chunks["text"].to_pylist()
    downloaded = [store.shard_path(store.embeddings_dir(plan.local_root(), plan.name, plan.embed.fingerprint), first),
                  store.shard_path(store.chunks_dir(plan.local_root(), plan.name, plan.chunk.fingerprint), first)]
    assert fetched["bytes_read"] == sum(p.stat().st_size for p in downloaded)  # counted as the blocks came


def test_files_and_report_read_a_modal_volume(on_modal, tmp_path: Path) -> None:
    spec, plan, _ = on_modal
    code, out = cli("files", str(spec), "--stage", "embeddings")
    assert code == 0 and out.strip() == f"/vol/runs/{plan.name}/embeddings/{plan.embed.fingerprint}/*.parquet"
    code, out = cli("report", str(spec), "-o", str(tmp_path / "m.html"))
    assert code == 0, out
    assert "local backend" in (tmp_path / "m.html").read_text()  # the manifest's record of where it ran


def test_gc_on_a_modal_volume_removes_through_the_sdk_under_the_runs_lease(on_modal, monkeypatch) -> None:
    from volembed_runner.backends.modal import volume_files

    from .test_modal_stages_local import DictStandIn

    spec, plan, volume = on_modal
    leases = DictStandIn()
    monkeypatch.setattr(volume_files, "lease_store",
                        lambda p: __import__("volembed_runner.backends.modal.runtime", fromlist=["x"])
                        .DictLeaseStore(leases, f"{p.volume}/{p.name}"))
    code, out = cli("gc", str(spec), "--yes")
    assert code == 0, out
    assert len(volume.removed) == 1 and volume.removed[0].startswith(f"runs/{plan.name}/embeddings/")
    assert any(key.startswith(f"{plan.volume}/{plan.name}/") for key in leases.data)  # gc held the run's lease
