"""The facts of `volembed-run report`: a run's manifest and stats.json, with rates and the estimate beside them.

Read through `results.VolumeFiles`, so a Modal run's record comes off its Volume and a local one off the folder. The
estimate is recomputed from the spec when the report is made (the dry run's model with today's catalog and
calibration), not stored when the run started: the report says so. `ui/report.py` turns these facts into HTML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from volembed_runner import store
from volembed_runner.errors import BackendError, VolembedError, describe
from volembed_runner.plan import Plan
from volembed_runner.results import VolumeFiles
from volembed_runner.stages.chunk import TINY_CHUNK_TOKENS

PIPELINE = ("download", "chunk", "embed")  # the order stages run in (the manifest's JSON keys are sorted)
ESTIMATE_SOURCE = ("recomputed from the spec when this report was made (the dry run's figures with today's catalog, "
                   "prices and calibration), not stored when the run started")


@dataclass(frozen=True)
class StageRow:
    """One stage: its shards as the last pass left them, and the time and output of every pass that worked on the
    current outputs (the manifest's `work`), so a rerun that skipped everything does not hide the real run."""

    name: str
    total: int
    done: int
    skipped: int  # in the last pass: found done by an earlier one
    failed: int  # in the last pass
    seconds: float | None  # summed over the passes that did work
    passes: int
    shards_worked: int
    rows: int
    tokens: int
    estimated_seconds: float | None

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens processed per second of the stage (None when it did nothing or took no time)."""
        return self.tokens / self.seconds if self.seconds and self.tokens else None

    @property
    def rows_per_second(self) -> float | None:
        """Documents (chunk) or vectors (embed) per second of the stage."""
        return self.rows / self.seconds if self.seconds and self.rows else None


@dataclass(frozen=True)
class Failure:
    """A shard that failed in the last pass, with its cause."""

    stage: str
    shard: str
    cause: str


@dataclass
class RunReport:
    """Everything the report shows about one run."""

    name: str
    backend: str
    status: str
    manifest: dict[str, Any]
    stats: dict[str, Any]
    stages: list[StageRow]
    failures: list[Failure]
    estimate: dict[str, Any] | None
    estimate_source: str
    estimate_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, Any]:
        """The manifest's totals (counted from the done-markers when the pass ended)."""
        return dict(self.manifest.get("totals") or {})

    @property
    def measured_seconds(self) -> float | None:
        """Time spent in the stages, over every pass that worked on the current outputs (None before any)."""
        seconds = [s.seconds for s in self.stages if s.seconds is not None]
        return round(sum(seconds), 3) if seconds else None

    @property
    def passes(self) -> int:
        """The most passes any stage took (1 for a run that finished in one go)."""
        return max((s.passes for s in self.stages), default=0)

    @property
    def tiny_chunks(self) -> int:
        """Chunks shorter than `tiny_below` tokens (the tails the scripts we replace emitted)."""
        return int(self.stats.get("tiny_chunks", 0))

    @property
    def tiny_below(self) -> int:
        """The token count under which a chunk counts as tiny."""
        return TINY_CHUNK_TOKENS


def _json(files: VolumeFiles, path: str) -> dict[str, Any] | None:
    raw = files.read(path)
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except ValueError as exc:
        raise BackendError(f"{files.where}/{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def _estimated(estimate: dict[str, Any] | None, stage: str) -> float | None:
    for st in (estimate or {}).get("stages", []):
        if st.get("name") == stage:
            return st.get("seconds")
    return None


def build_report(plan: Plan, files: VolumeFiles, *, estimate: dict[str, Any] | None = None,
                 estimate_error: str | None = None) -> RunReport:
    """The run's report facts from its manifest and stats.json on `files` (`estimate`: the dry run's `to_dict`)."""
    manifest_rel = store.manifest_path(Path("/"), plan.name).relative_to("/").as_posix()
    manifest = _json(files, manifest_rel)
    if manifest is None:
        raise BackendError(f"{plan.name} has no manifest in {files.where}/{manifest_rel}: it has not run there yet")
    stats = _json(files, store.stats_path(Path("/"), plan.name).relative_to("/").as_posix()) or {}
    rows = []
    failures = []
    stages = manifest.get("stages") or {}
    work = manifest.get("work") or {}
    order = {name: i for i, name in enumerate(PIPELINE)}
    for name in sorted(dict.fromkeys([*work, *stages]), key=lambda n: (order.get(n, len(order)), n)):
        entry, done = stages.get(name) or {}, work.get(name) or {}
        rows.append(StageRow(
            name=name, total=int(entry.get("total", 0)), done=int(entry.get("done", 0)),
            skipped=int(entry.get("skipped", 0)), failed=len(entry.get("failed") or {}),
            seconds=done.get("seconds", entry.get("seconds") if not work else None),
            passes=int(done.get("passes", 0)), shards_worked=int(done.get("shards", 0)),
            rows=int(done.get("rows", 0)), tokens=int(done.get("tokens", 0)),
            estimated_seconds=_estimated(estimate, name)))
        failures += [Failure(name, shard, cause) for shard, cause in sorted((entry.get("failed") or {}).items())]
    notes = []
    if not stats:
        notes.append("no stats.json yet: the first pass has not ended, so there are no histograms")
    if manifest.get("error"):
        notes.append(f"the last pass failed: {manifest['error']}")
    return RunReport(name=plan.name, backend=str(manifest.get("backend", plan.backend)),
                     status=str(manifest.get("status")), manifest=manifest, stats=stats, stages=rows,
                     failures=failures, estimate=estimate, estimate_source=ESTIMATE_SOURCE,
                     estimate_error=estimate_error, notes=notes)


def recompute_estimate(plan: Plan) -> tuple[dict[str, Any] | None, str | None]:
    """The dry run's estimate of `plan` now, or None with the reason it could not be made."""
    from volembed_runner.estimate import estimate

    try:
        return estimate(plan).to_dict(), None
    except VolembedError as exc:
        return None, describe(exc)
