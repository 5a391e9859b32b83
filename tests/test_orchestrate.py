"""The control flow both backends share, driven through a local stand-in for `Function.map`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from volembed_runner import sources, store
from volembed_runner.lease import FileLeaseStore, Holder
from volembed_runner.loading import load_spec
from volembed_runner.orchestrate import Outcome, StageStarted, orchestrate
from volembed_runner.plan import Plan, make_plan
from volembed_runner.stages import chunk as chunk_stage
from volembed_runner.stages import download as download_stage
from volembed_runner.stages import embed as embed_stage

SPEC = """\
version: 1
name: orch
backend: local
volume: v
dataset:
  files: [docs.jsonl]
  shard_rows: 4
chunking: {size: 16, overlap: 4, workers: 1}
embedding: {model: sentence-transformers/all-MiniLM-L6-v2}
"""


class HashEmbedder:
    """A deterministic stand-in engine: a vector per text from its hash (no model needed)."""

    dim = 384  # all-MiniLM-L6-v2's width: the embed stage holds every vector to the run's

    def truncations(self, n_tokens: list[int]) -> int:
        return 0

    def embed(self, texts: list[str], n_tokens: list[int]) -> np.ndarray:
        return np.array([[(hash(t) >> i) % 7 for i in range(self.dim)] for t in texts], dtype=np.float32)


class StandInMapper:
    """Runs each stage in-process, in order, like `.map(..., return_exceptions=True)`; records every call."""

    def __init__(self, plan: Plan, root: Path, fail: Iterable[str] = ()) -> None:
        self.plan, self.root, self.fail = plan, root, set(fail)
        self.calls: dict[str, list[str]] = {"download": [], "chunk": [], "embed": []}

    def _guard(self, stage: str, key: str, fn: Any) -> Any:
        self.calls[stage].append(key)
        try:
            if f"{stage}:{key}" in self.fail:
                raise RuntimeError(f"injected failure in {stage} {key}")
            return fn()
        except Exception as exc:
            return exc

    def download(self, tasks):
        for t in tasks:
            yield t, self._guard("download", t.source,
                                 lambda t=t: download_stage.download_task(self.root, self.plan.data, t))

    def chunk(self, shards):
        for s, cap in shards:
            yield s, self._guard("chunk", s, lambda s=s, cap=cap: chunk_stage.run_shard(self.root, self.plan, s, cap))

    def embed(self, shards):
        assert shards, "an empty list must never be mapped"
        for s in shards:
            yield s, self._guard("embed", s,
                                 lambda s=s: embed_stage.embed_shard(self.root, self.plan, s, HashEmbedder()))


def run_pass(plan: Plan, root: Path, mapper: StandInMapper, **kw: Any) -> Outcome:
    """One orchestrator pass holding the run's lease on the local volume, as the local backend runs it."""
    return orchestrate(plan, root, mapper, lease_store=FileLeaseStore(store.lease_dir(root, plan.name)),
                       holder=Holder.here("local"), **kw)


def setup(tmp_path: Path, docs: int = 20) -> tuple[Plan, Path]:
    with (tmp_path / "docs.jsonl").open("w") as fh:
        for i in range(docs):
            fh.write(json.dumps({"text": f"document {i} " + "word " * (i * 3)}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    plan = make_plan(load_spec(spec), spec)
    return plan, tmp_path / "vol"


def manifest(plan: Plan, root: Path) -> dict:
    return json.loads(store.manifest_path(root, plan.name).read_text())


def test_runs_every_stage_and_counts_from_markers(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    mapper = StandInMapper(plan, root)
    outcome = run_pass(plan, root, mapper)
    assert outcome.ok and outcome.stages_run == ["download", "chunk", "embed"]
    assert len(mapper.calls["chunk"]) == len(mapper.calls["embed"]) == 5
    m = manifest(plan, root)
    assert m["status"] == "succeeded" and m["totals"]["documents"] == 20
    assert m["totals"]["vectors"] == m["totals"]["chunks"] > 20


def test_rerun_skips_finished_shards(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    run_pass(plan, root, StandInMapper(plan, root))
    again = StandInMapper(plan, root)
    outcome = run_pass(plan, root, again)
    assert outcome.ok and again.calls == {"download": [], "chunk": [], "embed": []}
    assert manifest(plan, root)["passes"] == 2


def test_a_rerun_still_announces_every_stage_download_included(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    run_pass(plan, root, StandInMapper(plan, root))
    events: list = []
    run_pass(plan, root, StandInMapper(plan, root), on_event=events.append)
    started = [e for e in events if isinstance(e, StageStarted)]
    assert [(e.stage, e.todo) for e in started] == [("download", 0), ("chunk", 0), ("embed", 0)]
    assert started[0].total == 5  # the shards the first pass downloaded


def test_failed_shards_are_recorded_with_cause_and_retried_next_time(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    outcome = run_pass(plan, root, StandInMapper(plan, root, fail=["chunk:00000-0002"]))
    assert outcome.failed == {"chunk": ["00000-0002"]} and not outcome.ok
    m = manifest(plan, root)
    assert m["status"] == "failed"
    assert m["stages"]["chunk"]["failed"] == {"00000-0002": "RuntimeError: injected failure in chunk 00000-0002"}
    assert len(store.done_shards(store.embeddings_dir(root, plan.name, plan.embed.fingerprint))) == 4

    retry = StandInMapper(plan, root)
    assert run_pass(plan, root, retry).ok
    assert retry.calls["chunk"] == ["00000-0002"] and retry.calls["embed"] == ["00000-0002"]


def test_hands_over_at_the_deadline_and_the_next_pass_finishes(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    first = StandInMapper(plan, root)
    # a clock that moves one second per chunk shard submitted: the deadline falls after the third
    outcome = run_pass(plan, root, first, deadline=3, clock=lambda: float(len(first.calls["chunk"])))
    assert outcome.handover and not outcome.ok
    assert manifest(plan, root)["status"] == "handover"
    done_before = len(first.calls["chunk"])
    assert 0 < done_before < 5

    second = StandInMapper(plan, root)
    assert run_pass(plan, root, second).ok
    assert sorted(first.calls["chunk"] + second.calls["chunk"]) == [f"00000-{i:04d}" for i in range(5)]
    assert manifest(plan, root)["status"] == "succeeded"


def test_until_download_stops_after_the_index(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    mapper = StandInMapper(plan, root)
    outcome = run_pass(plan, root, mapper, until="download")
    assert outcome.stages_run == ["download"] and mapper.calls["chunk"] == []
    assert download_stage.read_index(root, plan.data) is not None


def test_limit_caps_rows_across_shards(tmp_path: Path) -> None:
    plan, root = setup(tmp_path)
    spec = tmp_path / "spec.yaml"
    plan = make_plan(load_spec(spec, sets=["dataset.limit=10"]), spec)
    assert run_pass(plan, root, StandInMapper(plan, root)).ok
    assert manifest(plan, root)["totals"]["documents"] == 10


def test_an_error_that_ends_the_pass_is_recorded_not_left_running(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from volembed_runner.errors import SourceError

    plan, root = setup(tmp_path)

    def unreachable(data):
        raise SourceError("cannot list org/data on the Hugging Face Hub: network unreachable")

    monkeypatch.setattr(sources, "list_tasks", unreachable)
    with pytest.raises(SourceError):
        run_pass(plan, root, StandInMapper(plan, root))
    m = manifest(plan, root)
    assert m["status"] == "failed" and "network unreachable" in m["error"]
