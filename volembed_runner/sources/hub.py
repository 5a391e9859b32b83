"""Hub sources: a dataset's parquet files for one config and split, pinned to one commit, and their download.

A repo's own parquet files are found from its card's `configs`, else the Hub's file-naming conventions; without any,
the Hub's auto-converted parquet (`refs/convert/parquet`). Every Hub or network failure becomes a one-line
SourceError saying what to do about it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

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

from volembed_runner.errors import SourceError, first_line, name_list

if TYPE_CHECKING:
    from volembed_runner.plan import DataSettings

HUB_TIMEOUT_S = 10.0
CONVERTED_REVISION = "refs/convert/parquet"
HF_SCHEME = "hf://datasets/"
HUB_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".gz", ".zst", ".zip", ".xz")
OTHER_SPLITS = ("train", "validation", "valid", "dev", "test", "eval")


def list_hf(data: DataSettings) -> list[tuple[str, int | None]]:
    """The dataset's parquet files for config/split as (`hf://` URI, bytes), sorted, pinned to one commit: its own
    parquet files, else the Hub's auto-converted ones."""
    repo = data.hf
    if not repo:
        raise SourceError("dataset.hf is not set")
    api = HfApi()
    if data.revision == CONVERTED_REVISION:
        files, sha = _converted_parquet(api, data)
    else:
        info: DatasetInfo = hub_call(
            repo, "list", lambda: api.dataset_info(repo, revision=data.revision, timeout=HUB_TIMEOUT_S), data.revision
        )
        native = _native_parquet(api, data, info)
        if native is not None:
            files, sha = native, info.sha or data.revision or "main"
        elif data.revision is not None:
            raise SourceError(
                f"{repo}: no parquet files for {selection(data)} at revision '{data.revision}', and the Hub's "
                f"auto-converted parquet ({CONVERTED_REVISION}) follows the main branch only: drop dataset.revision "
                f"or set it to {CONVERTED_REVISION}"
            )
        else:
            files, sha = _converted_parquet(api, data)
    files = sorted(files, key=lambda f: f.path)
    return [(hf_uri(repo, sha, f.path), f.size) for f in files]


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
            raise SourceError(f"{repo}: no file matches {', '.join(patterns)} ({selection(data)}, from the card)")
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
            raise SourceError(f"{repo} has no config '{data.config}' (configs: {name_list(by_name)})")
    else:
        defaults = [c for c in by_name.values() if c.get("default")]
        cfg = defaults[0] if defaults else by_name.get("default")
        if cfg is None and len(by_name) == 1:
            cfg = next(iter(by_name.values()))
        if cfg is None:
            raise SourceError(f"{repo} has several configs; set dataset.config to one of: {name_list(by_name)}")
    data_dir = str(cfg.get("data_dir") or "").strip("/")
    data_files = cfg.get("data_files")
    if data_files is None:
        return data_dir, None
    splits = _card_splits(data_files)
    if data.split not in splits:
        name = cfg.get("config_name", "default")
        raise SourceError(f"{repo} config '{name}' has no split '{data.split}' (splits: {name_list(splits)})")
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
    info: DatasetInfo = hub_call(
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
            raise SourceError(f"{repo} has several configs; set dataset.config to one of: {name_list(configs)}")
    if config not in configs:
        raise SourceError(f"{repo} has no config '{config}' (configs: {name_list(configs)})")
    in_config = [f for f in files if f.path.startswith(f"{config}/")]
    chosen = [f for f in in_config if f.path.startswith(f"{config}/{data.split}/") and f.path.endswith(".parquet")]
    if chosen:
        return chosen, sha
    splits = sorted({f.path.split("/")[1] for f in in_config if f.path.count("/") >= 2})
    if f"partial-{data.split}" in splits:
        raise SourceError(
            f"{repo}: the Hub converted only part of {selection(data)} to parquet (partial-{data.split}); "
            "embedding it would silently drop rows: convert the dataset to parquet yourself and use dataset.files"
        )
    raise SourceError(f"{repo} config '{config}' has no split '{data.split}' (splits: {name_list(splits)})")


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

    return hub_call(repo, "list", files, revision)


def hub_call(
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
        why = f"HTTP {status} ({first_line(exc)})"
    elif _is_network_error(exc) or isinstance(exc, TimeoutError | ConnectionError):
        why = f"network unreachable ({type(exc).__name__}: {first_line(exc)})"
    else:
        why = f"{type(exc).__name__}: {first_line(exc)}"
    return SourceError(f"cannot {action} {repo} on the Hugging Face Hub: {why}")


def hf_uri(repo: str, revision: str, path: str) -> str:
    """`hf://datasets/<repo>@<revision>/<path>`, the revision URL-quoted (branches like refs/convert/parquet)."""
    return f"{HF_SCHEME}{repo}@{quote(revision, safe='')}/{path}"


def parse_hf_uri(uri: str) -> tuple[str, str, str]:
    """Inverse of `hf_uri`: (repo, revision, path)."""
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


def selection(data: DataSettings) -> str:
    """Config and split, as error messages name them."""
    return f"config '{data.config or 'default'}', split '{data.split}'"


def download_file(uri: str, folder: Path) -> Path:
    """Download one Hub source file (an `hf://` URI) into `folder`; returns the local path."""
    repo, revision, path_in_repo = parse_hf_uri(uri)
    local = hub_call(
        repo,
        "download",
        lambda: hf_hub_download(repo, path_in_repo, repo_type="dataset", revision=revision, local_dir=folder),
        revision,
    )
    return Path(local)
