"""The download stage on small files made on the fly: formats, shard bounds, limit, resume, errors, Hub listing."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.hf_api import DatasetInfo, RepoFile
from pypdf import PdfReader

from volembed_runner import store
from volembed_runner.errors import SourceError
from volembed_runner.plan import DataSettings
from volembed_runner.sources import SourceTask, jsonl, list_tasks
from volembed_runner.sources import hub as hub_source
from volembed_runner.stages.download import download_task, finalize, finished_shards, read_index


def settings(*files: Path | str, **kw: Any) -> DataSettings:
    base: dict[str, Any] = {
        "kind": "files",
        "hf": None,
        "config": None,
        "split": "train",
        "revision": None,
        "files": tuple(str(f) for f in files),
        "text_column": None,
        "text_template": None,
        "id_column": None,
        "keep_columns": (),
        "limit": None,
        "shard_rows": 50_000,
        "duplicate_ids": "error",
        "num_rows": None,
        "num_bytes": None,
        "fingerprint": "fp-test",
    }
    base.update(kw)
    base["keep_columns"] = tuple(base["keep_columns"])
    return DataSettings(**base)


def run(root: Path, data: DataSettings) -> list[tuple[str, int | None]]:
    """All tasks, then finalize: what a backend does."""
    tasks = list_tasks(data)
    for task in tasks:
        download_task(root, data, task)
    return finalize(root, data, tasks)


def rows(root: Path, data: DataSettings, index: list[tuple[str, int | None]] | None = None) -> list[dict[str, Any]]:
    """The rows the chunk stage would see, in shard order, limit applied."""
    out: list[dict[str, Any]] = []
    folder = store.data_dir(root, data.fingerprint)
    for shard, take in index if index is not None else read_index(root, data) or []:
        table = pq.read_table(store.shard_path(folder, shard))
        out.extend(table.slice(0, take if take is not None else table.num_rows).to_pylist())
    return out


def source_error(root: Path, data: DataSettings) -> str:
    """Run and return the one-line SourceError message it must raise."""
    with pytest.raises(SourceError) as info:
        run(root, data)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 3) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    payload = b"".join(orjson.dumps(r) + b"\n" for r in records)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.name.endswith(".gz") else payload)
    return path


def make_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal valid PDF with one line of Helvetica text per page (pypdf reads but does not write text)."""
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    kids = []
    for i, text in enumerate(pages):
        page_id, content_id = 4 + 2 * i, 5 + 2 * i
        kids.append(f"{page_id} 0 R")
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects[page_id] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {content_id} 0 R >>"
        ).encode()
        objects[content_id] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for oid in sorted(objects):
        offsets[oid] = len(out)
        out += b"%d 0 obj\n" % oid + objects[oid] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[oid] for oid in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    path.write_bytes(bytes(out))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "vol"


@pytest.fixture
def docs_parquet(tmp_path: Path) -> Path:
    """Ten rows in row groups of three: ids, texts (one null), an int and a string keep column."""
    texts = [f"document {i}" for i in range(10)]
    texts[4] = None
    table = pa.table(
        {
            "doc": [f"d{i}" for i in range(10)],
            "text": texts,
            "score": list(range(10)),
            "url": [f"https://x/{i}" for i in range(10)],
        }
    )
    return write_parquet(tmp_path / "docs.parquet", table)


# ----------------------------------------------------------------------------------------------------------- formats


def test_parquet_row_groups_become_bounded_shards_in_order(root: Path, docs_parquet: Path) -> None:
    data = settings(docs_parquet, id_column="doc", keep_columns=["score", "url"], shard_rows=4)
    index = run(root, data)
    assert index == [("00000-0000", None), ("00000-0001", None), ("00000-0002", None)]
    out = rows(root, data, index)
    assert [r["id"] for r in out] == [f"d{i}" for i in range(10)]
    assert out[4]["text"] == ""  # a null text is an empty document, counted later by the chunk stage
    assert out[3] == {"id": "d3", "text": "document 3", "score": 3, "url": "https://x/3"}
    shard = pq.read_table(store.shard_path(store.data_dir(root, "fp-test"), "00000-0000"))
    assert shard.schema.names == ["id", "text", "score", "url"]
    assert shard.schema.field("score").type == pa.int64()
    assert store.read_marker(store.shard_path(store.data_dir(root, "fp-test"), "00000-0000"))["rows"] == 4


def test_default_ids_are_task_and_row(root: Path, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "z"}])
    data = settings(a, b)
    assert [r["id"] for r in rows(root, data, run(root, data))] == ["0:0", "0:1", "1:0"]


def test_jsonl_gz_reads_like_jsonl(root: Path, tmp_path: Path) -> None:
    records = [{"text": f"t{i}", "lang": "en"} for i in range(5)]
    plain = settings(write_jsonl(tmp_path / "d.jsonl", records), keep_columns=["lang"], fingerprint="plain")
    packed = settings(write_jsonl(tmp_path / "d.jsonl.gz", records), keep_columns=["lang"], fingerprint="gz")
    assert list_tasks(packed)[0].fmt == "jsonl"
    assert rows(root, plain, run(root, plain)) == rows(root, packed, run(root, packed))


def test_csv_quoted_newlines_and_numeric_ids(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "d.csv.gz"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerows([["id", "body", "zip"], [1, "two\nlines", "01234"], [2, "plain", "99999"]])
    path.write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0))
    data = settings(path, text_column="body", id_column="id", keep_columns=["zip"])
    assert rows(root, data, run(root, data)) == [
        {"id": "1", "text": "two\nlines", "zip": "01234"},
        {"id": "2", "text": "plain", "zip": "99999"},
    ]


def test_json_mapping_uses_keys_as_ids_and_renders_template(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "summaries.json"
    mapping = {
        "Ada Lovelace": {"title": "Ada Lovelace", "extract": "Mathematician.", "topic": "People"},
        "Zinc": {"title": "Zinc", "extract": None, "topic": "Science"},
    }
    path.write_text(json.dumps(mapping), encoding="utf-8")
    data = settings(path, text_template="{title}\n\n{extract}", keep_columns=["topic"])
    assert rows(root, data, run(root, data)) == [
        {"id": "Ada Lovelace", "text": "Ada Lovelace\n\nMathematician.", "topic": "People"},
        {"id": "Zinc", "text": "Zinc\n\n", "topic": "Science"},
    ]


def test_json_list_and_json_lines_named_json(root: Path, tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    lines = write_jsonl(tmp_path / "lines.json", [{"text": "c"}])
    data = settings(listed, lines)
    assert [(r["id"], r["text"]) for r in rows(root, data, run(root, data))] == [
        ("0:0", "a"),
        ("0:1", "b"),
        ("1:0", "c"),
    ]


def test_template_over_parquet_columns(root: Path, docs_parquet: Path) -> None:
    data = settings(docs_parquet, text_template="{url} | {score:03d} | {text}", limit=5)
    out = rows(root, data, run(root, data))
    assert out[2]["text"] == "https://x/2 | 002 | document 2"
    assert out[4]["text"] == "https://x/4 | 004 | "


def test_folder_of_text_files_one_document_each(root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("# B\nbee", encoding="utf-8")
    (folder / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")
    (folder / ".hidden.txt").write_text("skip me", encoding="utf-8")
    data = settings(folder, keep_columns=["path"])
    assert list_tasks(data)[0].fmt == "text"
    assert rows(root, data, run(root, data)) == [
        {"id": "a.txt", "text": "ay", "path": "a.txt"},
        {"id": "b.md", "text": "# B\nbee", "path": "b.md"},
        {"id": "sub/c.txt", "text": "sea", "path": "sub/c.txt"},
    ]


def test_pdfs_give_one_document_with_pages_joined(root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pdfs"
    folder.mkdir()
    make_pdf(folder / "report.pdf", ["First page", "Second page"])
    make_pdf(folder / "memo.pdf", ["Memo"])
    assert PdfReader(folder / "memo.pdf").pages[0].extract_text() == "Memo"
    data = settings(folder)
    assert list_tasks(data)[0].fmt == "pdf"
    assert [(r["id"], r["text"]) for r in rows(root, data, run(root, data))] == [
        ("memo.pdf", "Memo"),
        ("report.pdf", "First page\n\nSecond page"),
    ]
    single = settings(folder / "report.pdf", fingerprint="one")
    assert rows(root, single, run(root, single)) == [{"id": "report.pdf", "text": "First page\n\nSecond page"}]


def test_source_task_round_trips_through_json() -> None:
    task = SourceTask(index=3, source="hf://datasets/a/b@abc/x.parquet", fmt="parquet", size=None)
    assert SourceTask.from_dict(json.loads(json.dumps(task.to_dict()))) == task


# --------------------------------------------------------------------------------------------- bounds, limit, resume


def test_shards_are_bounded_by_text_bytes(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MAX_SHARD_TEXT_BYTES", 100)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 40} for _ in range(5)] + [{"text": "y" * 250}])
    data = settings(path)
    folder = store.data_dir(root, data.fingerprint)
    index = run(root, data)
    sizes = [store.read_marker(store.shard_path(folder, s)) for s, _ in index]
    assert [m["rows"] for m in sizes] == [2, 2, 1, 1]  # the 250-byte document gets a shard of its own
    assert all(m["bytes"] <= 100 for m in sizes[:3])


def test_int_limit_takes_first_rows_in_shard_order(root: Path, tmp_path: Path, docs_parquet: Path) -> None:
    head = write_jsonl(tmp_path / "head.jsonl", [{"doc": f"h{i}", "text": "h"} for i in range(5)])
    data = settings(head, docs_parquet, id_column="doc", shard_rows=4, limit=7)
    index = run(root, data)
    assert index == [("00000-0000", None), ("00000-0001", None), ("00001-0000", 2)]
    assert [r["id"] for r in rows(root, data, index)] == ["h0", "h1", "h2", "h3", "h4", "d0", "d1"]
    saved = json.loads((store.data_dir(root, "fp-test") / "index.json").read_text())
    assert saved["taken"] == 7
    assert read_index(root, data) == index
    assert read_index(root, settings(head, fingerprint="never-run")) is None


def test_fraction_limit_is_ceil_of_total_and_deterministic(root: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(30)])
    data = settings(path, shard_rows=2, limit=0.1)
    index = run(root, data)
    assert sum(take or 2 for _, take in index) == 3  # 0.1 x 30 is 3, not ceil(3.0000000000000004) = 4
    again = settings(path, shard_rows=2, limit=0.1, fingerprint="again")
    assert rows(root, data, index) == rows(root, again, run(root, again))
    assert [r["text"] for r in rows(root, data, index)] == ["t0", "t1", "t2"]


def test_same_input_gives_byte_identical_shards(tmp_path: Path, docs_parquet: Path) -> None:
    data = settings(docs_parquet, shard_rows=4, keep_columns=["score"])
    first, second = tmp_path / "one", tmp_path / "two"
    run(first, data)
    run(second, data)
    for shard in store.done_shards(store.data_dir(first, "fp-test")):
        name = store.shard_name(shard)
        assert (store.data_dir(first, "fp-test") / name).read_bytes() == (
            store.data_dir(second, "fp-test") / name
        ).read_bytes()


def test_rerun_skips_finished_tasks_and_redoes_unfinished(root: Path, tmp_path: Path, docs_parquet: Path) -> None:
    other = write_jsonl(tmp_path / "more.jsonl", [{"text": "m"}])
    data = settings(docs_parquet, other, shard_rows=4)
    tasks = list_tasks(data)
    run(root, data)
    folder = store.data_dir(root, data.fingerprint)
    first = store.marker_path(store.shard_path(folder, "00000-0000"))
    redo = store.marker_path(store.shard_path(folder, "00001-0000"))
    stamp = first.stat().st_mtime_ns
    redo.unlink()  # as if the run died between the shard's rename and its marker
    assert finished_shards(root, data, tasks[0]) == ["00000-0000", "00000-0001", "00000-0002"]
    assert finished_shards(root, data, tasks[1]) is None  # the orchestrator runs only this one again
    assert download_task(root, data, tasks[1]) == ["00001-0000"]
    assert first.stat().st_mtime_ns == stamp
    assert redo.is_file()


# -------------------------------------------------------------------------------------------------------- bad input


def test_missing_text_column_lists_the_columns(root: Path, docs_parquet: Path) -> None:
    message = source_error(root, settings(docs_parquet, text_column="body"))
    assert "docs.parquet" in message and "'body'" in message and "doc, text, score, url" in message


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"id_column": "key"}, "id_column 'key' is missing"),
        ({"keep_columns": ["lang"]}, "keep_columns 'lang' is missing"),
        ({"text_template": "{title}: {text}"}, "text_template names column 'title'"),
    ],
)
def test_missing_columns_are_named(root: Path, docs_parquet: Path, kw: dict[str, Any], expected: str) -> None:
    assert expected in source_error(root, settings(docs_parquet, **kw))


def test_missing_columns_in_json_records(root: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "k": 1}, {"body": "b"}])
    assert source_error(root, settings(path)) == f"{path}: line 2: no text column 'text' (columns: body)"
    assert f"{path}: line 1: id_column 'key' is missing" in source_error(root, settings(path, id_column="key"))
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a", "k": 1}, {"text": "b"}])
    message = source_error(root, settings(good, keep_columns=["lang"]))
    assert message == f"{good}: keep_columns 'lang' is missing from every record (columns: text, k)"


def test_numbers_as_text_name_the_row(root: Path, tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "fine"}, {"text": 42}])
    assert source_error(root, settings(jsonl)) == f"{jsonl}: line 3: column 'text' is int (42), not text"
    table = pa.table({"text": pa.array([None, 7], pa.int64())})
    parquet = write_parquet(tmp_path / "n.parquet", table)
    assert source_error(root, settings(parquet)) == f"{parquet}: row 2: column 'text' holds int64 values (7), not text"


def test_invalid_utf8_names_line_and_byte(root: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
    assert source_error(root, settings(jsonl)) == f"{jsonl}: line 2: invalid UTF-8 (byte offset 29 in the file)"
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"text\nfine\nbad \xfe\n")
    assert source_error(root, settings(csv_path)).startswith(f"{csv_path}: line 3: invalid UTF-8")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"fine\n\xc3")
    assert source_error(root, settings(folder)) == f"{folder}/a.txt: line 2: invalid UTF-8 (byte offset 5)"


def test_invalid_utf8_in_parquet_names_the_row(root: Path, tmp_path: Path) -> None:
    good = pa.array(["fine", "also fine"])
    payload = bytearray(good.buffers()[2].to_pybytes())
    payload[-1] = 0xFF
    bad = pa.Array.from_buffers(pa.string(), 2, [None, good.buffers()[1], pa.py_buffer(bytes(payload))])
    path = write_parquet(tmp_path / "bad.parquet", pa.table({"text": bad}))
    assert source_error(root, settings(path)).startswith(f"{path}: row 2: column 'text' is not valid UTF-8")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("broken.parquet", b"PAR1 not really", "not a readable parquet file"),
        ("broken.jsonl.gz", b"\x1f\x8b\x08\x00garbage", "cannot read after line"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "line 2: invalid JSON"),
        ("broken.json", b'{"a": [1, 2', "invalid JSON"),
        ("scalars.json", b"[1, 2]", "expected a JSON object, got int"),
        ("broken.pdf", b"%PDF-1.4\nnothing else", "unreadable PDF"),
        ("data.xlsx", b"PK", "unsupported file type"),
    ],
)
def test_unreadable_files_fail_with_one_line(
    root: Path, tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    message = source_error(root, settings(path))
    assert message.startswith(str(path)) and expected in message


def test_missing_file_is_named(root: Path, tmp_path: Path) -> None:
    assert source_error(root, settings(tmp_path / "gone.jsonl")) == f"{tmp_path / 'gone.jsonl'}: no such file or folder"


def test_empty_dataset_fails_at_finalize(root: Path, tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert source_error(root, settings(empty)) == f"dataset is empty: {empty} holds no rows"


def test_failed_task_leaves_no_finished_shard(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(6)] + [{"text": 1}])
    data = settings(path, shard_rows=2)
    monkeypatch.setattr(jsonl, "READ_BATCH_ROWS", 2)  # so shards are written before the bad line is read
    written: list[Path] = []
    real_write_shard = store.write_shard
    monkeypatch.setattr(store, "write_shard", lambda p, w: (written.append(p), real_write_shard(p, w))[1])
    with pytest.raises(SourceError, match="line 7"):
        download_task(root, data, list_tasks(data)[0])
    assert len(written) == 3
    folder = store.data_dir(root, data.fingerprint)
    assert store.done_shards(folder) == []
    assert not list(folder.iterdir())


# ------------------------------------------------------------------------------------------------------ Hub listing


def hub(
    monkeypatch: pytest.MonkeyPatch,
    branches: dict[str, tuple[str, list[str], dict[str, Any] | None]],
) -> list[tuple[str | None, str | None]]:
    """Fake the Hub: revision → (commit, file paths, card data). Returns the (revision, prefix) of each listing."""
    by_sha = {sha: files for sha, files, _ in branches.values()}
    listed: list[tuple[str | None, str | None]] = []

    def dataset_info(self: HfApi, repo_id: str, *, revision: str | None = None, **_: Any) -> DatasetInfo:
        sha, _files, card = branches[revision or "main"]
        return DatasetInfo(id=repo_id, sha=sha, cardData=card)

    def list_repo_tree(self: HfApi, repo_id: str, path_in_repo: str | None = None, **kw: Any) -> list[RepoFile]:
        listed.append((kw.get("revision"), path_in_repo))
        prefix = f"{path_in_repo}/" if path_in_repo else ""
        files = [p for p in by_sha[kw["revision"]] if p.startswith(prefix)]
        return [RepoFile(path=p, size=100 + i, oid="x") for i, p in enumerate(files)]

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(HfApi, "list_repo_tree", list_repo_tree)
    return listed


def hf(**kw: Any) -> DataSettings:
    return settings(**{"kind": "hf", "hf": "org/set", "files": (), **kw})


def test_hub_card_configs_select_native_parquet_pinned_to_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    card = {
        "configs": [
            {"config_name": "20231101.en", "data_files": [{"split": "train", "path": "20231101.en/train-*"}]},
            {"config_name": "20231101.fr", "data_files": [{"split": "train", "path": "20231101.fr/train-*"}]},
        ]
    }
    files = [
        "README.md",
        "20231101.en/train-00001-of-00002.parquet",
        "20231101.en/train-00000-of-00002.parquet",
        "20231101.fr/train-00000-of-00001.parquet",
    ]
    listed = hub(monkeypatch, {"main": ("c0ffee", files, card)})
    tasks = list_tasks(hf(config="20231101.en"))
    assert [t.source for t in tasks] == [
        "hf://datasets/org/set@c0ffee/20231101.en/train-00000-of-00002.parquet",
        "hf://datasets/org/set@c0ffee/20231101.en/train-00001-of-00002.parquet",
    ]
    assert [t.index for t in tasks] == [0, 1] and all(t.fmt == "parquet" and t.size for t in tasks)
    assert listed == [("c0ffee", "20231101.en")]
    assert "set dataset.config to one of: 20231101.en, 20231101.fr" in str(
        pytest.raises(SourceError, list_tasks, hf()).value
    )
    assert "has no split 'test'" in str(
        pytest.raises(SourceError, list_tasks, hf(config="20231101.fr", split="test")).value
    )


def test_hub_without_card_picks_split_by_file_names(monkeypatch: pytest.MonkeyPatch) -> None:
    files = [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test-00000-of-00001.parquet",
    ]
    hub(monkeypatch, {"main": ("abc", files, None)})
    assert [t.source.split("@abc/")[1] for t in list_tasks(hf())] == files[:2]
    assert [t.source.split("@abc/")[1] for t in list_tasks(hf(split="test"))] == files[2:]


def test_hub_falls_back_to_converted_parquet(monkeypatch: pytest.MonkeyPatch) -> None:
    converted = ["default/train/0000.parquet", "default/train/0001.parquet", "default/partial-test/0000.parquet"]
    hub(
        monkeypatch,
        {
            "main": ("abc", ["data/train.jsonl", "README.md"], None),
            "v1.0": ("abc", ["data/train.jsonl", "README.md"], None),
            "refs/convert/parquet": ("def", converted, None),
        },
    )
    tasks = list_tasks(hf())
    assert [t.source for t in tasks] == [
        "hf://datasets/org/set@def/default/train/0000.parquet",
        "hf://datasets/org/set@def/default/train/0001.parquet",
    ]
    assert "converted only part" in str(pytest.raises(SourceError, list_tasks, hf(split="test")).value)
    message = str(pytest.raises(SourceError, list_tasks, hf(revision="v1.0")).value)
    assert "no parquet files" in message


def test_hub_unreachable_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(SourceError) as info:
        list_tasks(hf(hf="wikimedia/wikipedia", config="20231101.en"))
    message = str(info.value)
    assert message.startswith("cannot list wikimedia/wikipedia on the Hugging Face Hub: network unreachable (")
    assert "\n" not in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in str(pytest.raises(SourceError, list_tasks, hf()).value)


def test_hub_task_downloads_to_local_disk_and_keeps_only_shards(
    root: Path, docs_parquet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str, str | None, Path]] = []

    def fake_download(repo_id: str, filename: str, *, revision: str | None, local_dir: Path, **_: Any) -> str:
        asked.append((repo_id, filename, revision, Path(local_dir)))
        return str(docs_parquet)

    monkeypatch.setattr(hub_source, "hf_hub_download", fake_download)
    data = hf(id_column="doc", text_column="missing")
    task = SourceTask(
        index=0,
        source="hf://datasets/org/set@refs%2Fconvert%2Fparquet/default/train/0000.parquet",
        fmt="parquet",
        size=None,
    )
    with pytest.raises(SourceError, match=r"^org/set/default/train/0000.parquet: no text column 'missing'"):
        download_task(root, data, task)
    assert asked[0][:3] == ("org/set", "default/train/0000.parquet", "refs/convert/parquet")
    assert not asked[0][3].is_relative_to(root)  # the raw file never reaches the volume (it is billed monthly)
    assert not asked[0][3].exists()  # and the local copy is gone once the task ends
    ok = hf(id_column="doc")
    assert download_task(root, ok, task) == ["00000-0000"]
    assert not asked[1][3].exists() and not (root / "cache").exists()


# --------------------------------------------------------------------------------------------------- unique ids


def test_duplicate_ids_within_and_across_files_fail_naming_file_and_row(root: Path, tmp_path: Path) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", [{"k": "a", "text": "x"}, {"k": "b", "text": "y"},
                                               {"k": "a", "text": "z"}])
    two = write_jsonl(tmp_path / "two.jsonl", [{"k": "c", "text": "x"}, {"k": "b", "text": "w"}])
    data = settings(one, two, id_column="k", shard_rows=2)
    message = source_error(root, data)
    assert message.startswith("2 id(s) occur more than once (id_column 'k'): ")
    assert "'a' at one.jsonl row 1 and one.jsonl row 3" in message
    assert "'b' at one.jsonl row 2 and two.jsonl row 2" in message
    assert read_index(root, data) is None  # nothing downstream sees the shards


def test_duplicate_ids_can_be_renamed_explicitly_and_the_index_says_so(root: Path, tmp_path: Path) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", [{"k": "a", "text": "x"}, {"k": "a", "text": "y"}])
    two = write_jsonl(tmp_path / "two.jsonl", [{"k": "a", "text": "z"}, {"k": "a#2x", "text": "w"}])
    data = settings(one, two, id_column="k", duplicate_ids="suffix")
    index = run(root, data)
    assert [r["id"] for r in rows(root, data, index)] == ["a", "a#2", "a#3", "a#2x"]
    recorded = store.read_json(store.data_index_path(store.data_dir(root, data.fingerprint)))
    assert recorded["renamed_ids"]["ids"] == 1 and recorded["renamed_ids"]["copies"] == 2


def test_default_row_ids_never_collide(root: Path, tmp_path: Path) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "same"}] * 3)
    two = write_jsonl(tmp_path / "two.jsonl", [{"text": "same"}] * 3)
    index = run(root, settings(one, two))
    assert len({r["id"] for r in rows(root, settings(one, two), index)}) == 6
