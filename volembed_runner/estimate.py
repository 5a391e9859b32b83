"""The dry run: what a job will cost and how long it will take, before anything starts.

Sizes come from metadata, never from downloading the data: parquet footers and cheap counts for local files, the
Hub's listing when it answers within a bounded time, else the spec's `num_rows`/`num_bytes` hints. Tokens and chunks
per document come from sampling documents through the real tokenizer and window rule until the running mean
settles; with sizes only, from a stated bytes-per-token ratio and document-length model. Time and money follow from
a throughput table per (model, GPU) (`catalog/throughput.yaml`, or a stored `calibrate` measurement) and Modal's
per-second prices. Every figure's source lands in `assumptions`; what cannot be known is `None` ("unknown"), never 0.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from volembed_runner import catalog, store
from volembed_runner.embedders.local import usable_cores
from volembed_runner.errors import BackendError, SourceError, SpecError, SpecIssue, VolembedError
from volembed_runner.plan import Plan, volembed_home

SAMPLE_CAP = 5_000  # documents sampled at most
MIN_SAMPLE = 200  # documents sampled at least before convergence may stop the sample
SAMPLE_BATCH = 100  # documents per step; the running mean is checked after each
SAMPLE_TOKEN_BUDGET = 5_000_000  # tokens sampled at most (~10 s of tokenizing on one core)
CONVERGED = 0.01  # the running mean changed by less than this ...
CONVERGED_STEPS = 3  # ... this many steps in a row
COUNT_CAP_BYTES = 64 * 2**20  # a local file is read whole to count its rows only up to this size
HUB_TIMEOUT_S = 10.0  # all Hub metadata requests of one estimate together
RATIO_UNCERTAINTY = 0.15  # ± on a bytes-per-token ratio measured on another corpus
Z95 = 1.96
CALIBRATION_FILE = "calibration.json"


@cache
def table() -> dict[str, Any]:
    """`catalog/throughput.yaml`: calibrations, scaling rule and cost-model constants."""
    text = resources.files("volembed_runner.catalog").joinpath("throughput.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------------------------------ prices


@dataclass(frozen=True)
class Prices:
    """Modal's per-second prices; a None price is unknown and makes every cost that needs it unknown."""

    gpu: dict[str, float | None]
    cpu_core_s: float | None
    memory_gib_s: float | None
    volume_gib_month: float | None
    source: str

    def container(self, seconds: float, cores: float, gib: float, gpu: str | None = None) -> float | None:
        """Cost of `seconds` of one container: GPU + cores x $/core-s + GiB x $/GiB-s."""
        parts = [self.cpu_core_s, self.memory_gib_s] + ([self.gpu.get(gpu)] if gpu else [])
        if any(p is None for p in parts):
            return None
        per_second = float(self.gpu[gpu] or 0.0) if gpu else 0.0
        per_second += cores * float(self.cpu_core_s or 0.0) + gib * float(self.memory_gib_s or 0.0)
        return seconds * per_second


def load_prices(path: Path | None = None) -> Prices:
    """The catalog's prices, overridden by a YAML/JSON file mapping GPU name → $/s (+ optional cpu/memory/volume)."""
    raw = catalog.gpu_table()
    gpu: dict[str, float | None] = {name: g.usd_per_second for name, g in catalog.gpus().items()}
    values: dict[str, float | None] = {
        "cpu_usd_per_core_second": raw.get("cpu_usd_per_core_second"),
        "memory_usd_per_gib_second": raw.get("memory_usd_per_gib_second"),
        "volume_usd_per_gib_month": raw.get("volume_usd_per_gib_month"),
    }
    source = f"catalog prices ({raw.get('price_source')}, {raw.get('price_date')})"
    if path is not None:
        overrides = _read_price_file(Path(path))
        for key, value in overrides.items():
            if key in values:
                values[key] = value
                continue
            found = catalog.find_gpu(key)
            if found is None:
                known = ", ".join([*catalog.gpus(), *values])
                raise SpecError([SpecIssue(str(path), key, f"unknown GPU or price key; one of: {known}")])
            gpu[found.name] = value
        source = f"prices from {path} (overriding {', '.join(overrides)}); other prices: {source}"
    return Prices(gpu, values["cpu_usd_per_core_second"], values["memory_usd_per_gib_second"],
                  values["volume_usd_per_gib_month"], source)


def _read_price_file(path: Path) -> dict[str, float | None]:
    """A price override file: a mapping (optionally under `gpus:`) of name → non-negative number or null."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([SpecIssue(str(path), "--prices", f"cannot read price file: {exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(str(path), "--prices", "must be a mapping of GPU name to $/second")])
    flat = {**{k: v for k, v in data.items() if k != "gpus"}, **(data.get("gpus") or {})}
    out: dict[str, float | None] = {}
    for key, value in flat.items():
        ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0)
        if not ok:
            why = f"must be a price >= 0 in $/second or null, got {value!r}"
            raise SpecError([SpecIssue(str(path), str(key), why)])
        out[str(key)] = None if value is None else float(value)
    return out


# ------------------------------------------------------------------------------------------------------ calibration


def calibration_path() -> Path:
    """Where measured throughputs are stored: `$VOLEMBED_HOME/calibration.json`."""
    return volembed_home() / CALIBRATION_FILE


def calibration_key(backend: str, model: str, device: str, engine: str) -> str:
    """One calibration per (backend, model, GPU or local precision, engine)."""
    return "|".join((backend, model, device, engine))


def load_calibrations() -> dict[str, dict[str, Any]]:
    """Stored calibrations by key; an unreadable file counts as none."""
    try:
        data = store.read_json(calibration_path())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def _store_calibration(entry: dict[str, Any]) -> Path:
    path = calibration_path()
    entries = load_calibrations()
    entries[entry["key"]] = entry
    store.write_json_atomic(path, {"version": 1, "entries": entries})
    return path


# ----------------------------------------------------------------------------------------------------- tokenization


@dataclass
class _Tokenizer:
    """The tokenizer documents are counted with, and how it was found."""

    tok: Any
    note: str


def _tokenizer(plan: Plan) -> _Tokenizer | None:
    """The model's own tokenizer from disk, else a packaged tokenizer of the same catalog family (offline stand-in)."""
    from volembed_runner import chunking, models

    model = plan.chunk.model
    found = models.offline_tokenizer_file(model, plan.chunk.revision)
    if found is None:
        return None
    path, source = found
    tok = chunking.load_tokenizer(path)
    if source == model:
        return _Tokenizer(tok, f"tokens counted with {model}'s own tokenizer ({path})")
    family = catalog.find_model(model).tokenizer  # a stand-in is only ever found through the catalog family
    return _Tokenizer(tok, f"{model}'s tokenizer is not on this machine: tokens counted with {source}'s "
                           f"tokenizer, the same {family} family, standing in offline")


def _bytes_per_token(model: str) -> tuple[float, str]:
    ratios = table()["bytes_per_token"]
    known = catalog.find_model(model)
    name = known.tokenizer if known and known.tokenizer in ratios else "default"
    entry = ratios[name]
    return float(entry["value"]), f"{entry['value']} bytes/token for tokenizer family {name}: {entry['derivation']} " \
                                  f"({entry['source']})"


# ------------------------------------------------------------------------------------------------------------ sample


@dataclass
class _Sample:
    """Per-document counts of the sampled documents, through the real tokenizer and window rule."""

    size: int
    overlap: int
    tokens: list[int] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    embedded: list[int] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    complete: bool = False
    converged: bool = False
    note: str = ""
    _means: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.tokens)

    def add(self, tok: Any, texts: list[str]) -> None:
        """Count tokens, windows and window tokens of each text (no special tokens, like the chunk stage)."""
        from volembed_runner.chunking import windows

        encodings = tok.encode_batch(texts, add_special_tokens=False) if texts else []
        for text, enc in zip(texts, encodings, strict=True):
            n = len(enc) if text and not text.isspace() else 0
            spans = windows(n, self.size, self.overlap)
            self.tokens.append(n)
            self.chunks.append(len(spans))
            self.embedded.append(sum(end - start for start, end in spans))
            self.nbytes.append(len(text.encode("utf-8")))
        if self.n:
            self._means.append(sum(self.embedded) / self.n)

    def settled(self) -> bool:
        """True once the running mean of chunk tokens/doc moved < 1% over the last steps and its 95% interval is
        within ±1% (a stable mean of a heavy-tailed sample can still be far off; the interval says so)."""
        if self.n < MIN_SAMPLE or len(self._means) <= CONVERGED_STEPS:
            return False
        recent = self._means[-CONVERGED_STEPS - 1 :]
        base = recent[-1] or 1.0
        stable = all(abs(b - a) / base < CONVERGED for a, b in zip(recent, recent[1:], strict=False))
        mean, sd = _mean_sd(self.embedded)
        return stable and Z95 * sd / math.sqrt(self.n) <= CONVERGED * max(mean, 1e-9)


def _mean_sd(values: list[int]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _sample_texts(
    tok: Any, batches: Iterator[list[str]], sample: _Sample, cap: int, *, whole: bool = False
) -> _Sample:
    """Feed text batches to the sample until exhausted (complete), settled, or a cap.

    With `whole` (the population fits under the cap) convergence does not stop it: reading everything is exact.
    """
    for texts in batches:
        room = cap - sample.n
        sample.add(tok, texts[:room])
        if len(texts) > room:
            return sample
        if sample.n >= cap or sum(sample.tokens) >= SAMPLE_TOKEN_BUDGET:
            return sample
        if not whole and sample.settled():
            sample.converged = True
            return sample
    sample.complete = True
    return sample


# ------------------------------------------------------------------------------------------------------------- sizes


@dataclass
class _Sizes:
    """What is known about the dataset before chunking: rows, text bytes, source files, and a sample."""

    rows: float | None = None  # documents after `limit`
    rows_exact: bool = False
    total_rows: float | None = None  # before `limit`
    text_bytes: float | None = None  # UTF-8 bytes of the texts after `limit`
    files: int | None = None  # download tasks (one per source file)
    download_bytes: float | None = None  # bytes a download stage reads
    remote: bool = False  # the source is on the Hub
    sample: _Sample | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _set_rows(plan: Plan, sizes: _Sizes, total: float) -> str:
    """Record `total` rows and the rows `dataset.limit` keeps of them; returns the limit's note (or "")."""
    from volembed_runner.stages.download import limit_rows

    sizes.total_rows = total
    if plan.data.limit is None:
        sizes.rows = total
        return ""
    sizes.rows = float(limit_rows(plan.data.limit, int(total)))
    return f", limit {plan.data.limit} → {sizes.rows:,.0f}"


def _count_local_rows(task: Any, data: Any, shape: Any) -> tuple[int | None, bool, str | None]:
    """Rows of one local source without loading it: a parquet footer, a line count, a folder's file count."""
    import pyarrow.parquet as pq

    from volembed_runner.stages import download as dl

    path = Path(task.source)
    if task.fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows, True, None
    if path.is_dir():
        return len(dl.folder_documents(path)), True, None
    if task.fmt in ("text", "pdf"):
        return 1, True, None
    size = path.stat().st_size
    if size <= COUNT_CAP_BYTES:
        rows = sum(t.num_rows for t in dl.read_task(Path("."), data, task, shape))
        return rows, True, None
    if task.fmt == "jsonl":
        return _count_lines(path), False, f"{path.name}: rows extrapolated from its first {COUNT_CAP_BYTES >> 20} MiB"
    return None, False, f"{path.name}: over {COUNT_CAP_BYTES >> 20} MiB, rows not counted in a dry run " \
                        "(set dataset.num_rows, or use parquet/jsonl)"


def _count_lines(path: Path) -> int:
    """Non-blank lines in the first COUNT_CAP_BYTES (decompressed), scaled to the whole file by bytes read."""
    import gzip

    raw = path.open("rb")
    with raw, (gzip.open(raw, "rb") if path.name.lower().endswith(".gz") else raw) as fh:
        lines = read = 0
        for line in fh:
            read += len(line)
            lines += bool(line.strip())
            if read >= COUNT_CAP_BYTES:
                return round(lines * path.stat().st_size / max(1, raw.tell()))
    return lines


def _local_sizes(plan: Plan, tok: _Tokenizer | None, sample_cap: int) -> _Sizes:
    """Rows from footers and counts, texts sampled from the first rows of the files in shard order."""
    from volembed_runner.stages import download as dl

    data = plan.data
    sizes = _Sizes()
    try:
        shape = dl.Shape.of(data)
        tasks = dl.list_tasks(data)
        counts = [_count_local_rows(t, data, shape) for t in tasks]
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
        limit = _set_rows(plan, sizes, total)
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
    sample = _Sample(plan.chunk.size, plan.chunk.overlap, note=tok.note)
    readers = _readers(data, shape, tasks, _quotas([r for r, _, _ in counts], wanted))
    try:
        if sizes.rows is not None and sizes.rows <= sample_cap:
            _sample_texts(tok.tok, (b for r in readers for b in r), sample, sample_cap, whole=True)
        else:
            _sample_texts(tok.tok, _round_robin(readers), sample, sample_cap)
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


def _measure_bytes(plan: Plan, sizes: _Sizes, tasks: list[Any], counts: list[Any], shape: Any, cap: int) -> None:
    """Without a tokenizer: the texts' UTF-8 bytes (all of them, or the first `cap` scaled by rows), for the ratio."""
    if sizes.rows is None:
        return
    readers = _readers(plan.data, shape, tasks, _quotas([r for r, _, _ in counts], sizes.rows))
    seen = total = 0
    try:
        for batch in _round_robin(readers):
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


def _quotas(rows: list[int | None], wanted: float | None) -> list[int | None]:
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


def _readers(data: Any, shape: Any, tasks: list[Any], quotas: list[int | None]) -> list[Iterator[list[str]]]:
    """Lazy text-batch readers of the local sources, each stopping after its quota of rows (sources with 0 skipped)."""
    from volembed_runner.stages import download as dl

    return [_texts_of(dl.read_task(Path("."), data, t, shape), q) for t, q in zip(tasks, quotas, strict=True) if q != 0]


def _texts_of(tables: Iterator[Any], quota: int | None) -> Iterator[list[str]]:
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


def _round_robin(readers: list[Iterator[list[str]]]) -> Iterator[list[str]]:
    """One batch from each source in turn, so a sample of many files is not just the first file."""
    live = list(readers)
    while live:
        for reader in list(live):
            batch = next(reader, None)
            if batch is None:
                live.remove(reader)
            else:
                yield batch


def _hint_sizes(plan: Plan, sizes: _Sizes) -> None:
    """Fill rows/bytes the source could not give from the spec's `num_rows` / `num_bytes` hints."""
    ds = plan.spec.get("dataset", {})
    rows_hint, bytes_hint = ds.get("num_rows"), ds.get("num_bytes")
    if sizes.total_rows is None and rows_hint:
        limit = _set_rows(plan, sizes, float(rows_hint))
        sizes.notes.append(f"documents: {rows_hint:,} from the spec's dataset.num_rows hint{limit}")
    if sizes.text_bytes is None and bytes_hint:
        share = (sizes.rows / sizes.total_rows) if sizes.rows and sizes.total_rows else 1.0
        sizes.text_bytes = float(bytes_hint) * share
        sizes.notes.append(f"text bytes: {bytes_hint:,} from the spec's dataset.num_bytes hint"
                           + (f" x {share:.4g} (limit)" if share != 1.0 else ""))


# --------------------------------------------------------------------------------------------------------------- Hub


def _hub_sizes(plan: Plan, tok: _Tokenizer | None, sample_cap: int, timeout: float) -> _Sizes:
    """Rows, bytes and a sample from the Hub's listing and parquet footers, all within `timeout` seconds.

    Runs in a daemon thread so a dead network can never hang the dry run; whatever arrived in time is used and the
    rest falls back to hints. Nothing here downloads data files: only metadata and the first row group's columns.
    """
    sizes = _Sizes(remote=True)
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
        _set_rows(plan, sizes, float(found["rows"]))
        sizes.rows_exact = bool(found.get("rows_exact"))
        sizes.notes.append(f"documents: {found['rows']:,} from {found.get('rows_source')}")
    if found.get("text_bytes") is not None and sizes.rows and sizes.total_rows:
        sizes.text_bytes = float(found["text_bytes"]) * sizes.rows / sizes.total_rows
        sizes.notes.append(f"text bytes: ≈{found['text_bytes']:,.0f} from {found.get('bytes_source')}")
    sample = found.get("sample")
    if isinstance(sample, _Sample) and sample.n and not worker.is_alive():
        sample.complete = False
        sizes.sample = sample
    return sizes


def _hub_worker(plan: Plan, tok: _Tokenizer | None, sample_cap: int, found: dict[str, Any]) -> None:
    """Fill `found` step by step (listing, footers, sample); any failure is recorded as `error`, never raised."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq
        from huggingface_hub import HfFileSystem

        from volembed_runner.stages import download as dl

        tasks = dl.list_tasks(plan.data)
        found["files"] = len(tasks)
        if all(t.size is not None for t in tasks):
            found["download_bytes"] = float(sum(t.size or 0 for t in tasks))
        fs = HfFileSystem()
        shape = dl.Shape.of(plan.data)

        def open_file(task: Any) -> Any:
            repo, revision, path = dl.parse_hf_uri(task.source)
            return fs.open(f"datasets/{repo}@{revision}/{path}", "rb")

        def footer(task: Any) -> Any:
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
        path = dl.parse_hf_uri(tasks[0].source)[2]
        pf = pq.ParquetFile(open_file(tasks[0]), metadata=metas[0])  # its footer was read above
        sample = _Sample(plan.chunk.size, plan.chunk.overlap, note=tok.note)
        found["sample"] = sample
        batches = pf.iter_batches(batch_size=SAMPLE_BATCH, columns=shape.needed, row_groups=[0])

        def texts() -> Iterator[list[str]]:
            for row0, batch in dl.guarded(batches, lambda exc, row0: SourceError(str(exc))):
                yield dl.shape_batch(batch, shape, path, 0, row0).column("text").to_pylist()

        _sample_texts(tok.tok, texts(), sample, sample_cap)
    except Exception as exc:  # a dry run must not fail on metadata: the reason becomes an assumption line
        text = str(exc).strip().splitlines()
        found["error"] = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------------------ counts


@dataclass
class _Counts:
    """Documents → tokens → chunks → embedded (chunk) tokens, with 95% intervals (low, high) where known."""

    documents: float | None = None
    tokens: float | None = None
    chunks: float | None = None
    embedded: float | None = None
    text_bytes: float | None = None
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    exact: bool = False


def _per_doc_lognormal(mean_tokens: float, sigma: float, size: int, overlap: int) -> tuple[float, float]:
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


def _counts(plan: Plan, sizes: _Sizes, assumptions: list[str], unknown: list[str], warnings: list[str]) -> _Counts:
    """Totals from the sample when there is one, else from byte sizes, a bytes/token ratio and a length model."""
    size, overlap = plan.chunk.size, plan.chunk.overlap
    out = _Counts(documents=sizes.rows)
    if sizes.rows == 0 and sizes.rows_exact:
        warnings.append("the dataset holds no rows: the download stage will stop with 'dataset is empty'")
        out.tokens = out.chunks = out.embedded = out.text_bytes = 0.0
        out.exact = True
        return out
    sample = sizes.sample
    if sample is not None and sample.n:
        t, c, e, b = (_mean_sd(v) for v in (sample.tokens, sample.chunks, sample.embedded, sample.nbytes))
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
            unknown.append("documents: no row count (footer, Hub listing or dataset.num_rows hint)")
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
        unknown.append("tokens: no document could be sampled and no byte size is known (set dataset.num_bytes, or "
                       "make the source readable)")
        return out
    ratio, ratio_note = _bytes_per_token(plan.chunk.model)
    assumptions.append(f"tokens from text bytes: {ratio_note}")
    out.text_bytes = sizes.text_bytes
    out.tokens = sizes.text_bytes / ratio
    lo_tokens, hi_tokens = out.tokens / (1 + RATIO_UNCERTAINTY), out.tokens / (1 - RATIO_UNCERTAINTY)
    out.interval["tokens"] = (lo_tokens, hi_tokens)
    model = table()["doc_length"]
    if sizes.rows:
        mean = out.tokens / sizes.rows
        chunks, embedded = _per_doc_lognormal(mean, model["sigma"], size, overlap)
        out.chunks, out.embedded = sizes.rows * chunks, sizes.rows * embedded
        corners = [_per_doc_lognormal(tokens / sizes.rows, sigma, size, overlap)
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


# -------------------------------------------------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Rate:
    """Processed tokens/s per GPU (or for the local engine) and where the figure came from."""

    tokens_per_second: float
    low: float
    high: float
    kind: str  # calibrated | table | scaled | default
    source: str
    load_seconds: float | None = None  # the local engine's measured start (imports + model load)


def _params(model: str) -> tuple[float, str | None]:
    known = catalog.find_model(model)
    if known is not None:
        return float(known.params_m), None
    scaling = table()["scaling"]
    return float(scaling["default_params_m"]), scaling["default_params_source"]


def tei_rate(model: str, gpu: str, calibrations: dict[str, dict[str, Any]] | None = None) -> Rate:
    """Tokens/s per GPU for (model, GPU) under TEI: a calibration, the table, or the stated scaling rule."""
    calibrations = load_calibrations() if calibrations is None else calibrations
    entry = calibrations.get(calibration_key("modal", model, gpu, "tei"))
    if entry:
        tps = float(entry["tokens_per_second"])
        return Rate(tps, tps, tps, "calibrated", f"calibrated on Modal {entry.get('date')}: {tps:,.0f} tokens/s "
                                                 f"over {entry.get('chunks', '?')} chunks ({calibration_path()})")
    rows = table()["tei"]
    scaling = table()["scaling"]
    speed = table()["gpu_speed"]["factors"]
    for row in rows:
        if row["model"].lower() == model.lower() and row["gpu"] == gpu:
            return Rate(row["tokens_per_second"], row["low"], row["high"], "table",
                        f"{row['tokens_per_second']:,} tokens/s per {gpu} for {row['model']}: {row['derivation']} "
                        f"(source: {row['source']})")
    params, params_note = _params(model)
    same_model = [r for r in rows if r["model"].lower() == model.lower()]
    same_model += [{"model": model, "gpu": e["device"], "tokens_per_second": e["tokens_per_second"],
                    "low": e["tokens_per_second"], "high": e["tokens_per_second"]}
                   for e in calibrations.values() if e.get("backend") == "modal" and e.get("model") == model]
    if same_model:
        ref = same_model[0]
        factor = speed[gpu] / speed[ref["gpu"]]
        why = f"{model} on {ref['gpu']} ({ref['tokens_per_second']:,.0f}) x GPU speed {gpu}/{ref['gpu']} {factor:.2f}"
    else:
        same_gpu = [r for r in rows if r["gpu"] == gpu] or [r for r in rows if r["gpu"] == "A10"]
        ref = min(same_gpu, key=lambda r: abs(math.log(_params(r["model"])[0] / params)))
        ref_params = _params(ref["model"])[0]
        model_factor = min(ref_params / params, scaling["small_model_max_speedup"])
        factor = model_factor * speed[gpu] / speed[ref["gpu"]]
        why = (f"{ref['model']} on {ref['gpu']} ({ref['tokens_per_second']:,}) x params {ref_params:g}M/"
               f"{params:g}M (capped at {scaling['small_model_max_speedup']}x) x GPU speed {gpu}/{ref['gpu']}")
    cap = float(scaling["max_scaled_tokens_per_second"])
    tps, low, high = (min(cap, float(ref[k]) * factor) for k in ("tokens_per_second", "low", "high"))
    capped = f", capped at {cap:,.0f} ({scaling['max_scaled_source']})" if tps >= cap else ""
    note = f" ({params_note})" if params_note else ""
    return Rate(tps, low, high, "scaled", f"{tps:,.0f} tokens/s per {gpu} for {model}, scaled (not measured): "
                                          f"{why}{capped}; rule {scaling['rule']}{note}")


def local_rate(plan: Plan, calibrations: dict[str, dict[str, Any]] | None = None) -> Rate:
    """Tokens/s of the in-process engine on this machine: a calibration, else the stated default scaled."""
    calibrations = load_calibrations() if calibrations is None else calibrations
    precision = plan.embed.precision  # resolved for this CPU by the plan
    entry = calibrations.get(calibration_key("local", plan.embed.model, precision, "local"))
    if entry:
        tps = float(entry["tokens_per_second"])
        load = entry.get("model_load_seconds")
        return Rate(tps, tps, tps, "calibrated",
                    f"local engine calibrated {entry.get('date')}: {tps:,.0f} tokens/s ({precision}, "
                    f"{entry.get('cores')} cores, {entry.get('chunks')} chunks of the job"
                    + (f", engine start {load:.1f} s" if load is not None else "") + f"; {calibration_path()})",
                    None if load is None else float(load))
    ref = table()["local"]
    params, params_note = _params(plan.embed.model)
    cores = usable_cores()
    tps = float(ref[precision]) * ref["params_m"] / params * cores / ref["cores"]
    note = f"; {params_note}" if params_note else ""
    return Rate(tps, tps * 0.7, tps * 1.3, "default",
                f"local engine default: {ref[precision]:,} tokens/s for {ref['model']} ({precision}, {ref['cores']} "
                f"cores) x params {ref['params_m']}M/{params:g}M x cores {cores}/{ref['cores']} = {tps:,.0f} tokens/s "
                f"({ref['source']}){note}; run `volembed-run calibrate` to measure it (±30% until then)")


# ------------------------------------------------------------------------------------------------------------ stages


@dataclass
class Stage:
    """One stage of the job: how many containers, for how long, at what price."""

    name: str
    containers: int
    resources: str
    seconds: float | None  # wall time of the stage
    cpu_hours: float | None
    gpu_hours: float | None
    cost_usd: float | None
    gpu_cost_usd: float | None = None
    note: str = ""


@dataclass
class _Job:
    """What the cost model needs from the counts."""

    documents: float
    tokens: float
    processed: float  # chunk tokens + special and prefix tokens per chunk: what the GPU runs
    chunks: float
    text_bytes: float
    download_bytes: float
    files: int
    shards: int


@dataclass
class _Priced:
    stages: list[Stage]
    wall_seconds: float | None
    cost_usd: float | None
    gpu_seconds: float | None
    effective_gpus: int


def _sum(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(sum(v for v in values if v is not None))


@dataclass(frozen=True)
class _Sizing:
    """What the generated Modal app requests: (cores, GiB) per container kind, scale-down, download fan-out."""

    download: tuple[float, float]
    chunk: tuple[float, float]
    embed: tuple[float, float]
    orchestrator: tuple[float, float]
    scaledown_s: float
    download_max: int
    source: str


def _sizing(gpu: str, chunk_workers: int) -> _Sizing:
    """The container sizes the generated app requests (backends/modal/render.py and the GPU catalog)."""
    from volembed_runner.backends.modal import render as r

    return _Sizing(
        download=(float(r.DOWNLOAD_CPU), r.DOWNLOAD_MEMORY_MIB / 1024),
        chunk=(float(r.CHUNK_CPU), r.CHUNK_MEMORY_MIB / 1024),
        embed=(float(catalog.gpus()[gpu].embed_cpu), r.EMBED_MEMORY_MIB / 1024),
        orchestrator=(float(r.ORCHESTRATE_CPU), r.ORCHESTRATE_MEMORY_MIB / 1024),
        scaledown_s=float(r.EMBED_SCALEDOWN_S),
        download_max=min(int(r.DOWNLOAD_MAX_CONTAINERS), chunk_workers),
        source="as the generated app requests them (backends/modal/render.py; GPU containers: catalog embed_cpu)",
    )


def _describe_res(cores: float, gib: float, gpu: str | None = None) -> str:
    return (f"{gpu}, " if gpu else "") + f"{cores:g} CPU, {gib:g} GiB"


def _bandwidth(remote: bool) -> float:
    """Bytes/s one download worker reads: from the Hub, or parsing local files."""
    consts = table()["download"]
    return float(consts["hub_bytes_per_second"] if remote else consts["local_bytes_per_second"])


def _modal_job(plan: Plan, job: _Job, gpu: str, rate: float, prices: Prices, dim: int, remote: bool) -> _Priced:
    """Modal: download, chunk and embed containers plus the orchestrator and a month of Volume storage."""
    consts = table()["modal"]
    sizing = _sizing(gpu, plan.compute.chunk_workers)
    cpu_start, gpu_start = consts["cpu_container_start_seconds"], consts["gpu_container_start_seconds"]
    load, idle = consts["tei_model_load_seconds"], sizing.scaledown_s
    stages: list[Stage] = []

    cores, gib = sizing.download
    n = max(1, min(job.files, sizing.download_max))
    bandwidth = _bandwidth(remote)
    busy = job.download_bytes / bandwidth
    wall = cpu_start + busy / n + (job.download_bytes / job.files / bandwidth if job.files > n else 0.0)
    container_s = n * cpu_start + busy
    stages.append(Stage("download", n, _describe_res(cores, gib), wall, container_s * cores / 3600, 0.0,
                        prices.container(container_s, cores, gib), note=f"{job.files} source file(s)"))

    cores, gib = sizing.chunk
    n = max(1, min(plan.compute.chunk_workers, job.shards))
    per_shard = job.tokens / job.shards / (table()["chunk"]["tokens_per_second_per_core"] * cores)
    wall = cpu_start + math.ceil(job.shards / n) * per_shard
    container_s = n * cpu_start + job.shards * per_shard
    stages.append(Stage("chunk", n, _describe_res(cores, gib), wall, container_s * cores / 3600, 0.0,
                        prices.container(container_s, cores, gib), note=f"{job.shards} shard(s)"))

    cores, gib = sizing.embed
    aci = plan.compute.allow_concurrent_inputs
    g = max(1, min(plan.compute.concurrency_limit, math.ceil(job.shards / aci)))
    shard_s = job.processed / job.shards / rate
    if job.shards <= g * aci:
        busy_wall = math.ceil(job.shards / g) * shard_s
    else:
        busy_wall = job.processed / (rate * g) + 0.5 * shard_s
    wall = gpu_start + load + busy_wall
    gpu_s = g * (gpu_start + load + idle) + job.processed / rate
    gpu_price = prices.gpu.get(gpu)
    stages.append(Stage("embed", g, _describe_res(cores, gib, gpu), wall, gpu_s * cores / 3600, gpu_s / 3600,
                        prices.container(gpu_s, cores, gib, gpu), None if gpu_price is None else gpu_s * gpu_price,
                        note=f"{rate:,.0f} tokens/s per GPU; start {gpu_start + load:g} s + scaledown {idle:g} s each"))

    work_wall = _sum([s.seconds for s in stages])
    cores, gib = sizing.orchestrator
    orch_s = cpu_start + (work_wall or 0.0)
    stages.append(Stage("orchestrator", 1, _describe_res(cores, gib), orch_s, orch_s * cores / 3600, 0.0,
                        prices.container(orch_s, cores, gib)))

    ratio = table()["download"]["parquet_ratio"]
    chunk_bytes = job.text_bytes * (job.processed / max(job.tokens, 1.0)) * ratio + job.chunks * 40
    vectors = job.chunks * dim * 4 + (chunk_bytes if plan.embed.include_text else 0)
    gib_stored = (job.text_bytes * ratio + chunk_bytes + vectors) / 2**30
    months = consts["storage_months"]
    storage = None if prices.volume_gib_month is None else gib_stored * prices.volume_gib_month * months
    stages.append(Stage("storage", 0, f"{gib_stored:,.1f} GiB × {months} mo", None, 0.0, 0.0, storage,
                        note="data + chunks + vectors on the Volume; Modal's free TiB per workspace not deducted"))
    wall_total = None if work_wall is None else work_wall + cpu_start
    return _Priced(stages, wall_total, _sum([s.cost_usd for s in stages]), gpu_s, g)


def _local_job(plan: Plan, job: _Job, rate: float, remote: bool, load: float | None = None) -> _Priced:
    """One machine: read/convert the sources, chunk in a process pool, embed in-process. Nothing is billed."""
    from volembed_runner.backends.local import DOWNLOAD_WORKERS, cpu_workers

    workers = cpu_workers(plan.compute.chunk_workers)
    cores = usable_cores()
    readers = max(1, min(job.files, DOWNLOAD_WORKERS, workers))
    download = job.download_bytes / _bandwidth(remote) / readers
    chunk = job.tokens / (table()["chunk"]["tokens_per_second_per_core"] * workers)
    load = table()["local"]["model_load_seconds"] if load is None else load
    embed = load + job.processed / rate
    stages = [
        Stage("download", readers, f"{readers} process(es)", download, download * readers / 3600, 0.0, 0.0,
              note=f"{job.files} source(s)"),
        Stage("chunk", workers, f"{workers} process(es)", chunk, chunk * workers / 3600, 0.0, 0.0,
              note=f"{job.shards} shard(s)"),
        Stage("embed", 1, f"local engine, {cores} cores", embed, embed * cores / 3600, 0.0, 0.0,
              note=f"{rate:,.0f} tokens/s + {load:g} s model load"),
    ]
    overhead = float(table()["local"]["overhead_seconds"])
    return _Priced(stages, overhead + download + chunk + embed, 0.0, 0.0, 0)


def _price(plan: Plan, job: _Job, tokens_per_second: float, rate: Rate, prices: Prices, dim: int,
           remote: bool) -> _Priced:
    """The job on the plan's own backend at `tokens_per_second` (the rate's figure or one end of its range)."""
    if plan.backend == "local":
        return _local_job(plan, job, tokens_per_second, remote, rate.load_seconds)
    return _modal_job(plan, job, plan.compute.gpu, tokens_per_second, prices, dim, remote)


# ---------------------------------------------------------------------------------------------------------- estimate


@dataclass
class Estimate:
    """The dry run's answer. `to_dict` is the `--json` form; None means unknown (see `unknown` for why)."""

    name: str
    backend: str
    gpu: str
    model: str
    documents: int | None
    tokens: int | None
    chunks: int | None
    embedded_tokens: int | None
    processed_tokens: int | None
    stages: list[Stage]
    gpu_seconds: float | None
    wall_seconds: float | None
    cost_usd: float | None
    effective_gpus: int | None
    throughput: dict[str, Any] | None
    alternatives: list[dict[str, Any]]
    assumptions: list[str]
    warnings: list[str]
    unknown: list[str]
    sample: dict[str, Any]
    interval: dict[str, list[float] | None]
    prices: str
    gpu_usd_per_hour: float | None = None
    seconds_taken: float = 0.0

    @property
    def gpu_hours(self) -> float | None:
        """GPU-hours of the embed stage (start, model load and scale-down idle included)."""
        return None if self.gpu_seconds is None else self.gpu_seconds / 3600

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: counts, per-stage figures, totals, alternatives, assumptions, warnings."""
        out = asdict(self)
        out["gpu_hours"] = self.gpu_hours
        out["cost_note"] = "local: no spend" if self.backend == "local" else None
        return out


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def estimate(plan: Plan, *, prices: Path | None = None, sample_cap: int = SAMPLE_CAP,
             hub_timeout: float = HUB_TIMEOUT_S) -> Estimate:
    """Estimate documents, tokens, chunks, time and cost of `plan` without starting or downloading anything."""
    started = time.monotonic()
    price_table = load_prices(prices)
    assumptions: list[str] = []
    warnings: list[str] = list(plan.warnings)
    unknown: list[str] = []
    tok = _tokenizer(plan)
    if tok is None:
        warnings.append(f"no tokenizer for {plan.chunk.model} on this machine: documents are not sampled")
    sizes = _source_sizes(plan, tok, sample_cap, hub_timeout)
    assumptions.extend(sizes.notes)
    warnings.extend(sizes.warnings)
    counts = _counts(plan, sizes, assumptions, unknown, warnings)

    calibrations = load_calibrations()
    model = plan.embed.model
    job = _job(plan, sizes, counts, tok, assumptions)
    dim = plan.embed.dim or 768
    if plan.embed.dim is None:
        assumptions.append("vector size: 768 dimensions assumed (model not in the catalog)")

    rate: Rate | None
    priced: _Priced | None = None
    if plan.backend == "local":
        rate = local_rate(plan, calibrations) if plan.embed.engine == "local" else None
        if rate is None:
            unknown.append("embed time: the spec embeds through its own TEI server (embedding.endpoint), whose speed "
                           "is not known here")
        elif job is not None:
            priced = _price(plan, job, rate.tokens_per_second, rate, price_table, dim, sizes.remote)
        assumptions.append("cost: local: no spend (this machine, no cloud account)")
        assumptions.append(f"local run overhead: {table()['local']['overhead_seconds']} s "
                           f"({table()['local']['overhead_source']})")
    else:
        rate = tei_rate(model, plan.compute.gpu, calibrations)
        if job is not None:
            priced = _price(plan, job, rate.tokens_per_second, rate, price_table, dim, sizes.remote)
            _modal_warnings(plan, job, priced, warnings)
    if rate is not None:
        assumptions.append(f"throughput: {rate.source}")
    if plan.backend == "modal" or job is not None:
        assumptions.extend(_modal_assumptions(plan, price_table))
    alternatives = _alternatives(plan, job, price_table, calibrations, dim, sizes.remote)

    interval = {k: [lo, hi] for k, (lo, hi) in counts.interval.items()}
    if priced is not None and rate is not None and job is not None and priced.wall_seconds is not None:
        interval.update(_time_cost_interval(plan, job, counts, rate, price_table, dim, sizes.remote))
    cost = 0.0 if plan.backend == "local" else (priced.cost_usd if priced else None)
    if plan.backend != "local" and cost is None and priced is not None:
        unknown.append("cost: a price is unknown (set it with --prices FILE)")
    sample = sizes.sample
    est = Estimate(
        name=plan.name,
        backend=plan.backend,
        gpu=plan.compute.gpu,
        model=model,
        documents=_round(counts.documents),
        tokens=_round(counts.tokens),
        chunks=_round(counts.chunks),
        embedded_tokens=_round(counts.embedded),
        processed_tokens=_round(job.processed) if job else None,
        stages=priced.stages if priced else [],
        gpu_seconds=priced.gpu_seconds if priced else None,
        wall_seconds=priced.wall_seconds if priced else None,
        cost_usd=cost,
        effective_gpus=priced.effective_gpus if priced and plan.backend == "modal" else None,
        throughput=None if rate is None else {"tokens_per_second": rate.tokens_per_second, "low": rate.low,
                                              "high": rate.high, "kind": rate.kind, "source": rate.source},
        alternatives=alternatives,
        assumptions=assumptions,
        warnings=warnings,
        unknown=unknown,
        sample={"documents": sample.n if sample else 0, "complete": bool(sample and sample.complete),
                "converged": bool(sample and sample.converged), "cap": sample_cap,
                "tokenizer": sample.note if sample else None},
        interval=interval,
        prices=price_table.source,
        gpu_usd_per_hour=None if price_table.gpu.get(plan.compute.gpu) is None
        else float(price_table.gpu[plan.compute.gpu] or 0.0) * 3600,
    )
    est.seconds_taken = time.monotonic() - started
    return est


def _source_sizes(plan: Plan, tok: _Tokenizer | None, sample_cap: int, hub_timeout: float) -> _Sizes:
    """Local files are read directly; a Hub source is consulted only for what the size hints leave open."""
    if plan.data.kind == "files":
        sizes = _local_sizes(plan, tok, sample_cap)
    else:
        ds = plan.spec.get("dataset", {})
        if ds.get("num_rows") and ds.get("num_bytes"):
            sizes = _Sizes(remote=True)
            sizes.notes.append("sizes from the spec's hints; the Hub was not consulted (no network call)")
        else:
            sizes = _hub_sizes(plan, tok, sample_cap, hub_timeout)
    _hint_sizes(plan, sizes)
    return sizes


def _job(plan: Plan, sizes: _Sizes, counts: _Counts, tok: _Tokenizer | None, assumptions: list[str]) -> _Job | None:
    """The cost model's inputs, or None while tokens are unknown."""
    if counts.embedded is None or counts.tokens is None or counts.chunks is None:
        return None
    special, prefix = _added_tokens(plan, tok)
    processed = counts.embedded + counts.chunks * (special + prefix)
    assumptions.append(f"GPU work: chunk tokens + {special} special and {prefix} prefix token(s) per chunk = "
                       f"{processed:,.0f} processed tokens")
    docs = counts.documents or counts.chunks
    text_bytes = counts.text_bytes or counts.tokens * _bytes_per_token(plan.chunk.model)[0]
    download_bytes = sizes.download_bytes
    if download_bytes is None:
        download_bytes = text_bytes * table()["download"]["parquet_ratio"]
        assumptions.append(f"download: {download_bytes / 1e9:,.2f} GB ({table()['download']['parquet_source']})")
    files = sizes.files
    if files is None:
        files = max(1, math.ceil(download_bytes / table()["download"]["hub_file_bytes"]))
        assumptions.append(f"download tasks: {files} ({table()['download']['hub_file_source']})")
    from volembed_runner.stages.download import MAX_SHARD_TEXT_BYTES

    shards = max(files, math.ceil(docs / plan.data.shard_rows), math.ceil(text_bytes / MAX_SHARD_TEXT_BYTES))
    assumptions.append(f"shards: {shards:,} (≥ one per source file, ≤ {plan.data.shard_rows:,} documents and "
                       f"≤ {MAX_SHARD_TEXT_BYTES >> 20} MiB of text each)")
    return _Job(docs, counts.tokens, processed, counts.chunks, text_bytes, download_bytes, files, shards)


def _added_tokens(plan: Plan, tok: _Tokenizer | None) -> tuple[int, int]:
    """(special, prefix) tokens the engine adds to every chunk; 2 special tokens for a model the catalog lacks."""
    known = catalog.find_model(plan.embed.model)
    special = known.special_tokens if known else 2
    if not plan.embed.prefix:
        return special, 0
    if tok is not None:
        return special, len(tok.tok.encode(plan.embed.prefix, add_special_tokens=False))
    from volembed_runner.spec import prefix_tokens

    return special, prefix_tokens(plan.embed.prefix, plan.embed.model)


def _modal_warnings(plan: Plan, job: _Job, priced: _Priced, warnings: list[str]) -> None:
    caps = table()["modal"]["plan_gpu_caps"]
    limit = plan.compute.concurrency_limit
    over = [f"{name} {cap}" for name, cap in caps.items() if limit > cap]
    if over:
        warnings.append(f"compute.concurrency_limit {limit} exceeds the Modal plan GPU cap of {', '.join(over)} "
                        f"concurrent GPUs: on such a plan at most that many run at once and the job takes longer")
    g, aci = priced.effective_gpus, plan.compute.allow_concurrent_inputs
    embed = next(s for s in priced.stages if s.name == "embed")
    if g < limit and (embed.seconds or 0) > 600:
        most = max(1, job.documents // (limit * aci))
        warnings.append(f"only {g} of {limit} GPU containers get work: {job.shards} shard(s) ÷ "
                        f"{aci} per container (allow_concurrent_inputs); set dataset.shard_rows <= {most:,.0f} "
                        f"to use all {limit}")


def _modal_assumptions(plan: Plan, prices: Prices) -> list[str]:
    consts, chunk = table()["modal"], table()["chunk"]
    sizing = _sizing(plan.compute.gpu, plan.compute.chunk_workers)
    sizes = ", ".join(f"{kind} {cores:g} CPU/{gib:g} GiB" for kind, (cores, gib) in (
        ("download", sizing.download), ("chunk", sizing.chunk), (f"embed ({plan.compute.gpu})", sizing.embed),
        ("orchestrator", sizing.orchestrator)))
    return [
        f"prices: {prices.source}",
        f"containers: {sizes}, scaledown {sizing.scaledown_s:g} s, ≤ {sizing.download_max} download containers "
        f"({sizing.source})",
        f"start-up: {consts['source']}",
        f"chunking: {chunk['tokens_per_second_per_core']:,} tokens/s per core ({chunk['source']})",
        f"download: {table()['download']['hub_source']}; local sources: {table()['download']['local_source']}",
        f"Modal plan caps: {consts['plan_source']}",
    ]


def _alternatives(plan: Plan, job: _Job | None, prices: Prices, calibrations: dict[str, dict[str, Any]], dim: int,
                  remote: bool) -> list[dict[str, Any]]:
    """The same job on every other catalog GPU (all of them for a local job), sorted by cost (unknown last)."""
    out = []
    for name in catalog.gpus():
        if plan.backend == "modal" and name == plan.compute.gpu:
            continue
        rate = tei_rate(plan.embed.model, name, calibrations)
        row: dict[str, Any] = {"gpu": name, "usd_per_hour": None if prices.gpu.get(name) is None
                               else prices.gpu[name] * 3600, "tokens_per_second": rate.tokens_per_second,
                               "rate_kind": rate.kind, "wall_seconds": None, "gpu_hours": None, "cost_usd": None}
        if job is not None:
            priced = _modal_job(plan, job, name, rate.tokens_per_second, prices, dim, remote)
            row.update(wall_seconds=priced.wall_seconds, gpu_hours=(priced.gpu_seconds or 0) / 3600,
                       cost_usd=priced.cost_usd, effective_gpus=priced.effective_gpus)
        out.append(row)
    return sorted(out, key=lambda r: (r["cost_usd"] is None, r["cost_usd"] or 0.0, r["gpu"]))


def _time_cost_interval(plan: Plan, job: _Job, counts: _Counts, rate: Rate, prices: Prices, dim: int,
                        remote: bool) -> dict[str, list[float] | None]:
    """Wall time and cost at the low and high ends of the token interval and the throughput range."""
    lo_e, hi_e = counts.interval.get("embedded_tokens", (counts.embedded, counts.embedded))
    ends = []
    for embedded, tps in ((lo_e, rate.high), (hi_e, rate.low)):
        scale = (embedded or 0.0) / max(counts.embedded or 1.0, 1.0)
        scaled = _Job(job.documents, job.tokens * scale, job.processed * scale, job.chunks * scale,
                      job.text_bytes * scale, job.download_bytes, job.files, job.shards)
        ends.append(_price(plan, scaled, tps, rate, prices, dim, remote))
    walls = [p.wall_seconds for p in ends]
    costs = [p.cost_usd for p in ends]
    return {"wall_seconds": None if None in walls else [min(walls), max(walls)],  # type: ignore[type-var]
            "cost_usd": None if None in costs else [min(costs), max(costs)]}  # type: ignore[type-var]


# ---------------------------------------------------------------------------------------------------------- calibrate


def calibrate(plan: Plan, *, sample_chunks: int = 256,
              runner: Callable[[list[str], list[int]], float] | None = None) -> dict[str, Any]:
    """Measure tokens/s on the plan's backend over a small sample of the job's own chunks and store it.

    Local: embeds the chunks with the in-process engine (model load timed separately). Modal: needs Modal
    credentials, so only an injected `runner(texts, n_tokens) -> seconds` can measure it here.
    """
    if sample_chunks < 1:
        raise SpecError([SpecIssue("", "--chunks", f"must be at least 1, got {sample_chunks}")])
    if plan.backend == "modal" and runner is None:
        raise BackendError("calibrate on modal needs Modal credentials (run it where `modal token` is set up)")
    if plan.backend == "local" and plan.embed.engine != "local" and runner is None:
        raise BackendError("calibrate measures the local engine; this spec embeds through embedding.endpoint")
    tok = _tokenizer(plan)
    if tok is None:
        raise BackendError(f"calibrate needs {plan.chunk.model}'s tokenizer on this machine to cut sample chunks")
    texts, n_tokens = _sample_chunks(plan, tok, sample_chunks)
    processed = sum(n_tokens) + len(texts) * sum(_added_tokens(plan, tok))
    load_seconds = None
    if runner is None:
        from volembed_runner.embedders.local import LocalEmbedder

        e = plan.embed
        t0 = time.perf_counter()
        engine = LocalEmbedder(model=e.model, revision=e.revision, prefix=e.prefix, normalize=e.normalize,
                               precision=e.precision, dimensions=e.dimensions)
        load_seconds = time.perf_counter() - t0
        engine.embed(texts[:8], n_tokens[:8])
        t0 = time.perf_counter()
        engine.embed(texts, n_tokens)
        seconds = time.perf_counter() - t0
        backend, device, engine_name = "local", engine.precision, "local"
    else:
        seconds = float(runner(texts, n_tokens))
        backend = plan.backend
        device = plan.compute.gpu if backend == "modal" else plan.embed.precision
        engine_name = plan.embed.engine
    if seconds <= 0:
        raise BackendError(f"calibration measured {seconds} s for {len(texts)} chunks; cannot derive a rate")
    entry = {
        "key": calibration_key(backend, plan.embed.model, device, engine_name),
        "backend": backend,
        "model": plan.embed.model,
        "device": device,
        "engine": engine_name,
        "tokens_per_second": processed / seconds,
        "seconds": seconds,
        "chunks": len(texts),
        "chunk_tokens": sum(n_tokens),
        "processed_tokens": processed,
        "chunk_size": plan.chunk.size,
        "cores": usable_cores(),
        "model_load_seconds": load_seconds,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    entry["path"] = str(_store_calibration(entry))
    return entry


def _sample_chunks(plan: Plan, tok: _Tokenizer, want: int) -> tuple[list[str], list[int]]:
    """The first `want` chunks of the job (its first documents, cut by the real chunker)."""
    from volembed_runner import chunking
    from volembed_runner.stages import download as dl

    if plan.data.kind != "files":
        raise BackendError("calibrate samples the job's documents from local files; for a Hub dataset, run it on a "
                           "spec with dataset.files pointing at a few of its parquet files")
    tasks = dl.list_tasks(plan.data)
    readers = _readers(plan.data, dl.Shape.of(plan.data), tasks, [None] * len(tasks))
    batches = (b for reader in readers for b in reader)
    texts: list[str] = []
    n_tokens: list[int] = []
    for batch in islice(batches, 10_000):
        cols = chunking.chunk_texts(tok.tok, batch, plan.chunk.size, plan.chunk.overlap)
        texts.extend(cols.text)
        n_tokens.extend(cols.n_tokens)
        if len(texts) >= want:
            break
    if not texts:
        raise SourceError("calibrate found no text to embed in the dataset")
    return texts[:want], n_tokens[:want]


# ------------------------------------------------------------------------------------------------------------ render


def _fmt_count(value: float | None) -> str:
    """3 significant digits with a unit: 6.46M, 4.04B, 219k; small numbers in full."""
    if value is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= 1e4 and abs(value) >= size * 0.9995:
            scaled = value / size
            return f"{scaled:.3g}{unit}" if abs(scaled) < 999.5 else f"{scaled:,.0f}{unit}"
    return f"{value:,.0f}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _fmt_usd(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def _fmt_range(pair: list[float] | None, fmt: Callable[[float | None], str], label: str = "95%") -> str:
    if not pair or fmt(pair[0]) == fmt(pair[1]):
        return ""
    return f" ({label} {fmt(pair[0])}–{fmt(pair[1])})"


def _table(title: str, columns: list[str], wrap: str = "") -> Table:
    out = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        out.add_column(col, justify="left" if col in ("STAGE", "GPU", "EACH", "RATE", "") else "right",
                       no_wrap=col != wrap, overflow="fold")
    return out


def render(est: Estimate, console: Console) -> None:
    """Print the estimate: counts, per-stage table, totals, the same job on other GPUs, assumptions, warnings."""
    iv = est.interval
    local = est.backend == "local"
    counts = Table(title=f"estimate: {est.name} ({est.backend})", title_justify="left", show_header=False, box=None)
    counts.add_column(style="bold", no_wrap=True)
    counts.add_column()
    counts.add_row("documents", _fmt_count(est.documents))
    counts.add_row("tokens", _fmt_count(est.tokens) + _fmt_range(iv.get("tokens"), _fmt_count))
    counts.add_row("chunks", _fmt_count(est.chunks) + _fmt_range(iv.get("chunks"), _fmt_count))
    counts.add_row("chunk tokens", _fmt_count(est.embedded_tokens) + _fmt_range(iv.get("embedded_tokens"), _fmt_count))
    s = est.sample
    if s["documents"]:
        how = "all of them: exact" if s["complete"] else "converged" if s["converged"] else f"cap {s['cap']:,}"
        counts.add_row("sample", f"{s['documents']:,} documents ({how})")
    else:
        counts.add_row("sample", "none (sizes only)")
    if est.throughput:
        t = est.throughput
        per = "per GPU" if not local else "local engine"
        counts.add_row("throughput", f"{t['tokens_per_second']:,.0f} tokens/s {per} ({t['kind']})")
    console.print(counts)

    stages = _table("stages", ["STAGE", "CONTAINERS", "EACH", "CPU-H", "GPU-H", "TIME", "COST ($)"], wrap="EACH")
    for st in est.stages:
        stages.add_row(st.name, str(st.containers) if st.containers else "-", st.resources,
                       "-" if st.cpu_hours is None else f"{st.cpu_hours:,.2f}",
                       "-" if not st.gpu_hours else f"{st.gpu_hours:,.2f}",
                       "-" if st.seconds is None else _fmt_duration(st.seconds),
                       "-" if local else _fmt_usd(st.cost_usd))
    total_cost = "$0 (local: no spend)" if local else _fmt_usd(est.cost_usd)
    stages.add_row("total", "", "", "", "-" if not est.gpu_hours else f"{est.gpu_hours:,.2f}",
                   _fmt_duration(est.wall_seconds), "$0" if local else total_cost, style="bold")
    console.print(stages)
    summary = f"total: {_fmt_duration(est.wall_seconds)}"
    summary += _fmt_range(iv.get("wall_seconds"), _fmt_duration, "range") + f", {total_cost}"
    if not local:
        summary += _fmt_range(iv.get("cost_usd"), _fmt_usd, "range")
    if est.effective_gpus is not None:
        summary += f"; {est.effective_gpus} × {est.gpu} at once"
    console.print(summary, markup=False)
    for reason in est.unknown:
        console.print(f"unknown: {reason}", markup=False)

    title = "the same job on Modal GPUs, by cost" if local else "the same job on other GPUs, by cost"
    alt = _table(title, ["GPU", "$/H", "TOKENS/S", "RATE", "GPU-H", "TIME", "COST ($)", ""])
    rows = list(est.alternatives)
    if not local:
        rate = est.throughput or {}
        rows.append({"gpu": est.gpu, "usd_per_hour": est.gpu_usd_per_hour, "chosen": True,
                     "tokens_per_second": rate.get("tokens_per_second"), "rate_kind": rate.get("kind"),
                     "gpu_hours": est.gpu_hours, "wall_seconds": est.wall_seconds, "cost_usd": est.cost_usd})
        rows.sort(key=lambda r: (r["cost_usd"] is None, r["cost_usd"] or 0.0))
    for r in rows:
        price, tps = r.get("usd_per_hour"), r.get("tokens_per_second")
        alt.add_row(r["gpu"], "unknown" if price is None else f"{price:,.2f}",
                    "unknown" if tps is None else f"{tps:,.0f}", str(r.get("rate_kind") or ""),
                    "-" if r.get("gpu_hours") is None else f"{r['gpu_hours']:,.2f}",
                    _fmt_duration(r.get("wall_seconds")), _fmt_usd(r.get("cost_usd")),
                    "✔ chosen" if r.get("chosen") else "")
    console.print(alt)
    console.print("assumptions:", markup=False)
    for line in est.assumptions:
        console.print(f"  - {line}", markup=False)
    for line in est.warnings:
        console.print(f"warning: {line}", markup=False)
