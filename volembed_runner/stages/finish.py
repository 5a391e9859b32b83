"""The run's record: manifest.json (what ran, with what, what failed) and stats.json (what the chunks look like).

Counts are summed from the done-markers on the volume, not kept in memory, so a resumed or handed-over run reports
the whole job, and a manifest read mid-run (`volembed-run status`) shows live progress.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volembed_runner import results, store
from volembed_runner.errors import OutputError, VolembedError, describe, first_line
from volembed_runner.plan import HubSettings, Plan
from volembed_runner.redact import public_record
from volembed_runner.units import parse_key

LIBRARIES = ("volembed-runner", "modal", "pydantic", "tokenizers", "pyarrow", "httpx", "huggingface_hub",
             "sentence-transformers", "torch")
WRITE_EVERY_S = 2.0


def library_versions() -> dict[str, str | None]:
    """Versions of this package and the libraries whose behaviour shapes the outputs."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def merge_histograms(hists: list[dict[str, int]]) -> dict[str, int]:
    """Sum bucket counts of several histograms (keys are bucket labels)."""
    total: Counter[str] = Counter()
    for h in hists:
        total.update({str(k): int(v) for k, v in h.items()})
    return dict(sorted(total.items(), key=lambda kv: _bucket_key(kv[0])))


def _bucket_key(label: str) -> tuple[int, str]:
    digits = "".join(ch for ch in label.split("-")[0] if ch.isdigit())
    return (int(digits) if digits else 0, label)


def _markers(folder: Path) -> dict[str, dict[str, Any]]:
    """Every finished shard's marker stats: from the folder's index (a few files), else from each marker."""
    indexed = store.indexed_done(folder)
    if indexed is None:
        return {s: store.read_marker(store.shard_path(folder, s)) for s in store.done_shards(folder)}
    return {name.removeprefix("shard-").removesuffix(".parquet"): stats for name, stats in indexed.items()
            if name.startswith("shard-") and name.endswith(".parquet")}


def _marker_stats(folder: Path) -> list[dict[str, Any]]:
    return list(_markers(folder).values())


def totals(root: Path, plan: Plan) -> dict[str, Any]:
    """Documents, chunks, tokens and vectors of the plan's finished shards and embed units (`totals_of`)."""
    return totals_of(store.chunks_dir(root, plan.name, plan.chunk.fingerprint),
                     store.embeddings_dir(root, plan.name, plan.embed.fingerprint))


def totals_of(chunk_folder: Path, embed_folder: Path) -> dict[str, Any]:
    """Documents, chunks, tokens and vectors of the finished shards and embed units, read from their done-markers.

    A chunk shard's vectors are in the files of its embed units (one, or several row ranges: `units.py`); it counts
    as embedded once its units' rows add up to its chunks."""
    chunks = _markers(chunk_folder)
    units = _markers(embed_folder)
    chunk_stats, embed_stats = list(chunks.values()), list(units.values())
    embedded_rows: Counter[str] = Counter()
    for key, stats in units.items():
        embedded_rows[parse_key(key)[0]] += int(stats.get("rows", 0))

    def total(stats: list[dict[str, Any]], key: str) -> int:
        return sum(int(s.get(key, 0)) for s in stats)

    return {
        "documents": total(chunk_stats, "documents"),
        "empty_documents": total(chunk_stats, "empty_documents"),
        "chunks": total(chunk_stats, "chunks"),
        "tokens": total(chunk_stats, "tokens"),
        "doc_tokens": total(chunk_stats, "doc_tokens"),
        "vectors": total(embed_stats, "rows"),
        "embedded_tokens": total(embed_stats, "tokens"),
        "truncated": total(embed_stats, "truncated"),
        "chunk_shards_done": len(chunk_stats),
        "embed_shards_done": sum(1 for shard, stats in chunks.items()
                                 if shard in embedded_rows and embedded_rows[shard] == int(stats.get("chunks", 0))),
        "embed_units_done": len(embed_stats),
        "dims": sorted({int(s["dim"]) for s in embed_stats if "dim" in s}),
    }


def chunk_statistics(root: Path, plan: Plan) -> dict[str, Any]:
    """stats.json: the shape of the chunks (what the scripts we replace needed a separate summary script for)."""
    stats = _marker_stats(store.chunks_dir(root, plan.name, plan.chunk.fingerprint))
    return {
        "chunk_size": plan.chunk.size,
        "overlap": plan.chunk.overlap,
        "documents": sum(int(s.get("documents", 0)) for s in stats),
        "empty_documents": sum(int(s.get("empty_documents", 0)) for s in stats),
        "tiny_chunks": sum(int(s.get("tiny_chunks", 0)) for s in stats),
        "tokens_per_chunk": merge_histograms([s.get("token_histogram", {}) for s in stats]),
        "chunks_per_document": merge_histograms([s.get("chunks_per_doc_histogram", {}) for s in stats]),
    }


def _pass_counts(stage: str, stats: dict[str, Any]) -> dict[str, int]:
    """Rows and tokens one finished shard adds to its stage's work this pass (from its done-marker's stats)."""
    if stage == "chunk":
        return {"rows": int(stats.get("documents", 0)), "tokens": int(stats.get("doc_tokens", 0))}
    if stage == "embed":
        return {"rows": int(stats.get("rows", 0)), "tokens": int(stats.get("tokens", 0))}
    if stage == "index":
        return {"rows": int(stats.get("rows", 0)), "tokens": 0}
    return {"rows": 0, "tokens": 0}


def _stage_fingerprint(plan: Plan, stage: str) -> str:
    if stage == "index" and plan.index is not None:
        return plan.index.fingerprint
    return {"download": plan.data.fingerprint, "chunk": plan.chunk.fingerprint}.get(stage, plan.embed.fingerprint)


def _carried_work(previous: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The work earlier passes did on the outputs this pass continues: a stage's entry is kept only while its
    fingerprint is the same (a changed spec starts that stage's account afresh)."""
    return {stage: entry for stage, entry in previous.items()
            if entry.get("fingerprint") == _stage_fingerprint(plan, stage)}


@dataclass
class Manifest:
    """manifest.json of one run, updated as shards finish and written atomically.

    Shard counters are written as they change (at most every WRITE_EVERY_S); the totals, which mean reading every
    done-marker, are refreshed only at stage boundaries. `stages` is the last pass; `work` sums, per stage, the
    seconds, shards, rows and tokens of every pass that did work on the current outputs (what the report measures).
    """

    root: Path
    plan: Plan
    data: dict[str, Any] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)
    _last_write: float = 0.0
    _previous_stages: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, plan: Plan) -> Manifest:
        """Start (or continue) the manifest of `plan`'s run on `root`."""
        previous = store.read_json(store.manifest_path(root, plan.name)) or {}
        data = {
            "name": plan.name,
            "backend": plan.backend,
            "volume": plan.volume,
            "status": "running",
            "spec_path": plan.spec_path,
            "spec": plan.spec,
            "spec_hash": plan.spec_hash,
            "git": plan.git,
            "versions": library_versions(),
            "engine": {"engine": plan.embed.engine, "device": plan.machine.device, "precision": plan.embed.precision,
                       **({"runtime": plan.embed.runtime, "batch_tokens": plan.embed.batch_tokens,
                           "batch_texts": plan.embed.batch_texts, "batch_measured": plan.embed.batch_measured}
                          if plan.embed.runtime else {})},
            "fingerprints": {"data": plan.data.fingerprint, "chunks": plan.chunk.fingerprint,
                             "embeddings": plan.embed.fingerprint},
            "outputs": {
                "data": str(store.data_dir(root, plan.data.fingerprint)),
                "chunks": str(store.chunks_dir(root, plan.name, plan.chunk.fingerprint)),
                "embeddings": str(store.embeddings_dir(root, plan.name, plan.embed.fingerprint)),
            },
            "created_at": previous.get("created_at", store.utc_stamp()),
            "started_at": store.utc_stamp(),
            "finished_at": None,
            "passes": int(previous.get("passes", 0)) + 1,
            "stages": {},
            "work": _carried_work(previous.get("work") or {}, plan),
            "totals": {},
        }
        manifest = cls(root=root, plan=plan, data=data, _previous_stages=dict(previous.get("stages") or {}))
        manifest.write(force=True)
        return manifest

    def start_stage(self, stage: str, *, total: int, skipped: int = 0) -> None:
        """A stage begins: `skipped` of its `total` shards were already done."""
        self._started[stage] = time.monotonic()
        self.data["stages"][stage] = {"total": total, "skipped": skipped, "done": skipped, "failed": {},
                                      "started_at": store.utc_stamp(), "finished_at": None, "seconds": None,
                                      "this_pass": {"shards": 0, "rows": 0, "tokens": 0}}
        self.write(force=True)

    def skip_stage(self, stage: str) -> None:
        """A stage found all its work done by an earlier pass: listed as such (with that pass's total), so a
        resumed run's manifest still shows every stage."""
        total = int((self._previous_stages.get(stage) or {}).get("total") or 0)
        self.start_stage(stage, total=total, skipped=total)
        self.finish_stage(stage)

    def shard_finished(self, stage: str, shard: str, error: str | None,
                       stats: dict[str, Any] | None = None, *, unretryable: int | None = None) -> None:
        """One shard of a stage ended, successfully (with its stats) or with `error`; `unretryable` is the exit
        status of a failure another attempt at the same input cannot fix (an unreadable row: 3), kept apart so the
        run's end says so instead of "rerun to retry".

        What this pass did (shards, rows, tokens) is summed apart from the totals, so the report's rates count only
        the work this pass's seconds were spent on, not the shards an earlier pass finished.
        """
        entry = self.data["stages"][stage]
        if error:
            entry["failed"][shard] = error
            if unretryable is not None:
                entry.setdefault("unretryable", {})[shard] = unretryable
        else:
            entry["done"] += 1
            done = entry.setdefault("this_pass", {"shards": 0, "rows": 0, "tokens": 0})
            done["shards"] += 1
            for key, value in _pass_counts(stage, stats or {}).items():
                done[key] += value
        self.write()

    def finish_stage(self, stage: str) -> None:
        """A stage ended (all its shards were attempted)."""
        entry = self.data["stages"][stage]
        entry["finished_at"] = store.utc_stamp()
        entry["seconds"] = round(time.monotonic() - self._started[stage], 3)
        done = entry.get("this_pass") or {}
        if done.get("shards") or entry["failed"]:
            work = self.data.setdefault("work", {}).setdefault(
                stage, {"fingerprint": _stage_fingerprint(self.plan, stage), "passes": 0, "seconds": 0.0,
                        "shards": 0, "rows": 0, "tokens": 0})
            work["passes"] += 1
            work["seconds"] = round(work["seconds"] + entry["seconds"], 3)
            for key in ("shards", "rows", "tokens"):
                work[key] += int(done.get(key, 0))
        self.write(force=True)

    def close(self, *, outcome_ok: bool, handover: bool = False, stopped: bool = False) -> None:
        """Final counts, status and stats.json; a run whose vectors are of several widths never succeeds. `stopped`:
        the pass stopped feeding at the run's budget (`cost` says why and what remains)."""
        self.data["status"] = ("handover" if handover else "stopped" if stopped
                               else "succeeded" if outcome_ok else "failed")
        self.data["finished_at"] = store.utc_stamp()
        self.write(force=True)
        dims = self.data["totals"].get("dims") or []
        if len(dims) > 1:
            self.data["status"] = "failed"
            self.data["error"] = (f"the embeddings folder holds vectors of {len(dims)} widths ({dims}); "
                                  "remove it and rerun")
            self.write(force=True)
        store.write_json_atomic(store.stats_path(self.root, self.plan.name), chunk_statistics(self.root, self.plan))
        results.write_current(self.root, self.plan, status=self.data["status"])
        if self.plan.hub is not None and self.data["status"] == "succeeded" and "embed" in self.data["stages"]:
            self._publish(self.plan.hub)

    def _publish(self, hub: HubSettings) -> None:
        """The finish step of `output.hub`: push the run; a failed push fails the run (a rerun pushes again, and
        the upload skips what already arrived)."""
        from volembed_runner.publish import push_run

        try:
            self.data["hub"] = push_run(self.root, self.plan, hub).to_dict()
        except VolembedError as exc:
            self.data["hub"] = {"repo": hub.repo, "error": describe(exc)}
            self.data["status"] = "failed"
            self.data["error"] = f"push to {hub.repo} failed: {first_line(exc)}"
        self.write(force=True)

    def note(self, key: str, value: Any) -> None:
        """Record a fact about the run that is not a count (e.g. ids renamed by `duplicate_ids: suffix`)."""
        self.data[key] = value
        self.write(force=True)

    def abort(self, error: str) -> None:
        """The pass ended with an error outside any shard (e.g. the source could not be listed)."""
        self.data["status"] = "failed"
        self.data["error"] = error
        self.data["finished_at"] = store.utc_stamp()
        # a full disk takes nothing now: the last manifest stays whole, and `status` shows the pass as interrupted
        with contextlib.suppress(OutputError):
            self.write(force=True)

    def write(self, *, force: bool = False) -> None:
        """Write the manifest (throttled to one write per WRITE_EVERY_S unless forced, which also refreshes totals)."""
        now = time.monotonic()
        if not force and now - self._last_write < WRITE_EVERY_S:
            return
        self._last_write = now
        self.data["updated_at"] = store.utc_stamp()
        if force:
            self.data["totals"] = totals(self.root, self.plan)
        store.write_json_atomic(store.manifest_path(self.root, self.plan.name), public_record(self.data))
