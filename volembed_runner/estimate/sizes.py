"""What is known of a dataset before chunking, without downloading it: rows, text bytes, files and a sample.

Local files: parquet footers and cheap counts, then the first rows in shard order. Hub datasets: the listing and
parquet footers within a bounded time. Else the spec's `num_rows` / `num_bytes` hints.
"""

from __future__ import annotations

import gzip
import math
import os
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from volembed_runner import catalog, sources
from volembed_runner.errors import SourceError, VolembedError
from volembed_runner.estimate.sampling import (
    RATIO_UNCERTAINTY,
    SAMPLE_BATCH,
    Z95,
    CountingTokenizer,
    Sample,
    bytes_per_token,
    mean_sd,
    sample_texts,
)
from volembed_runner.plan import Plan
from volembed_runner.sources import Shape, SourceTask
from volembed_runner.sources.files import folder_documents
from volembed_runner.sources.hub import parse_hf_uri
from volembed_runner.sources.shape import guarded, shape_batch

COUNT_CAP_BYTES = 64 * 2**20  # a local file is read whole to count its rows only up to this size
HUB_TIMEOUT_S = 10.0  # all Hub metadata requests of one estimate together


@dataclass
class Sizes:
    """What is known about the dataset before chunking: rows, text bytes, source files, and a sample."""

    rows: float | None = None  # documents after `limit`
    rows_exact: bool = False
    total_rows: float | None = None  # before `limit`
    text_bytes: float | None = None  # UTF-8 bytes of the texts after `limit`
    files: int | None = None  # download tasks (one per source file)
    download_bytes: float | None = None  # bytes a download stage reads
    remote: bool = False  # the source is on the Hub
    sample: Sample | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def set_rows(plan: Plan, sizes: Sizes, total: float) -> str:
    """Record `total` rows and the rows `dataset.limit` keeps of them; returns the limit's note (or "")."""
    sizes.total_rows = total
    if plan.data.limit is None:
        sizes.rows = total
        return ""
    sizes.rows = float(sources.limit_rows(plan.data.limit, int(total)))
    return f", limit {plan.data.limit} → {sizes.rows:,.0f}"


def _count_local_rows(task: SourceTask, shape: Shape) -> tuple[int | None, bool, str | None]:
    """Rows of one local source without loading it: a parquet footer, a line count, a folder's file count."""
    path = Path(task.source)
    if task.fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows, True, None
    if path.is_dir():
        return len(folder_documents(path)), True, None
    if task.fmt in ("text", "pdf"):
        return 1, True, None
    size = path.stat().st_size
    if size <= COUNT_CAP_BYTES:
        rows = sum(t.num_rows for t in sources.read_task(task, shape))
        return rows, True, None
    if task.fmt == "jsonl":
        return _count_lines(path), False, f"{path.name}: rows extrapolated from its first {COUNT_CAP_BYTES >> 20} MiB"
    return None, False, f"{path.name}: over {COUNT_CAP_BYTES >> 20} MiB, rows not counted in a dry run " \
                        "(set dataset.num_rows, or use parquet/jsonl)"


def _count_lines(path: Path) -> int:
    """Non-blank lines in the first COUNT_CAP_BYTES (decompressed), scaled to the whole file by bytes read."""
    raw = path.open("rb")
    with raw, (gzip.open(raw, "rb") if path.name.lower().endswith(".gz") else raw) as fh:
        lines = read = 0
        for line in fh:
            read += len(line)
            lines += bool(line.strip())
            if read >= COUNT_CAP_BYTES:
                return round(lines * path.stat().st_size / max(1, raw.tell()))
    return lines


def local_sizes(plan: Plan, tok: CountingTokenizer | None, sample_cap: int) -> Sizes:
    """Rows from footers and counts, texts sampled from the first rows of the files in shard order."""
    data = plan.data
    sizes = Sizes()
    try:
        shape = Shape.of(data)
        tasks = sources.list_tasks(data)
        counts = [_count_local_rows(t, shape) for t in tasks]
    except (VolembedError, OSError, ValueError) as exc:
        sizes.notes.append(f"could not read the local files: {exc}")
        sizes.warnings.append(f"dataset files unreadable ({exc}); the run will fail the same way")
        return sizes
    sizes.files = len(tasks)
    sizes.download_bytes = float(sum(t.size or 0 for t in tasks))
    sizes.notes.extend(note for _, _, note in counts if note)
    known = [rows for rows, _, _ in counts]
    if all(r is not None for r in known):
        total = float(sum(r for r in known if r is not None))
        limit = set_rows(plan, sizes, total)
        sizes.rows_exact = all(exact for _, exact, _ in counts)
        how = "parquet footers / counted rows" if sizes.rows_exact else "counted and extrapolated rows"
        sizes.notes.append(f"documents: {total:,.0f} rows in {len(tasks)} local source(s) ({how}){limit}")
    if tok is None:
        _measure_bytes(plan, sizes, tasks, counts, shape, sample_cap)
        return sizes
    # The sampled population is the first `limit` rows in shard order, exactly what the download stage keeps.
    int_limit = data.limit if isinstance(data.limit, int) and not isinstance(data.limit, bool) else None
    wanted = sizes.rows if sizes.rows is not None else int_limit
    unknown_fraction = sizes.rows is None and isinstance(data.limit, float)
    sample = Sample(plan.chunk.size, plan.chunk.overlap, plan.chunk.prefix, note=tok.note)
    readers = text_readers(shape, tasks, row_quotas([r for r, _, _ in counts], wanted))
    try:
        if sizes.rows is not None and sizes.rows <= sample_cap:
            sample_texts(tok.tok, (b for r in readers for b in r), sample, sample_cap, whole=True)
        else:
            sample_texts(tok.tok, round_robin(readers), sample, sample_cap)
        sample.complete = sample.complete and not unknown_fraction
    except (VolembedError, OSError, ValueError) as exc:
        sizes.warnings.append(f"sampling stopped: {exc}; the run will fail the same way")
        sample.complete = False
    finally:
        for reader in readers:
            reader.close()
    sizes.sample = sample if sample.n else None
    if sample.complete:
        sizes.rows = float(sample.n)
        sizes.rows_exact = True
    return sizes


def _measure_bytes(plan: Plan, sizes: Sizes, tasks: list[SourceTask], counts: list[tuple[int | None, bool, str | None]],
                   shape: Shape, cap: int) -> None:
    """Without a tokenizer: the texts' UTF-8 bytes (all of them, or the first `cap` scaled by rows), for the ratio."""
    if sizes.rows is None:
        return
    readers = text_readers(shape, tasks, row_quotas([r for r, _, _ in counts], sizes.rows))
    seen = total = 0
    try:
        for batch in round_robin(readers):
            seen += len(batch)
            total += sum(len(t.encode("utf-8")) for t in batch)
            if seen >= cap:
                break
    except (VolembedError, OSError, ValueError):
        return
    finally:
        for reader in readers:
            reader.close()
    if seen:
        sizes.text_bytes = total * sizes.rows / seen
        sizes.notes.append(f"text bytes: {sizes.text_bytes:,.0f} from {seen:,} document(s) read"
                           + (" (all)" if seen >= sizes.rows else ", scaled by rows"))


def row_quotas(rows: list[int | None], wanted: float | None) -> list[int | None]:
    """Rows of each file inside the first `wanted` rows (shard order); None = read to the end."""
    out: list[int | None] = []
    left = wanted
    for r in rows:
        if left is None:
            out.append(None)
            continue
        take = int(left) if r is None else int(min(r, left))
        out.append(take)
        left -= take
    return out


def text_readers(shape: Shape, tasks: list[SourceTask], quotas: list[int | None]) -> list[Iterator[list[str]]]:
    """Lazy text-batch readers of the local sources, each stopping after its quota of rows (sources with 0 skipped)."""
    return [_texts_of(sources.read_task(t, shape), q) for t, q in zip(tasks, quotas, strict=True) if q != 0]


def _texts_of(tables: Iterator[pa.Table], quota: int | None) -> Iterator[list[str]]:
    """Text batches of one source (SAMPLE_BATCH documents each), stopping after `quota` rows."""
    left = quota
    for t in tables:
        texts = t.column("text").to_pylist()
        if left is not None:
            texts = texts[:left]
            left -= len(texts)
        for i in range(0, len(texts), SAMPLE_BATCH):
            yield [x or "" for x in texts[i : i + SAMPLE_BATCH]]
        if left is not None and left <= 0:
            return


def round_robin(readers: list[Iterator[list[str]]]) -> Iterator[list[str]]:
    """One batch from each source in turn, so a sample of many files is not just the first file."""
    live = list(readers)
    while live:
        for reader in list(live):
            batch = next(reader, None)
            if batch is None:
                live.remove(reader)
            else:
                yield batch


def hint_sizes(plan: Plan, sizes: Sizes) -> None:
    """Fill rows/bytes the source could not give from the spec's `num_rows` / `num_bytes` hints."""
    rows_hint, bytes_hint = plan.data.num_rows, plan.data.num_bytes
    if sizes.total_rows is None and rows_hint:
        limit = set_rows(plan, sizes, float(rows_hint))
        sizes.notes.append(f"documents: {rows_hint:,} from the spec's dataset.num_rows hint{limit}")
    if sizes.text_bytes is None and bytes_hint:
        share = (sizes.rows / sizes.total_rows) if sizes.rows and sizes.total_rows else 1.0
        sizes.text_bytes = float(bytes_hint) * share
        sizes.notes.append(f"text bytes: {bytes_hint:,} from the spec's dataset.num_bytes hint"
                           + (f" x {share:.4g} (limit)" if share != 1.0 else ""))


def catalog_sizes(plan: Plan, sizes: Sizes, known: catalog.KnownDataset) -> None:
    """Fill rows/bytes still open from the catalog's entry for this Hub dataset (`catalog/datasets.yaml`)."""
    where = f"the catalog's size of {known.hf} {known.config or 'default'}/{known.split} (read {known.date})"
    if sizes.total_rows is None:
        limit = set_rows(plan, sizes, float(known.num_rows))
        sizes.notes.append(f"documents: {known.num_rows:,} from {where}{limit}")
    if sizes.text_bytes is None:
        share = (sizes.rows / sizes.total_rows) if sizes.rows and sizes.total_rows else 1.0
        sizes.text_bytes = float(known.num_bytes) * share
        sizes.notes.append(f"text bytes: {known.num_bytes:,} from {where}" + (f" x {share:.4g} (limit)" if share != 1.0
                                                                                 else ""))
    if sizes.files is None and known.files:
        sizes.files = known.files
    sizes.notes.append(f"dataset size source: {known.source}" + (f"; {known.derivation}" if known.derivation else ""))
    if plan.data.revision:
        sizes.notes.append(f"dataset.revision {plan.data.revision} is pinned: the catalog's size is of the dataset as "
                           f"read on {known.date}")


def size_help(plan: Plan) -> str:
    """What a user can set when the dataset's size cannot be read: where on the dataset card to find it, or how to
    let the dry run sample it."""
    d = plan.data
    if d.kind != "hf":
        return "set dataset.num_rows and dataset.num_bytes (UTF-8 bytes of the text), or use parquet/jsonl files"
    return (f"set dataset.num_rows and dataset.num_bytes from the dataset card, https://huggingface.co/datasets/"
            f"{d.hf}: num_rows = the row count of {d.config or 'default'}/{d.split} (`num_examples` under "
            "`dataset_info` in the card's YAML header, or the viewer's row count), num_bytes = that split's "
            "`num_bytes` there (its size, about the text's for a text dataset); or let the dry run sample it: run "
            "it where the Hub is reachable (HF_HUB_OFFLINE unset: a few seconds of metadata and one row group, no "
            "download)")


def hub_sizes(plan: Plan, tok: CountingTokenizer | None, sample_cap: int, timeout: float) -> Sizes:
    """Rows, bytes and a sample from the Hub's listing and parquet footers, all within `timeout` seconds.

    Runs in a daemon thread so a dead network can never hang the dry run; whatever arrived in time is used and the
    rest falls back to hints. Nothing here downloads data files: only metadata and the first row group's columns.
    """
    sizes = Sizes(remote=True)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        sizes.notes.append("could not read Hub metadata: HF_HUB_OFFLINE is set")
        return sizes
    found: dict[str, Any] = {}
    worker = threading.Thread(target=_hub_worker, args=(plan, tok, sample_cap, found), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        found.setdefault("error", f"timed out after {timeout:.0f} s")
    if "error" in found:
        sizes.notes.append(f"could not read Hub metadata: {found['error']}")
    sizes.files = found.get("files")
    sizes.download_bytes = found.get("download_bytes")
    if found.get("rows") is not None:
        set_rows(plan, sizes, float(found["rows"]))
        sizes.rows_exact = bool(found.get("rows_exact"))
        sizes.notes.append(f"documents: {found['rows']:,} from {found.get('rows_source')}")
    if found.get("text_bytes") is not None and sizes.rows and sizes.total_rows:
        sizes.text_bytes = float(found["text_bytes"]) * sizes.rows / sizes.total_rows
        sizes.notes.append(f"text bytes: ≈{found['text_bytes']:,.0f} from {found.get('bytes_source')}")
    sample = found.get("sample")
    if isinstance(sample, Sample) and sample.n and not worker.is_alive():
        sample.complete = False
        sizes.sample = sample
    return sizes


def _hub_worker(plan: Plan, tok: CountingTokenizer | None, sample_cap: int, found: dict[str, Any]) -> None:
    """Fill `found` step by step (listing, footers, sample); any failure is recorded as `error`, never raised."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        from huggingface_hub import HfFileSystem

        tasks = sources.list_tasks(plan.data)
        found["files"] = len(tasks)
        if all(t.size is not None for t in tasks):
            found["download_bytes"] = float(sum(t.size or 0 for t in tasks))
        fs = HfFileSystem()
        shape = Shape.of(plan.data)

        def open_file(task: SourceTask) -> IO[bytes]:
            repo, revision, path = parse_hf_uri(task.source)
            return fs.open(f"datasets/{repo}@{revision}/{path}", "rb")

        def footer(task: SourceTask) -> pq.FileMetaData:
            return pq.ParquetFile(open_file(task)).metadata

        with ThreadPoolExecutor(8) as pool:
            metas = list(pool.map(footer, tasks[:256]))
        found["rows"] = sum(m.num_rows for m in metas) * (len(tasks) / max(1, len(metas)))
        found["rows_exact"] = len(metas) == len(tasks)
        found["rows_source"] = f"the parquet footers of {len(metas)} of {len(tasks)} Hub file(s)"
        text_columns = list(shape.template_columns) if shape.template else [str(shape.text_column)]
        text_bytes = 0
        for meta in metas:
            names = [meta.schema.column(i).name for i in range(meta.num_columns)]
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                text_bytes += sum(group.column(i).total_uncompressed_size for i, n in enumerate(names)
                                  if n in text_columns)
        found["text_bytes"] = text_bytes * (len(tasks) / max(1, len(metas)))
        found["bytes_source"] = "the text column's uncompressed size in the parquet footers"
        if tok is None or not tasks:
            return
        path = parse_hf_uri(tasks[0].source)[2]
        pf = pq.ParquetFile(open_file(tasks[0]), metadata=metas[0])  # its footer was read above
        sample = Sample(plan.chunk.size, plan.chunk.overlap, plan.chunk.prefix, note=tok.note)
        found["sample"] = sample
        batches = pf.iter_batches(batch_size=SAMPLE_BATCH, columns=shape.needed, row_groups=[0])

        def texts() -> Iterator[list[str]]:
            for row0, batch in guarded(batches, lambda exc, row0: SourceError(str(exc))):
                yield shape_batch(batch, shape, path, 0, row0).column("text").to_pylist()

        sample_texts(tok.tok, texts(), sample, sample_cap)
    except Exception as exc:  # a dry run must not fail on metadata: the reason becomes an assumption line
        text = str(exc).strip().splitlines()
        found["error"] = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -------------------------------------------------------------------------------------------------------- totals


@dataclass
class Counts:
    """Documents → tokens → chunks → embedded (chunk) tokens, with 95% intervals (low, high) where known."""

    documents: float | None = None
    tokens: float | None = None
    chunks: float | None = None
    embedded: float | None = None
    text_bytes: float | None = None
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    exact: bool = False


def per_doc_lognormal(mean_tokens: float, sigma: float, size: int, overlap: int) -> tuple[float, float]:
    """Mean (chunks, embedded tokens) per document when token counts are log-normal around `mean_tokens`."""
    q = 800
    normal = statistics.NormalDist()
    m = math.log(max(mean_tokens, 1.0)) - sigma * sigma / 2
    stride = size - overlap
    chunks = embedded = 0.0
    for i in range(q):
        n = max(1, round(math.exp(m + sigma * normal.inv_cdf((i + 0.5) / q))))
        k = 1 if n <= size else math.ceil((n - size) / stride) + 1
        chunks += k
        embedded += n if n <= size else k * size
    return chunks / q, embedded / q


def count_totals(plan: Plan, sizes: Sizes, assumptions: list[str], unknown: list[str], warnings: list[str]) -> Counts:
    """Totals from the sample when there is one, else from byte sizes, a bytes/token ratio and a length model."""
    size, overlap = plan.chunk.size, plan.chunk.overlap
    out = Counts(documents=sizes.rows)
    if sizes.rows == 0 and sizes.rows_exact:
        warnings.append("the dataset holds no rows: the download stage will stop with 'dataset is empty'")
        out.tokens = out.chunks = out.embedded = out.text_bytes = 0.0
        out.exact = True
        return out
    sample = sizes.sample
    if sample is not None and sample.n:
        t, c, e, b = (mean_sd(v) for v in (sample.tokens, sample.chunks, sample.embedded, sample.nbytes))
        assumptions.append(sample.note)
        if sample.complete:
            out.documents = float(sample.n)
            out.tokens, out.chunks = float(sum(sample.tokens)), float(sum(sample.chunks))
            out.embedded, out.text_bytes = float(sum(sample.embedded)), float(sum(sample.nbytes))
            out.exact = True
            out.interval = {k: (v, v) for k, v in (("tokens", out.tokens), ("chunks", out.chunks),
                                                   ("embedded_tokens", out.embedded))}
            assumptions.append(f"tokens and chunks: every one of the {sample.n:,} documents tokenized and windowed "
                               f"({size} tokens, overlap {overlap}) — exact")
            return out
        docs = sizes.rows
        if docs is None and sizes.text_bytes is not None and b[0] > 0:
            docs = sizes.text_bytes / b[0]
            assumptions.append(f"documents: {sizes.text_bytes:,.0f} text bytes / {b[0]:,.0f} bytes per sampled "
                               "document")
        if docs is None:
            unknown.append(f"documents: no row count (footer, Hub listing or dataset.num_rows hint); {size_help(plan)}")
            return out
        out.documents = docs
        fpc = math.sqrt(max(0.0, (docs - sample.n) / (docs - 1))) if docs > 1 else 0.0
        for key, (mean, sd) in (("tokens", t), ("chunks", c), ("embedded_tokens", e)):
            half = Z95 * sd / math.sqrt(sample.n) * fpc
            out.interval[key] = (docs * max(0.0, mean - half), docs * (mean + half))
        out.tokens, out.chunks, out.embedded, out.text_bytes = docs * t[0], docs * c[0], docs * e[0], docs * b[0]
        how = ("converged: mean stable within 1% and its 95% interval within ±1%" if sample.converged
               else "stopped at the sample cap")
        assumptions.append(
            f"tokens and chunks: sampled {sample.n:,} documents ({how}): {t[0]:,.1f} tokens, {c[0]:.3f} chunks, "
            f"{e[0]:,.1f} chunk tokens per document (95% interval from the sample's spread)")
        return out
    if sizes.text_bytes is None:
        unknown.append(f"tokens: no document could be sampled and no byte size is known; {size_help(plan)}")
        return out
    ratio, ratio_note = bytes_per_token(plan)
    assumptions.append(f"tokens from text bytes: {ratio_note}")
    out.text_bytes = sizes.text_bytes
    out.tokens = sizes.text_bytes / ratio
    lo_tokens, hi_tokens = out.tokens / (1 + RATIO_UNCERTAINTY), out.tokens / (1 - RATIO_UNCERTAINTY)
    out.interval["tokens"] = (lo_tokens, hi_tokens)
    model = catalog.throughput()["doc_length"]
    if sizes.rows:
        mean = out.tokens / sizes.rows
        chunks, embedded = per_doc_lognormal(mean, model["sigma"], size, overlap)
        out.chunks, out.embedded = sizes.rows * chunks, sizes.rows * embedded
        corners = [per_doc_lognormal(tokens / sizes.rows, sigma, size, overlap)
                   for tokens in (lo_tokens, hi_tokens) for sigma in model["sigma_range"]]
        out.interval["chunks"] = (sizes.rows * min(c for c, _ in corners), sizes.rows * max(c for c, _ in corners))
        out.interval["embedded_tokens"] = (sizes.rows * min(e for _, e in corners),
                                           sizes.rows * max(e for _, e in corners))
        assumptions.append(
            f"chunks from sizes: {mean:,.0f} tokens per document, log-normal document lengths "
            f"(sigma {model['sigma']}; {model['source']}); interval: ratio ±{RATIO_UNCERTAINTY:.0%}, sigma "
            f"{model['sigma_range'][0]}–{model['sigma_range'][1]}")
    else:
        stride = size - overlap
        out.chunks = math.ceil(out.tokens / stride)
        out.embedded = out.chunks * size
        out.interval["chunks"] = (lo_tokens / stride, hi_tokens / stride)
        out.interval["embedded_tokens"] = (lo_tokens / stride * size, hi_tokens / stride * size)
        warnings.append("document count unknown: chunks assume every document is longer than a chunk (an upper "
                        "bound); set dataset.num_rows for a better estimate")
    return out

