"""Download stage: read a dataset source (local files or the Hub's parquet) into bounded parquet shards.

`list_tasks` names one task per source file (a folder is one task), so the Modal app can map over them;
`download_task` streams one source into `shard-<task>-<part>.parquet` files (columns `id`, `text`, then the spec's
keep_columns), each written atomically and marked done, then a task marker listing them; `finalize` applies `limit`
in shard order and writes `index.json`, the shard list the chunk stage maps over.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import DatasetInfo, RepoFile

from volembed_runner import store
from volembed_runner.chunking import first_invalid_utf8, is_text_type
from volembed_runner.errors import SourceError, StageError
from volembed_runner.plan import DataSettings

MAX_SHARD_TEXT_BYTES = 128 * 2**20
READ_BATCH_ROWS = 1024
HUB_TIMEOUT_S = 10.0
CONVERTED_REVISION = "refs/convert/parquet"
HF_SCHEME = "hf://datasets/"
RESERVED_COLUMNS = ("id", "text")
FILE_FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".txt": "text",
    ".md": "text",
    ".pdf": "pdf",
}
COMPRESSIBLE = ("jsonl", "json", "csv")
DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf")
HUB_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".gz", ".zst", ".zip", ".xz")
OTHER_SPLITS = ("train", "validation", "valid", "dev", "test", "eval")


@dataclass(frozen=True)
class SourceTask:
    """One unit of download work: a source file (or folder) and its position in shard order."""

    index: int
    source: str  # a local path, or hf://datasets/<repo>@<commit>/<path in repo>
    fmt: str  # parquet | jsonl | json | csv | text | pdf
    size: int | None  # bytes, when known

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for Modal function inputs and worker processes."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceTask:
        """Inverse of `to_dict`."""
        size = d.get("size")
        return cls(int(d["index"]), str(d["source"]), str(d["fmt"]), None if size is None else int(size))


# ---------------------------------------------------------------------------------------------------------- listing


def list_tasks(data: DataSettings) -> list[SourceTask]:
    """The download tasks of a dataset, in shard order: one per local file or folder, or per Hub parquet file."""
    if data.kind == "hf":
        return _list_hf(data)
    if not data.files:
        raise SourceError("dataset.files lists no file")
    tasks = []
    for index, source in enumerate(data.files):
        path = Path(source)
        if not path.exists():
            raise SourceError(f"{source}: no such file or folder")
        if path.is_dir():
            docs = folder_documents(path)
            if not docs:
                raise SourceError(
                    f"{path}: folder holds no .txt, .md or .pdf file (for other files, list them by glob)"
                )
            fmt = "pdf" if all(p.suffix.lower() == ".pdf" for _, p in docs) else "text"
            size = sum(p.stat().st_size for _, p in docs)
        else:
            fmt, size = _file_format(path), path.stat().st_size
        tasks.append(SourceTask(index=index, source=source, fmt=fmt, size=size))
    return tasks


def _file_format(path: Path) -> str:
    """A source file's format from its suffix (`.gz` allowed on jsonl/json/csv)."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    fmt = FILE_FORMATS.get(Path(name[:-3] if gz else name).suffix)
    if fmt is None or (gz and fmt not in COMPRESSIBLE):
        raise SourceError(
            f"{path}: unsupported file type; expected .parquet, .jsonl, .json, .csv (each of the last three "
            ".gz-compressed or not), .txt, .md, .pdf, or a folder of .txt/.md/.pdf"
        )
    return fmt


def folder_documents(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every .txt/.md/.pdf under `folder`, hidden ones skipped, sorted by path."""
    docs = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if (
            path.is_file()
            and path.suffix.lower() in DOCUMENT_SUFFIXES
            and not any(part.startswith(".") for part in rel.parts)
        ):
            docs.append((rel.as_posix(), path))
    return sorted(docs)


# ------------------------------------------------------------------------------------------------------ Hub listing


def _list_hf(data: DataSettings) -> list[SourceTask]:
    """List the dataset's parquet files for config/split, pinned to one commit: native parquet, else auto-converted."""
    repo = data.hf
    if not repo:
        raise SourceError("dataset.hf is not set")
    api = HfApi()
    if data.revision == CONVERTED_REVISION:
        files, sha = _converted_parquet(api, data)
    else:
        info: DatasetInfo = _hub_call(
            repo, "list", lambda: api.dataset_info(repo, revision=data.revision, timeout=HUB_TIMEOUT_S), data.revision
        )
        native = _native_parquet(api, data, info)
        if native is not None:
            files, sha = native, info.sha or data.revision or "main"
        elif data.revision is not None:
            raise SourceError(
                f"{repo}: no parquet files for {_selection(data)} at revision '{data.revision}', and the Hub's "
                f"auto-converted parquet ({CONVERTED_REVISION}) follows the main branch only: drop dataset.revision "
                f"or set it to {CONVERTED_REVISION}"
            )
        else:
            files, sha = _converted_parquet(api, data)
    files = sorted(files, key=lambda f: f.path)
    return [
        SourceTask(index=i, source=_hf_uri(repo, sha, f.path), fmt="parquet", size=f.size) for i, f in enumerate(files)
    ]


def _native_parquet(api: HfApi, data: DataSettings, info: DatasetInfo) -> list[RepoFile] | None:
    """The repo's own parquet files for config/split (by its card's `configs`, else file names); None if it has none."""
    repo = str(data.hf)
    card = info.card_data.to_dict() if info.card_data is not None else {}
    configs = card.get("configs")
    if configs:
        prefix, patterns = _card_selection(configs, data)
    else:
        prefix, patterns = (data.config if data.config and data.config != "default" else ""), None
    files = [f for f in _tree(api, repo, info.sha or data.revision, prefix) if _is_data_file(f.path)]
    if patterns is not None:
        regexes = [_glob_regex(p) for p in patterns]
        matched = [f for f in files if any(r.match(f.path) for r in regexes)]
        if not matched:
            raise SourceError(f"{repo}: no file matches {', '.join(patterns)} ({_selection(data)}, from the card)")
    else:
        matched = _split_files(files, data.split)
        if not matched:
            return None
    parquet = [f for f in matched if f.path.endswith(".parquet")]
    return parquet or None


def _card_selection(configs: list[Any], data: DataSettings) -> tuple[str, list[str] | None]:
    """(folder to list, glob patterns) of config/split from a dataset card's `configs`; patterns None if unnamed."""
    repo = str(data.hf)
    by_name = {str(c.get("config_name", "default")): c for c in configs if isinstance(c, dict)}
    if data.config:
        cfg = by_name.get(data.config)
        if cfg is None:
            raise SourceError(f"{repo} has no config '{data.config}' (configs: {_names(by_name)})")
    else:
        defaults = [c for c in by_name.values() if c.get("default")]
        cfg = defaults[0] if defaults else by_name.get("default")
        if cfg is None and len(by_name) == 1:
            cfg = next(iter(by_name.values()))
        if cfg is None:
            raise SourceError(f"{repo} has several configs; set dataset.config to one of: {_names(by_name)}")
    data_dir = str(cfg.get("data_dir") or "").strip("/")
    data_files = cfg.get("data_files")
    if data_files is None:
        return data_dir, None
    splits = _card_splits(data_files)
    if data.split not in splits:
        name = cfg.get("config_name", "default")
        raise SourceError(f"{repo} config '{name}' has no split '{data.split}' (splits: {_names(splits)})")
    patterns = [f"{data_dir}/{p.lstrip('/')}" if data_dir else p.lstrip("/") for p in splits[data.split]]
    return _literal_prefix(patterns), patterns


def _card_splits(data_files: Any) -> dict[str, list[str]]:
    """A card's `data_files` (string, list of strings, list of {split, path}, or split → path) as split → patterns."""
    as_list = lambda v: [str(v)] if isinstance(v, str) else [str(x) for x in v]  # noqa: E731
    if isinstance(data_files, str) or (isinstance(data_files, list) and all(isinstance(x, str) for x in data_files)):
        return {"train": as_list(data_files)}
    if isinstance(data_files, dict):
        return {str(k): as_list(v) for k, v in data_files.items()}
    return {str(d.get("split", "train")): as_list(d.get("path", [])) for d in data_files if isinstance(d, dict)}


def _split_files(files: list[RepoFile], split: str) -> list[RepoFile]:
    """Files of `split` by the Hub's naming conventions (a `train/` folder, `train-0000.parquet`); unnamed → train."""
    matched = [f for f in files if _names_split(f.path, split)]
    if matched or split != "train":
        return matched
    return [] if any(_names_split(f.path, s) for f in files for s in OTHER_SPLITS) else files


def _names_split(path: str, split: str) -> bool:
    """True if a folder of `path` is, or a name in it starts with, `split` followed by a separator."""
    word = re.escape(split)
    *folders, base = path.split("/")
    return any(re.fullmatch(rf"(?:.*[-_.])?{word}(?:[-_.].*)?", d) for d in folders) or bool(
        re.match(rf"(?:.*[-_.])?{word}[-_.]", base)
    )


def _converted_parquet(api: HfApi, data: DataSettings) -> tuple[list[RepoFile], str]:
    """The Hub's auto-converted parquet (`refs/convert/parquet`: `<config>/<split>/0000.parquet`) and its commit."""
    repo = str(data.hf)
    info: DatasetInfo = _hub_call(
        repo,
        "list",
        lambda: api.dataset_info(repo, revision=CONVERTED_REVISION, timeout=HUB_TIMEOUT_S),
        CONVERTED_REVISION,
        missing_revision=f"{repo} has no parquet files and no auto-converted parquet ({CONVERTED_REVISION})",
    )
    sha = info.sha or CONVERTED_REVISION
    files = _tree(api, repo, sha, "")
    configs = sorted({f.path.split("/")[0] for f in files if "/" in f.path})
    config = data.config
    if not config:
        config = "default" if "default" in configs else (configs[0] if len(configs) == 1 else None)
        if config is None:
            raise SourceError(f"{repo} has several configs; set dataset.config to one of: {_names(configs)}")
    if config not in configs:
        raise SourceError(f"{repo} has no config '{config}' (configs: {_names(configs)})")
    in_config = [f for f in files if f.path.startswith(f"{config}/")]
    chosen = [f for f in in_config if f.path.startswith(f"{config}/{data.split}/") and f.path.endswith(".parquet")]
    if chosen:
        return chosen, sha
    splits = sorted({f.path.split("/")[1] for f in in_config if f.path.count("/") >= 2})
    if f"partial-{data.split}" in splits:
        raise SourceError(
            f"{repo}: the Hub converted only part of {_selection(data)} to parquet (partial-{data.split}); "
            "embedding it would silently drop rows: convert the dataset to parquet yourself and use dataset.files"
        )
    raise SourceError(f"{repo} config '{config}' has no split '{data.split}' (splits: {_names(splits)})")


def _tree(api: HfApi, repo: str, revision: str | None, prefix: str) -> list[RepoFile]:
    """Every file under `prefix` at `revision` (recursive); empty if the folder does not exist."""

    def files() -> list[RepoFile]:
        try:  # the listing is paged lazily: the requests run while it is consumed
            entries = api.list_repo_tree(
                repo, path_in_repo=prefix or None, recursive=True, revision=revision, repo_type="dataset"
            )
            return [e for e in entries if isinstance(e, RepoFile)]
        except RemoteEntryNotFoundError:
            return []

    return _hub_call(repo, "list", files, revision)


def _hub_call(
    repo: str, action: str, call: Callable[[], Any], revision: str | None, missing_revision: str | None = None
) -> Any:
    """Run one Hub request, turning any Hub or network failure into a one-line SourceError."""
    try:
        return call()
    except RevisionNotFoundError as exc:
        raise (SourceError(missing_revision) if missing_revision else _hub_error(repo, action, exc, revision)) from None
    except Exception as exc:
        if not _is_hub_failure(exc):
            raise
        raise _hub_error(repo, action, exc, revision) from None


def _is_network_error(exc: BaseException) -> bool:
    """True for transport failures (DNS, refused connection, timeout) of the HTTP client huggingface_hub uses."""
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")


def _is_hub_failure(exc: BaseException) -> bool:
    """True for the errors a Hub request raises: HTTP statuses, offline mode, network, timeout and disk errors."""
    return isinstance(exc, HfHubHTTPError | OfflineModeIsEnabled | OSError) or _is_network_error(exc)


def _hub_error(repo: str, action: str, exc: BaseException, revision: str | None) -> SourceError:
    """A one-line account of a failed Hub request, with what to do about it where that is known."""
    if isinstance(exc, OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE is set)"
    elif isinstance(exc, GatedRepoError):
        why = "the dataset is gated: accept its terms on the Hub and set HF_TOKEN"
    elif isinstance(exc, RepositoryNotFoundError):
        why = "no such dataset (if it is private, set HF_TOKEN)"
    elif isinstance(exc, RevisionNotFoundError):
        why = f"no revision '{revision}'"
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "error"
        why = f"HTTP {status} ({_first_line(exc)})"
    elif _is_network_error(exc) or isinstance(exc, TimeoutError | ConnectionError):
        why = f"network unreachable ({type(exc).__name__}: {_first_line(exc)})"
    else:
        why = f"{type(exc).__name__}: {_first_line(exc)}"
    return SourceError(f"cannot {action} {repo} on the Hugging Face Hub: {why}")


def _hf_uri(repo: str, revision: str, path: str) -> str:
    """`hf://datasets/<repo>@<revision>/<path>`, the revision URL-quoted (branches like refs/convert/parquet)."""
    return f"{HF_SCHEME}{repo}@{quote(revision, safe='')}/{path}"


def parse_hf_uri(uri: str) -> tuple[str, str, str]:
    """Inverse of `_hf_uri`: (repo, revision, path)."""
    repo, _, rest = uri[len(HF_SCHEME) :].partition("@")
    revision, _, path = rest.partition("/")
    if not repo or not revision or not path:
        raise SourceError(f"{uri}: not a hf://datasets/<repo>@<revision>/<path> source")
    return repo, unquote(revision), path


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A Hub data_files glob as a regex: `*` stays within a folder, `**` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _literal_prefix(patterns: list[str]) -> str:
    """The deepest folder shared by all patterns before any glob character (what to list on the Hub)."""
    heads = []
    for pattern in patterns:
        parts = pattern.split("/")[:-1]
        head = []
        for part in parts:
            if any(c in part for c in "*?["):
                break
            head.append(part)
        heads.append(head)
    common: list[str] = []
    for parts in zip(*heads, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common)


def _is_data_file(path: str) -> bool:
    """Files that may hold rows (not README.md, .gitattributes, loading scripts, images)."""
    name = path.rsplit("/", 1)[-1].lower()
    return not name.startswith(".") and name != "readme.md" and name.endswith(HUB_DATA_SUFFIXES)


def _selection(data: DataSettings) -> str:
    """Config and split, as error messages name them."""
    return f"config '{data.config or 'default'}', split '{data.split}'"


def _names(names: Iterable[str], most: int = 12) -> str:
    """A comma-separated list for a message, cut after `most` names."""
    names = list(names)
    more = f", … ({len(names) - most} more)" if len(names) > most else ""
    return (", ".join(names[:most]) or "none") + more


def _first_line(exc: BaseException | str) -> str:
    """The first line of an error, so every message stays on one line."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------------- the columns


@dataclass(frozen=True)
class Shape:
    """Which source columns become the shard's `id`, `text` and keep columns."""

    text_column: str | None
    template: str | None
    template_columns: tuple[str, ...]
    id_column: str | None
    keep_columns: tuple[str, ...]

    @classmethod
    def of(cls, data: DataSettings) -> Shape:
        """The shape a DataSettings asks for; keep columns may not shadow `id` or `text`."""
        clash = [c for c in data.keep_columns if c in RESERVED_COLUMNS]
        if clash:
            raise SourceError(f"dataset.keep_columns cannot include '{clash[0]}': shards have their own '{clash[0]}'")
        template_columns: tuple[str, ...] = ()
        if data.text_template:
            try:
                template_columns = _template_columns(data.text_template)
            except ValueError as exc:
                raise SourceError(f"dataset.text_template is not a valid template: {exc}") from None
        return cls(
            text_column=None if data.text_template else (data.text_column or "text"),
            template=data.text_template,
            template_columns=template_columns,
            id_column=data.id_column,
            keep_columns=tuple(data.keep_columns),
        )

    @property
    def needed(self) -> list[str]:
        """Source columns to read, in order, each once."""
        text = list(self.template_columns) if self.template else [str(self.text_column)]
        return list(dict.fromkeys([*text, *([self.id_column] if self.id_column else []), *self.keep_columns]))

    def check_columns(self, name: str, columns: list[str]) -> None:
        """Raise naming the first column the source lacks, and the columns it has."""
        have = f"(columns: {_names(columns, 30)})"
        if self.text_column is not None and self.text_column not in columns:
            raise SourceError(f"{name}: no text column '{self.text_column}' {have}")
        for c in self.template_columns:
            if c not in columns:
                raise SourceError(f"{name}: text_template names column '{c}', which is missing {have}")
        if self.id_column and self.id_column not in columns:
            raise SourceError(f"{name}: id_column '{self.id_column}' is missing {have}")
        for c in self.keep_columns:
            if c not in columns:
                raise SourceError(f"{name}: keep_columns '{c}' is missing {have}")


def _template_columns(template: str) -> tuple[str, ...]:
    """Top-level column names in a str.format template (`{meta.title}` and `{meta[0]}` use column `meta`)."""
    import string

    names = (re.split(r"[.\[]", field, maxsplit=1)[0] for _, field, _, _ in string.Formatter().parse(template) if field)
    return tuple(dict.fromkeys(n for n in names if n))


def _render(template: str, row: dict[str, Any], where: str) -> str:
    """Render the text template for one row; a null value renders as an empty string."""
    try:
        return template.format_map({k: "" if v is None else v for k, v in row.items()})
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise SourceError(f"{where}: text_template cannot be rendered ({type(exc).__name__}: {exc})") from None


def _short(value: Any) -> str:
    """A value for an error message, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------- arrow sources (parquet, csv)


def shape_batch(batch: pa.RecordBatch, shape: Shape, name: str, task: int, row0: int) -> pa.Table:
    """Source rows (a batch starting at 0-based row `row0`) → the shard's columns, with one-line errors by row."""
    n = batch.num_rows
    if shape.template:
        for c in shape.template_columns:
            _valid_strings(batch.column(c), name, c, row0)
        rows = batch.select(list(shape.template_columns)).to_pylist()
        text = pa.array(
            [_render(shape.template, r, f"{name}: row {row0 + i + 1}") for i, r in enumerate(rows)], pa.string()
        )
    else:
        text = _text_array(batch.column(str(shape.text_column)), name, str(shape.text_column), row0)
    if shape.id_column:
        ids = _id_array(batch.column(shape.id_column), name, shape.id_column, row0)
    else:
        ids = pa.array([f"{task}:{row0 + i}" for i in range(n)], pa.string())
    columns = {"id": ids, "text": text} | {c: batch.column(c) for c in shape.keep_columns}
    return pa.table(columns)


def _decoded(arr: pa.Array) -> pa.Array:
    """Dictionary-encoded columns (common in parquet) as plain arrays."""
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _first_valid(arr: pa.Array) -> tuple[int, Any]:
    """Index and value of the first non-null element, to name an offending row."""
    for i in range(len(arr)):
        if arr[i].is_valid:
            return i, arr[i].as_py()
    return 0, None


def _valid_strings(arr: pa.Array, name: str, column: str, row0: int) -> None:
    """Raise naming the first row whose string is not valid UTF-8 (parquet does not check on read)."""
    arr = _decoded(arr)
    if not is_text_type(arr.type):
        return
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        bad = first_invalid_utf8(arr)
        if bad is None:
            raise SourceError(f"{name}: column '{column}' near row {row0 + 1} is not valid UTF-8") from None
        i, exc = bad
        raise SourceError(
            f"{name}: row {row0 + i + 1}: column '{column}' is not valid UTF-8 (byte {exc.start})"
        ) from None


def _text_array(arr: pa.Array, name: str, column: str, row0: int) -> pa.Array:
    """The text column as strings (null → empty document); anything but text raises naming a row."""
    arr = _decoded(arr)
    if pa.types.is_null(arr.type):
        return pa.array([""] * len(arr), pa.string())
    if not is_text_type(arr.type):
        i, value = _first_valid(arr)
        raise SourceError(
            f"{name}: row {row0 + i + 1}: column '{column}' holds {arr.type} values ({_short(value)}), not text"
        )
    _valid_strings(arr, name, column, row0)
    return pc.fill_null(arr.cast(pa.string()), "")


def _id_array(arr: pa.Array, name: str, column: str, row0: int) -> pa.Array:
    """The id column as strings: text or integers, never null."""
    arr = _decoded(arr)
    if arr.null_count:
        i = pc.index(pc.is_null(arr), True).as_py()
        raise SourceError(f"{name}: row {row0 + i + 1}: id column '{column}' is null")
    if is_text_type(arr.type):
        _valid_strings(arr, name, column, row0)
    elif not pa.types.is_integer(arr.type):
        raise SourceError(f"{name}: id column '{column}' holds {arr.type} values; ids must be text or integers")
    return arr.cast(pa.string())


def guarded(batches: Iterator[pa.RecordBatch], on_error: Callable[[Exception, int], SourceError]) -> Iterator[Any]:
    """Yield (0-based first row, batch), turning a read failure into a SourceError that says where it happened."""
    row0 = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, EOFError, zlib.error, ValueError) as exc:
            raise on_error(exc, row0) from None
        yield row0, batch
        row0 += batch.num_rows


def _read_parquet(path: Path, name: str, shape: Shape, task: int) -> Generator[pa.Table, None, None]:
    """Stream a parquet file batch by batch (row groups are never loaded whole), only the columns needed."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{name}: not a readable parquet file ({_first_line(exc)})") from None
    shape.check_columns(name, pf.schema_arrow.names)
    batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=shape.needed, use_threads=False)
    on_error = lambda exc, row0: SourceError(  # noqa: E731
        f"{name}: corrupt parquet data after row {row0} ({_first_line(exc)})"
    )
    for row0, batch in guarded(batches, on_error):
        yield shape_batch(batch, shape, name, task, row0)


def _read_csv(path: Path, name: str, shape: Shape, task: int, gz: bool) -> Generator[pa.Table, None, None]:
    """Stream a CSV file (header row; quoted fields may span lines); the columns used are read as text."""
    needed = shape.needed

    def on_error(exc: Exception, row0: int) -> SourceError:
        if "UTF8" in str(exc):
            bad = _find_bad_utf8(path, name, gz)
            if bad is not None:
                return bad
        return SourceError(f"{name}: cannot read CSV after row {row0} ({_first_line(exc)})")

    try:
        stream = pa.input_stream(str(path), compression="gzip" if gz else None)
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(block_size=8 << 20),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in needed}),
        )
    except (pa.ArrowException, OSError, EOFError, zlib.error) as exc:
        raise on_error(exc, 0) from None
    shape.check_columns(name, reader.schema.names)
    for row0, batch in guarded(iter(reader), on_error):
        yield shape_batch(batch.select(needed), shape, name, task, row0)


def _find_bad_utf8(path: Path, name: str, gz: bool) -> SourceError | None:
    """The error naming the line and byte offset of the file's first invalid UTF-8; None if there is none."""
    try:
        with _open_binary(path, gz) as fh:
            for _ in _utf8_lines(fh, name):
                pass
    except SourceError as exc:
        return exc
    return None


def _utf8_lines(fh: Any, name: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a binary file; invalid UTF-8 raises naming the line and its byte offset."""
    offset = 0
    for lineno, raw in enumerate(fh, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            at = offset + exc.start
            raise SourceError(f"{name}: line {lineno}: invalid UTF-8 (byte offset {at} in the file)") from None
        offset += len(raw)
        yield lineno, line


def _decode_utf8(raw: bytes, where: str) -> str:
    """A whole file's bytes as text; invalid UTF-8 raises naming the line and byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SourceError(f"{where}: line {line}: invalid UTF-8 (byte offset {exc.start})") from None


def _open_binary(path: Path, gz: bool) -> Any:
    """A binary file object, gunzipping on the fly when `gz`."""
    return gzip.open(path, "rb") if gz else open(path, "rb")


# ------------------------------------------------------------------------------ record sources (json, jsonl, folders)


@dataclass
class _Records:
    """Accumulates parsed records and turns them into shard-column tables, checking each one."""

    shape: Shape
    name: str
    ids: list[str]
    texts: list[str]
    keep: dict[str, list[Any]]
    seen_keep: set[str]
    first_columns: list[str] | None = None
    rows: int = 0

    @classmethod
    def start(cls, shape: Shape, name: str) -> _Records:
        """An empty accumulator for the source `name`."""
        return cls(shape, name, [], [], {c: [] for c in shape.keep_columns}, set())

    def add(self, record: Any, default_id: str, where: str) -> None:
        """Check one record and add its id, text and keep values; `where` names it in errors."""
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__} ({_short(record)})")
        if self.first_columns is None:
            self.first_columns = list(record)
        shape = self.shape
        if shape.template:
            for c in shape.template_columns:
                if c not in record:
                    raise SourceError(
                        f"{where}: text_template names column '{c}', which is missing (columns: {_names(record)})"
                    )
            text = _render(shape.template, {c: record[c] for c in shape.template_columns}, where)
        else:
            column = str(shape.text_column)
            if column not in record:
                raise SourceError(f"{where}: no text column '{column}' (columns: {_names(record)})")
            value = record[column]
            if value is not None and not isinstance(value, str):
                raise SourceError(f"{where}: column '{column}' is {type(value).__name__} ({_short(value)}), not text")
            text = value or ""
        self.texts.append(text)
        self.ids.append(_record_id(record, shape.id_column, default_id, where))
        for c in shape.keep_columns:
            if c in record:
                self.seen_keep.add(c)
            self.keep[c].append(record.get(c))
        self.rows += 1

    def __len__(self) -> int:
        """Records waiting to be taken."""
        return len(self.ids)

    def take(self) -> pa.Table:
        """The accumulated records as a table; the accumulator starts over."""
        try:
            columns = {"id": pa.array(self.ids, pa.string()), "text": pa.array(self.texts, pa.string())}
        except (pa.ArrowException, UnicodeEncodeError) as exc:
            raise SourceError(f"{self.name}: text is not valid Unicode ({_first_line(exc)})") from None
        for c, values in self.keep.items():
            try:
                columns[c] = pa.array(values)
            except (pa.ArrowException, TypeError, OverflowError, UnicodeEncodeError) as exc:
                raise SourceError(f"{self.name}: keep column '{c}' mixes value types ({_first_line(exc)})") from None
        self.ids, self.texts, self.keep = [], [], {c: [] for c in self.shape.keep_columns}
        return pa.table(columns)

    def check_keep(self) -> None:
        """After the whole source: a keep column no record had is an error, not a column of nulls."""
        if self.rows:
            for c in self.shape.keep_columns:
                if c not in self.seen_keep:
                    have = _names(self.first_columns or [], 30)
                    raise SourceError(f"{self.name}: keep_columns '{c}' is missing from every record (columns: {have})")


def _record_id(record: dict[str, Any], column: str | None, default: str, where: str) -> str:
    """A record's id: its id column (text or integer), else the default (row id, mapping key, file path)."""
    if not column:
        return default
    if column not in record:
        raise SourceError(f"{where}: id_column '{column}' is missing (columns: {_names(record)})")
    value = record[column]
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = type(value).__name__
    raise SourceError(f"{where}: id column '{column}' is {kind} ({_short(value)}); ids are text or integers")


def _read_jsonl(path: Path, name: str, shape: Shape, task: int, gz: bool) -> Generator[pa.Table, None, None]:
    """Stream JSON lines (one object per line; blank lines skipped), one block of records at a time."""
    records = _Records.start(shape, name)
    lineno = 0
    try:
        with _open_binary(path, gz) as fh:
            for lineno, line in _utf8_lines(fh, name):
                if not line.strip():
                    continue
                where = f"{name}: line {lineno}"
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise SourceError(f"{where}: invalid JSON ({exc})") from None
                records.add(record, f"{task}:{records.rows}", where)
                if len(records) >= READ_BATCH_ROWS:
                    yield records.take()
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{name}: cannot read after line {lineno} ({_first_line(exc)})") from None
    if len(records):
        yield records.take()
    records.check_keep()


def _read_json(path: Path, name: str, shape: Shape, task: int, gz: bool) -> Generator[pa.Table, None, None]:
    """A JSON list of records, an object mapping key → record (the key is the default id), or one record."""
    try:
        with _open_binary(path, gz) as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{name}: cannot read ({_first_line(exc)})") from None
    text = _decode_utf8(raw, name)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if _looks_like_jsonl(text):
            yield from _read_jsonl(path, name, shape, task, gz)
            return
        raise SourceError(f"{name}: invalid JSON ({exc})") from None
    del raw, text
    if isinstance(obj, list):
        items: Iterable[tuple[str, str, Any]] = (
            (f"{task}:{i}", f"{name}: record {i + 1}", rec) for i, rec in enumerate(obj)
        )
    elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        items = ((str(k), f"{name}: key '{k}'", rec) for k, rec in obj.items())
    elif isinstance(obj, dict):
        items = [(f"{task}:0", name, obj)]  # one object that is not a mapping of records: a single record
    else:
        raise SourceError(f"{name}: expected a list of records or an object mapping keys to records")
    records = _Records.start(shape, name)
    for default_id, where, record in items:
        records.add(record, default_id, where)
        if len(records) >= READ_BATCH_ROWS:
            yield records.take()
    if len(records):
        yield records.take()
    records.check_keep()


def _looks_like_jsonl(text: str) -> bool:
    """A `.json` file that is really JSON lines: its first line alone is a JSON object."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(orjson.loads(first), dict)
    except orjson.JSONDecodeError:
        return False


def _read_documents(path: Path, name: str, shape: Shape) -> Generator[pa.Table, None, None]:
    """One document per .txt/.md/.pdf file (a folder, or one file): columns `path` (relative) and `text`."""
    docs = folder_documents(path) if path.is_dir() else [(path.name, path)]
    shape.check_columns(name, ["path", "text"])
    records = _Records.start(shape, name)
    chars = 0  # characters in `records`
    for rel, doc in docs:
        where = f"{name}/{rel}" if path.is_dir() else name
        text = _pdf_text(doc, where) if doc.suffix.lower() == ".pdf" else _plain_text(doc, where)
        records.add({"path": rel, "text": text}, rel, where)
        chars += len(text)
        if len(records) >= READ_BATCH_ROWS or chars > MAX_SHARD_TEXT_BYTES // 4:
            yield records.take()
            chars = 0
    if len(records):
        yield records.take()


def _plain_text(path: Path, where: str) -> str:
    """A text document's content as UTF-8 (a leading BOM dropped); invalid bytes raise naming line and offset."""
    return _decode_utf8(path.read_bytes(), where).removeprefix("\ufeff")


def _pdf_text(path: Path, where: str) -> str:
    """The text of every page, joined by blank lines (pypdf; no OCR: scanned pages give no text)."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise SourceError(f"{where}: the PDF is encrypted")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except SourceError:
        raise
    except Exception as exc:  # pypdf raises many kinds of errors on a damaged file
        raise SourceError(f"{where}: unreadable PDF ({type(exc).__name__}: {_first_line(exc)})") from None


# ---------------------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Cuts a stream of shaped tables into shards of at most `max_rows` rows and about `max_bytes` of text."""

    def __init__(self, folder: Path, task: int, max_rows: int, max_bytes: int) -> None:
        self.folder, self.task, self.max_rows, self.max_bytes = folder, task, max_rows, max_bytes
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.bytes = 0
        self.written: list[str] = []

    def add(self, table: pa.Table) -> None:
        """Append rows, writing a shard each time the row or byte bound is reached."""
        while table.num_rows:
            sizes = pc.cumulative_sum(pc.binary_length(table.column("text")).cast(pa.int64()))
            fit = pc.sum(pc.less_equal(sizes, self.max_bytes - self.bytes)).as_py() or 0
            n = min(self.max_rows - self.rows, fit)
            if n == 0 and self.rows == 0:
                n = 1  # one document larger than the byte bound gets a shard of its own
            if n == 0:
                self.flush()
                continue
            self.pending.append(table.slice(0, n))
            self.rows += n
            self.bytes += sizes[n - 1].as_py()
            table = table.slice(n)
            if table.num_rows or self.rows >= self.max_rows:
                self.flush()

    def flush(self) -> None:
        """Write the pending rows as the next shard of the task (tmp file, rename, done-marker)."""
        if not self.pending:
            return
        try:
            table = pa.concat_tables(self.pending, promote_options="permissive").combine_chunks()
        except (pa.ArrowException, TypeError) as exc:
            raise SourceError(f"task {self.task}: keep columns change type between rows ({_first_line(exc)})") from None
        shard = f"{self.task:05d}-{len(self.written):04d}"
        stats = {"rows": table.num_rows, "bytes": self.bytes}

        def write(tmp: Path) -> dict[str, Any]:
            pq.write_table(table, tmp, compression="zstd")
            return stats

        store.write_shard(store.shard_path(self.folder, shard), write)
        self.written.append(shard)
        self.pending, self.rows, self.bytes = [], 0, 0

    def discard(self) -> None:
        """Remove what this attempt wrote, so a failed task leaves nothing that looks finished."""
        for shard in self.written:
            path = store.shard_path(self.folder, shard)
            store.clear_done(path)
            path.unlink(missing_ok=True)


def _finished_shards(folder: Path, index: int) -> list[str] | None:
    """The task's shard ids if its marker exists and every shard is done; None if the task must run."""
    marker = store.read_json(store.task_marker_path(folder, index))
    if marker is None:
        return None
    shards = [str(s) for s in marker.get("shards", [])]
    return shards if all(store.is_done(store.shard_path(folder, s)) for s in shards) else None


def _clear_task(folder: Path, index: int) -> None:
    """Forget an unfinished earlier attempt of a task: its marker, then its shards' markers and files."""
    store.task_marker_path(folder, index).unlink(missing_ok=True)
    for path in folder.glob(f"shard-{index:05d}-*.parquet"):
        store.clear_done(path)
        path.unlink(missing_ok=True)
    for tmp in folder.glob(f".shard-{index:05d}-*.tmp"):  # left by a killed writer (one writer per task)
        tmp.unlink(missing_ok=True)


def read_task(root: Path, data: DataSettings, task: SourceTask, shape: Shape) -> Generator[pa.Table, None, None]:
    """The shaped tables of one source, in order."""
    if task.source.startswith(HF_SCHEME):
        repo, revision, path_in_repo = parse_hf_uri(task.source)
        local = _hub_call(
            repo,
            "download",
            lambda: hf_hub_download(
                repo,
                path_in_repo,
                repo_type="dataset",
                revision=revision,
                local_dir=root / "cache" / "hf" / repo / revision,
            ),
            revision,
        )
        return _read_parquet(Path(local), f"{repo}/{path_in_repo}", shape, task.index)
    path, name = Path(task.source), task.source
    if not path.exists():
        raise SourceError(f"{name}: no such file or folder")
    gz = path.name.lower().endswith(".gz")
    match task.fmt:
        case "parquet":
            return _read_parquet(path, name, shape, task.index)
        case "jsonl":
            return _read_jsonl(path, name, shape, task.index, gz)
        case "json":
            return _read_json(path, name, shape, task.index, gz)
        case "csv":
            return _read_csv(path, name, shape, task.index, gz)
        case "text" | "pdf":
            return _read_documents(path, name, shape)
    raise SourceError(f"{name}: unknown source format '{task.fmt}'")


def download_task(root: Path, data: DataSettings, task: SourceTask) -> list[str]:
    """Read one source into done-marked shards `<task>-<part>`; a finished task is skipped. Returns its shard ids."""
    folder = store.data_dir(root, data.fingerprint)
    done = _finished_shards(folder, task.index)
    if done is not None:
        return done
    shape = Shape.of(data)
    _clear_task(folder, task.index)
    writer = _ShardWriter(folder, task.index, data.shard_rows, MAX_SHARD_TEXT_BYTES)
    # With a row-count limit no task can contribute more than `limit` rows to the first N, so it stops there.
    cap = data.limit if isinstance(data.limit, int) else None
    tables = read_task(root, data, task, shape)
    read = 0
    try:
        for table in tables:
            if cap is not None:
                table = table.slice(0, max(0, cap - read))
            writer.add(table)
            read += table.num_rows
            if cap is not None and read >= cap:
                break
        writer.flush()
    except BaseException:
        writer.discard()
        raise
    finally:
        tables.close()  # a source left early (limit) releases its file now
    record = {"source": task.source, "shards": writer.written}
    store.write_json_atomic(store.task_marker_path(folder, task.index), record)
    return list(writer.written)


# ------------------------------------------------------------------------------------------------------- finalizing


def finalize(root: Path, data: DataSettings, tasks: list[SourceTask]) -> list[tuple[str, int | None]]:
    """Apply `limit` in shard order and write `index.json`: (shard id, rows to take or None for all) per shard used.

    `rows` in the index counts rows downloaded: with an integer limit each task stops after `limit` rows.
    """
    folder = store.data_dir(root, data.fingerprint)
    shards: list[tuple[str, int]] = []
    for task in sorted(tasks, key=lambda t: t.index):
        ids = _finished_shards(folder, task.index)
        if ids is None:
            raise StageError(f"download of {task.source} did not finish; rerun to resume")
        shards.extend((s, int(store.read_marker(store.shard_path(folder, s))["rows"])) for s in ids)
    total = sum(rows for _, rows in shards)
    if total == 0:
        raise SourceError(f"dataset is empty: {_describe(data)} holds no rows")
    wanted = limit_rows(data.limit, total)
    entries, left = [], wanted
    for shard, rows in shards:
        if left == 0:
            break
        take = min(rows, left)
        entries.append({"id": shard, "rows": rows, "take": take})
        left -= take
    store.write_json_atomic(store.data_index_path(folder), {"shards": entries, "rows": total, "taken": wanted})
    return _index_list(entries)


def read_index(root: Path, data: DataSettings) -> list[tuple[str, int | None]] | None:
    """The shard list `finalize` wrote for this data fingerprint, or None before the download finished."""
    index = store.read_json(store.data_index_path(store.data_dir(root, data.fingerprint)))
    return None if index is None else _index_list(index["shards"])


def _index_list(entries: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    """Index entries as (shard id, rows to take, None when the whole shard is used)."""
    return [(e["id"], e["take"] if e["take"] < e["rows"] else None) for e in entries]


def limit_rows(limit: int | float | None, total: int) -> int:
    """Rows kept: all, the first N, or ceil(fraction × total), computed in decimal so 0.1 × 30 is exactly 3."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return min(total, max(1, math.ceil(Decimal(repr(limit)) * total)))
    return min(total, int(limit))


def _describe(data: DataSettings) -> str:
    """The dataset as an error message names it."""
    if data.kind == "hf":
        return f"{data.hf} ({_selection(data)})"
    first = data.files[0] if data.files else "(none)"
    return first if len(data.files) == 1 else f"{len(data.files)} files ({first}, …)"
