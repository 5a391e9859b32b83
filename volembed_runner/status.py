"""What `status` shows: the manifest as the run last wrote it, corrected by what is true now.

The manifest is written by the run, so a run killed with SIGKILL (or on a full disk) leaves it `running` forever, and
its shard counters are throttled. Two facts outlive a dead writer: its lease, whose heartbeat stops (`lease.py`),
and the done-markers on the volume, read through each stage folder's index (`store.indexed_done`). A `running`
manifest whose lease no longer beats is shown as `interrupted`, with when and at which stage; done counts and totals
come from the index.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from volembed_runner import store
from volembed_runner.lease import LeaseRecord, holder_gone

STAGE_ORDER = ("download", "chunk", "embed")
OUTPUT_OF = {"chunk": "chunks", "embed": "embeddings"}


def _order(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def in_pipeline_order(stages: dict[str, Any]) -> dict[str, Any]:
    """A manifest's stages as the pipeline runs them (the file stores its keys sorted)."""
    return {name: stages[name] for name in sorted(stages, key=lambda s: (_order(s), s))}


def writer_stopped(record: LeaseRecord | None, now: float) -> bool:
    """True when no writer holds the run: its lease was released, its heartbeat stopped, or (on this machine) its
    process is gone or a zombie."""
    if record is None or record.released or not record.beating(now):
        return True
    return holder_gone(record.holder)


def live_status(manifest: dict[str, Any], record: LeaseRecord | None, *, root: Path | None = None,
                now: float | None = None, lease_known: bool = True) -> dict[str, Any]:
    """`manifest` as `status` shows it: stages in pipeline order, `interrupted` when its writer stopped without
    closing it (judged only when the lease could be read: `lease_known`), and (with the local `root`) done counts
    and totals from the stage folders' indexes."""
    now = time.time() if now is None else now
    out = {**manifest, "stages": in_pipeline_order({k: dict(v) for k, v in (manifest.get("stages") or {}).items()})}
    if root is not None:
        _count_from_index(out, root)
    if lease_known and out.get("status") == "running" and writer_stopped(record, now):
        open_stages = [name for name, entry in out["stages"].items() if not entry.get("finished_at")]
        stage = (record.stage if record is not None and record.stage else None) or \
            (open_stages[-1] if open_stages else next(reversed(out["stages"]), None))
        when = store.utc_stamp(record.heartbeat_at) if record is not None else out.get("updated_at")
        out["status"] = "interrupted"
        out["interrupted"] = {"at": when, "stage": stage}
    return out


def _count_from_index(out: dict[str, Any], root: Path) -> None:
    """Done counts of the chunk and embed stages, and the totals, from the index of the run's current folders."""
    from volembed_runner.stages.finish import totals_of

    folders = {stage: Path(out.get("outputs", {}).get(key, "")) for stage, key in OUTPUT_OF.items()}
    if not all(str(f) and f.is_relative_to(root) for f in folders.values()):
        return
    found = {stage: store.indexed_done(folder) for stage, folder in folders.items()}
    for stage, done in found.items():
        entry = out["stages"].get(stage)
        if entry is not None and done is not None:
            entry["done"] = len([n for n in done if n.startswith("shard-")])
    if any(done is not None for done in found.values()):  # a folder without an index is read marker by marker
        out["totals"] = {**(out.get("totals") or {}), **totals_of(folders["chunk"], folders["embed"])}
