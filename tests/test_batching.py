"""The local engine's batch budget: a sweep keeps the fastest candidate, the plan reuses a stored sweep only for the
same weights, runtime, precision, device and threads, and `calibrate` measures and stores it (fake engine, fake
clock; the real engine's side is in test_local_embedder.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from volembed_runner import batching, catalog
from volembed_runner.cli import app
from volembed_runner.estimate.calibrate import calibrate
from volembed_runner.loading import load_spec
from volembed_runner.models import resolve_model_dir, weights_fingerprint
from volembed_runner.plan import Plan, make_plan, volembed_home

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DOCS = ["Rivers carry water from mountains to the sea, and the sea returns it as rain. " * (1 + i % 5)
        for i in range(40)]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plan_for(tmp_path: Path, precision: str = "bf16") -> Plan:
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS), encoding="utf-8")
    spec = {"version": 1, "name": "local", "backend": "local", "volume": "v", "dataset": {"files": ["docs.jsonl"]},
            "chunking": {"size": 64, "overlap": 8, "workers": 1},
            "embedding": {"model": MINILM, "precision": precision}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return make_plan(load_spec(path), path)


def store_choice(plan: Plan, tokens: int, **key: Any) -> None:
    """Store a sweep that chose `tokens` under the plan's key, with any part of the key replaced."""
    parts = {"weights": weights_fingerprint(resolve_model_dir(MINILM, download=False)), "runtime": plan.embed.runtime,
             "precision": plan.embed.precision, "device": plan.machine.device, "threads": plan.machine.cores, **key}
    seconds = {t: (1.0 if t == tokens else 2.0) for t in batching.candidates(plan.machine.device)}
    batching.store_sweep(volembed_home(), batching.budget_key(**parts), batching.Sweep(seconds),
                         device=plan.machine.device, chunks=10, tokens=1000)


def test_the_sweep_keeps_the_fastest_candidate_by_its_best_pass() -> None:
    clock = FakeClock()
    cost = {2048: [3.0, 2.5], 4096: [1.5, 0.75], 8192: [1.0, 1.25], 16384: [4.0, 4.0]}  # seconds per pass, by round
    calls: list[int] = []

    def run(tokens: int) -> None:
        clock.now += cost[tokens][sum(1 for t in calls if t == tokens)]
        calls.append(tokens)

    result = batching.sweep(run, list(cost), rounds=2, clock=clock)
    assert calls == [2048, 4096, 8192, 16384] * 2  # rounds interleave the candidates
    assert result.seconds == {2048: 2.5, 4096: 0.75, 8192: 1.0, 16384: 4.0}
    assert result.best == 4096


def test_a_tie_keeps_the_smaller_budget() -> None:
    assert batching.Sweep({8192: 1.0, 4096: 1.0, 16384: 3.0}).best == 4096


def test_without_a_stored_sweep_the_plan_uses_the_catalogs_measured_default(tmp_path: Path) -> None:
    plan = plan_for(tmp_path)
    row = catalog.throughput()["local"]["batch"]["cpu"]
    assert plan.embed.batch_tokens == row["tokens"] and not plan.embed.batch_measured
    assert plan.embed.batch_texts == row["tokens"] // row["tokens_per_text"]
    assert row["source"] in plan.embed.batch_source and "calibrate" in plan.embed.batch_source
    assert "measured" in row["source"]  # the default says where it was measured


def test_a_stored_sweep_is_reused_for_the_same_settings_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import volembed_runner.plan as plan_module

    plan = plan_for(tmp_path)
    store_choice(plan, 2048, threads=plan.machine.cores + 1)  # another thread count
    store_choice(plan, 4096, precision="fp32")  # another precision
    store_choice(plan, 16384, runtime="torch" if plan.embed.runtime == "openvino" else "openvino")
    assert not plan_for(tmp_path).embed.batch_measured
    store_choice(plan, 2048)
    again = plan_for(tmp_path)
    assert (again.embed.batch_tokens, again.embed.batch_measured) == (2048, True)
    assert again.embed.batch_texts == batching.texts_for(2048, "cpu")
    assert "measured" in again.embed.batch_source and "2,048, 4,096, 8,192, 16,384" in again.embed.batch_source
    assert again.embed.fingerprint == plan.embed.fingerprint  # the budget changes no vector, so no output folder
    assert plan_for(tmp_path, precision="fp32").embed.batch_tokens == 4096
    monkeypatch.setattr(plan_module, "usable_cores", lambda: plan.machine.cores + 1)
    assert plan_for(tmp_path).embed.batch_tokens == 2048 and plan_for(tmp_path).machine.cores == plan.machine.cores + 1
    monkeypatch.setattr(plan_module, "usable_cores", lambda: plan.machine.cores + 2)
    assert not plan_for(tmp_path).embed.batch_measured


class FakeEngine:
    """The local engine's surface that calibrate uses; each pass costs seconds by its batch budget."""

    instances: list[FakeEngine] = []
    cost = {2048: 0.5, 4096: 0.3, 8192: 0.4, 16384: 0.6}
    clock = FakeClock()

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.path = resolve_model_dir(MINILM, download=False)
        self.runtime, self.precision, self.device = kwargs["runtime"], kwargs["precision"], kwargs["device"]
        self.threads = kwargs["threads"]
        self.batch_tokens, self.max_batch_size = kwargs["batch_tokens"], kwargs["max_batch_size"]
        FakeEngine.instances.append(self)

    def embed(self, texts: list[str], n_tokens: list[int]) -> np.ndarray:
        self.clock.now += self.cost[self.batch_tokens] * len(texts) / 40
        return np.zeros((len(texts), 384), dtype=np.float32)


def test_calibrate_sweeps_the_budget_and_the_next_plan_uses_the_fastest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from volembed_runner.embedders import local as local_engine

    monkeypatch.setattr(local_engine, "LocalEmbedder", FakeEngine)
    plan = plan_for(tmp_path)
    entry = calibrate(plan, sample_chunks=40, clock=FakeEngine.clock)
    engine = FakeEngine.instances[-1]
    assert engine.kwargs["batch_tokens"] == plan.embed.batch_tokens  # it starts from the plan's budget
    assert entry["batch"]["batch_tokens"] == 4096 and engine.batch_tokens == 4096
    assert entry["seconds"] == pytest.approx(0.3 * entry["chunks"] / 40)  # the rate is the fastest budget's
    assert entry["tokens_per_second"] == pytest.approx(entry["processed_tokens"] / entry["seconds"])
    assert Path(entry["batch"]["path"]) == volembed_home() / batching.BUDGETS_FILE
    after = plan_for(tmp_path)
    assert (after.embed.batch_tokens, after.embed.batch_measured) == (4096, True)


def test_calibrate_prints_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from volembed_runner.embedders import local as local_engine
    from volembed_runner.estimate import calibrate as calibrate_module

    monkeypatch.setattr(local_engine, "LocalEmbedder", FakeEngine)
    monkeypatch.setattr(calibrate_module, "time", SimpleNamespace(perf_counter=FakeEngine.clock))
    plan_for(tmp_path)
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "spec.yaml"), "--chunks", "40"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("batch budget sweep"))
    assert "2,048" in line and "16,384" in line and "kept 4,096 tokens x 16 texts" in line
    assert str(volembed_home() / batching.BUDGETS_FILE) in result.output.replace("\n", "")


def test_the_manifest_records_the_batch_budget_of_a_local_run(finished_run: tuple[Path, Path]) -> None:
    _, home = finished_run
    manifest = json.loads(next(home.glob("volumes/*/runs/after/manifest.json")).read_text(encoding="utf-8"))
    engine = manifest["engine"]
    row = catalog.throughput()["local"]["batch"]["cpu"]
    assert engine["batch_tokens"] == row["tokens"] and engine["batch_measured"] is False
    assert engine["runtime"] in ("openvino", "torch")
