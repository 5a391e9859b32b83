"""Local sources: which files and folders a `files` dataset names, and their formats (from the file suffix)."""

from __future__ import annotations

from pathlib import Path

from volembed_runner.errors import SourceError

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


def file_format(path: Path) -> str:
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

