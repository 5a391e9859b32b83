"""`volembed-run calibrate SPEC` on Modal: the GPU probe, run through the real SDK against the fake control plane.

The probe is the job's own rendered app, run ephemerally; its `Embedder.probe` input is run by the fake with the
rendered module's own method body (`.local()`, entered as a container would be), talking to the TEI stand-in instead
of the router. What this checks: the probe is priced and confirmed before anything is created, its measured rate is
stored under the key the dry run reads, and the next dry run uses it, marked calibrated; its vectors are compared
with the reference library's (here the stand-in's reference vectors, which it answers unless told to drift), and a
run whose probe disagreed refuses to start without --yes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from modal._utils.async_utils import synchronizer
from typer.testing import CliRunner

from tests.fake_modal import Recorder, fake_modal_server
from volembed_runner import catalog
from volembed_runner.backends.modal import launch
from volembed_runner.cli import app
from volembed_runner.errors import BackendError
from volembed_runner.estimate import calibrate as calibrate_module
from volembed_runner.estimate import estimate, rates
from volembed_runner.estimate.cost import PROBE_RETRIES, PROBE_TIMEOUT_FACTOR, PROBE_TIMEOUT_FLOOR_S
from volembed_runner.estimate.prices import load_prices
from volembed_runner.estimate.rates import (
    calibration_key,
    calibration_path,
    load_calibrations,
    store_calibration,
    tei_rate,
)
from volembed_runner.loading import load_spec
from volembed_runner.plan import make_plan
from volembed_runner.run import check_quality

from .tei_server import FakeRouter, TEIServer, expected_vector

runner = CliRunner()

SPEC = """\
version: 1
name: probe-job
backend: modal
volume: vol-probe
dataset:
  files: [docs.jsonl]
chunking: {size: 32, overlap: 4}
embedding: {model: sentence-transformers/all-MiniLM-L6-v2}
compute: {gpu: L4, concurrency_limit: 2, allow_concurrent_inputs: 2, retries: 1, timeout: 600}
"""
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Probed:
    """The fake's container for `Embedder.probe`: each app launch.probe imports is entered as a GPU container."""

    def __init__(self, server: TEIServer) -> None:
        self.server = server
        self.modules: list[ModuleType] = []

    def imported(self, module: ModuleType) -> ModuleType:
        module.TEIRouter = FakeRouter  # type: ignore[attr-defined]
        module.TEI_URL = self.server.url  # type: ignore[attr-defined]
        self.modules.append(module)
        return module

    def probe(self, texts: list[str], n_tokens: list[int], keep: int) -> Any:
        embedder = self.modules[-1].Embedder()
        synchronizer._translate_in(embedder)._enter()  # .local() skips @modal.enter for async methods
        return asyncio.run(embedder.probe.local(texts, n_tokens, keep))


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    with (tmp_path / "docs.jsonl").open("w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"Document {i}. " + "Words of Zürich café and more. " * (i % 7 + 1)}) + "\n")
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Recorder, TEIServer]]:
    with TEIServer(max_client_batch_size=8, delay=0.02) as server, fake_modal_server() as rec:
        probed = Probed(server)
        real = launch.import_app
        monkeypatch.setattr(launch, "import_app", lambda path: probed.imported(real(path)))
        rec.workers["Embedder.probe"] = probed.probe
        monkeypatch.setattr(calibrate_module, "reference_vectors", lambda plan, texts, n_tokens: (
            np.stack([expected_vector(t, server.dim) for t in texts]), "the reference"))
        yield rec, server
        deadline = time.time() + 30
        while any(a.finished is None for a in rec.attempts) and time.time() < deadline:
            time.sleep(0.05)


def _gpus_probed(rec: Recorder) -> list[str]:
    """The GPU of the Embedder of each app whose probe input ran, in order."""
    gpus = []
    for req in rec.requests("FunctionCreate"):
        fn = req.function if req.HasField("function") else req.function_data.ranked_functions[0].function
        if fn.function_name == "Embedder.*":
            gpus.append(fn.resources.gpu_config.gpu_type)
    return gpus


@pytest.mark.slow
def test_the_probe_is_priced_before_it_runs_and_its_rate_calibrates_the_next_dry_run(
    spec: Path, fake: tuple[Recorder, TEIServer]
) -> None:
    rec, server = fake
    plan = make_plan(load_spec(spec), spec)
    before = estimate(plan)
    assert before.throughput["kind"] != "calibrated"
    dry = runner.invoke(app, [str(spec), "--dry-run"])
    assert f"not calibrated: the {before.throughput['kind']} rate" in dry.output and "uncalibrated:" not in dry.output
    assert f"quality: not checked: TEI's vectors for {MODEL} on L4 were not compared" in dry.output

    result = runner.invoke(app, ["calibrate", str(spec), "--chunks", "24", "--compare", "A10", "--yes"])
    assert result.exit_code == 0, result.output
    costs = [line for line in result.output.splitlines() if line.startswith("GPU probe on")]
    assert [line.split(":")[0] for line in costs] == ["GPU probe on L4", "GPU probe on A10"]
    assert all("≈ $" in line and "at most $" in line and "2 × " in line for line in costs)
    assert result.output.index("GPU probe on A10") < result.output.index("calibrated ")  # priced before it ran
    assert len(rec.attempts_of("Embedder.probe")) == 2 and _gpus_probed(rec) == ["L4", "A10"]
    assert len(server.embedded) >= 2 * 2 * 24  # per GPU: the sample once to warm up, once timed

    stored = json.loads(calibration_path().read_text())["entries"]
    l4, a10 = stored[f"modal|{MODEL}|L4|tei"], stored[f"modal|{MODEL}|A10|tei"]
    assert l4["image"].endswith(":89-1.9.3") and a10["image"].endswith(":86-1.9.3")
    assert l4["chunks"] == 24 and l4["probe"] and l4["warmup_seconds"] > 0 and l4["cold_start_seconds"] >= 0
    assert l4["quality"]["checked"] and l4["quality"]["min_cosine"] > 0.9999 and l4["quality"]["chunks"] == 16
    # The stand-in sleeps 20 ms per request: the measured rate is the stand-in's, far below the catalog's.
    assert l4["tokens_per_second"] < before.throughput["tokens_per_second"] / 10

    after = estimate(plan)
    assert after.throughput["kind"] == "calibrated"
    assert after.throughput["tokens_per_second"] == pytest.approx(l4["tokens_per_second"])
    assert "24 chunks" in after.throughput["source"] and l4["image"] in after.throughput["source"]
    assert after.cost_usd > before.cost_usd  # a slower GPU than the catalog said: more GPU-hours
    a10_row = next(r for r in after.alternatives if r["gpu"] == "A10")
    assert a10_row["rate_kind"] == "calibrated"
    assert after.uncalibrated["tokens_per_second"] == pytest.approx(before.throughput["tokens_per_second"])
    assert after.uncalibrated["cost_usd"] == pytest.approx(before.cost_usd)
    dry = runner.invoke(app, [str(spec), "--dry-run"])
    total = next(line for line in dry.output.splitlines() if line.startswith("total:"))
    assert total.endswith("(calibrated rate)") and "not calibrated" not in dry.output
    side = next(line for line in dry.output.splitlines() if line.startswith("uncalibrated:"))
    assert f"at the {before.throughput['kind']} rate ({before.throughput['tokens_per_second']:,.0f} tokens/s)" in side


def test_a_probe_over_max_cost_is_refused_before_anything_is_created(
    spec: Path, fake: tuple[Recorder, TEIServer]
) -> None:
    rec, _ = fake
    result = runner.invoke(app, ["calibrate", str(spec), "--chunks", "8", "--set", "compute.max_cost=0.000001"])
    assert result.exit_code == 4
    assert "exceeds compute.max_cost" in result.output and "Traceback" not in result.output
    assert not rec.requests("AppCreate") and not rec.attempts_of("Embedder.probe")
    assert not calibration_path().exists()


def test_a_probe_whose_vectors_disagree_blocks_the_run_without_yes(
    spec: Path, fake: tuple[Recorder, TEIServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, server = fake
    server.drift = 3.0  # TEI answers vectors off the reference (as TEI #642 reports for Qwen3 embeddings)
    assert runner.invoke(app, ["calibrate", str(spec), "--chunks", "8", "--yes"]).exit_code == 0
    quality = json.loads(calibration_path().read_text())["entries"][f"modal|{MODEL}|L4|tei"]["quality"]
    assert quality["checked"] and quality["min_cosine"] < 0.5
    launched: list[str] = []
    monkeypatch.setattr(launch, "run", lambda plan, **kw: launched.append(plan.name) or launch.Launched(
        plan.name, "ap-1", "fc-1", detached=True))
    refused = runner.invoke(app, [str(spec)])
    assert refused.exit_code == 4 and not launched
    (line,) = refused.output.strip().splitlines()
    assert f"TEI's vectors for {MODEL} on L4 at min cosine {quality['min_cosine']:.4f}" in line and "--yes" in line
    assert runner.invoke(app, [str(spec), "--yes"]).exit_code == 0 and launched == ["probe-job"]


@pytest.mark.slow
def test_the_reference_is_sentence_transformers_where_the_model_resolves_here(spec: Path) -> None:
    plan = make_plan(load_spec(spec), spec)
    sample = calibrate_module.sample_of(plan, 4)
    reference, library = calibrate_module.reference_vectors(plan, sample.texts, sample.n_tokens)
    assert library.startswith("sentence-transformers ") and reference.shape == (4, 384)
    same = calibrate_module.quality(plan, sample.texts, sample.n_tokens, reference.tolist())
    assert same["checked"] and same["min_cosine"] > 0.9999
    off = calibrate_module.quality(plan, sample.texts, sample.n_tokens, (-reference).tolist())
    assert off["min_cosine"] < -0.99


def _probed_at(plan: Any, min_cosine: float) -> None:
    """A stored GPU probe of `plan`'s (model, GPU) whose vectors agreed with the reference to `min_cosine`."""
    key = calibration_key("modal", plan.model.ref, plan.compute.gpu, "tei")
    store_calibration({"key": key, "backend": "modal", "model": plan.model.ref, "device": plan.compute.gpu,
                       "engine": "tei", "tokens_per_second": 50_000.0, "chunks": 16, "probe": True,
                       "image": rates.current_image(plan.compute.gpu),
                       "date": "2026-12-01T10:00:00+00:00",
                       "quality": {"checked": True, "min_cosine": min_cosine, "mean_cosine": min_cosine + 0.0005,
                                   "chunks": 16, "reference": "the reference"}})


def test_the_quality_threshold_is_the_models_own_where_the_catalog_sets_one_else_the_default(spec: Path) -> None:
    minilm = make_plan(load_spec(spec), spec)
    bge = make_plan(load_spec(spec, ["embedding.model=BAAI/bge-base-en-v1.5"]), spec)
    assert catalog.find_model("BAAI/bge-base-en-v1.5").min_probe_cosine == 0.999
    assert catalog.find_model(MODEL).min_probe_cosine is None
    for plan in (minilm, bge):
        _probed_at(plan, 0.995)  # fp16 drift a BERT-class model shows under the default, over bge-base's own
    check_quality(minilm, yes=False)  # 0.995 ≥ the default 0.99: starts
    with pytest.raises(BackendError) as refused:
        check_quality(bge, yes=False)
    line = str(refused.value)
    assert "\n" not in line and "BAAI/bge-base-en-v1.5 on L4 at min cosine 0.9950" in line
    assert "under 0.999 (its min_probe_cosine in volembed_runner/catalog/models.yaml)" in line and "--yes" in line
    check_quality(bge, yes=True)
    _probed_at(minilm, 0.985)
    with pytest.raises(BackendError, match=f"{MODEL} on L4 at min cosine 0.9850 .* under 0.99 \\(the default"):
        check_quality(minilm, yes=False)
    assert "under 0.999 for BAAI/bge-base-en-v1.5" in estimate(bge).quality


def test_the_probe_call_runs_under_its_own_short_limits_and_its_at_most_is_priced_from_them(
    spec: Path, fake: tuple[Recorder, TEIServer]
) -> None:
    rec, _ = fake
    plan = make_plan(load_spec(spec, ["compute.timeout=3600", "compute.retries=3"]), spec)
    sample = calibrate_module.sample_of(plan, 8)
    (cost,) = calibrate_module.probe_costs([plan], sample, load_prices(None))
    rate = tei_rate(MODEL, "L4")
    assert cost.retries == PROBE_RETRIES == 0
    work = 2 * sample.processed / rate.low
    assert cost.timeout_s == max(PROBE_TIMEOUT_FLOOR_S, math.ceil(PROBE_TIMEOUT_FACTOR * work))
    per_second = load_prices(None).container(1.0, plan.compute.embed.cpu, plan.compute.embed.memory_gib, "L4")
    assert cost.max_cost_usd == pytest.approx((plan.compute.embed_startup_timeout_s + cost.timeout_s) * per_second)
    job_worst = 4 * (plan.compute.embed_startup_timeout_s + 3600) * per_second  # the job's limits, as before
    assert cost.max_cost_usd < job_worst / 10

    result = runner.invoke(app, ["calibrate", str(spec), "--chunks", "8", "--yes", "--set", "compute.timeout=3600",
                                 "--set", "compute.retries=3"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("GPU probe on L4"))
    assert f"at most ${cost.max_cost_usd:,.2f}" in line
    assert f"at most 1 attempt(s) × (startup 1,200 s + the probe's timeout {cost.timeout_s:,} s)" in line
    # The call went to a variant of the Embedder with the probe's options (Cls.with_options → FunctionBindParams).
    (bound,) = rec.requests("FunctionBindParams")
    assert bound.function_options.timeout_secs == cost.timeout_s
    assert bound.function_options.retry_policy.retries == 0
    (attempt,) = rec.attempts_of("Embedder.probe")
    fn = rec.functions()["Embedder.*"]
    assert fn.timeout_secs == 3600 and fn.retry_policy.retries == 3  # the run's own Embedder keeps the job's
    assert attempt.status is not None


def _finished_run(status: str, tokens_per_second: float | None, finished_at: str, image: str) -> dict[str, Any]:
    """A Modal run's manifest as its orchestrator leaves it (`budget.Meter.record` under `cost`)."""
    measured = None if tokens_per_second is None else {
        "model": MODEL, "gpu": "L4", "image": image, "tokens_per_second": tokens_per_second, "units": 12,
        "processed_tokens": 120_000, "gpu_seconds": 120_000 / tokens_per_second}
    return {"name": "probe-job", "backend": "modal", "status": status, "finished_at": finished_at,
            "cost": {"spent_usd": 1.0, "measured": measured}}


def test_the_newest_of_a_probe_and_a_runs_measured_rate_wins_and_a_run_without_one_records_nothing(
    spec: Path,
) -> None:
    plan = make_plan(load_spec(spec), spec)
    image = rates.current_image("L4")
    key = calibration_key("modal", MODEL, "L4", "tei")
    for status, tps in (("running", 9_000.0), ("failed", None), ("stopped", None), ("handover", 9_000.0)):
        assert rates.store_run_rate(_finished_run(status, tps, "2026-12-02T10:00:00Z", image)) is None
    assert not calibration_path().exists()

    _probed_at(plan, 0.9999)  # a GPU probe on 2026-12-01T10:00
    stored = rates.store_run_rate(_finished_run("succeeded", 12_345.0, "2026-12-02T10:00:00Z", image))
    assert stored is not None and load_calibrations()[key]["quality"]["min_cosine"] == 0.9999  # the probe's check
    rate = tei_rate(MODEL, "L4")
    assert rate.tokens_per_second == 12_345.0 and rate.kind == "calibrated"
    assert rate.source.startswith("measured on run probe-job 2026-12-02T10:00:00Z: 12,345 tokens/s per L4 over 12")
    # An older run read later (`status` of a detached run) does not displace the newer measurement ...
    assert rates.store_run_rate(_finished_run("stopped", 999.0, "2026-11-30T10:00:00Z", image)) is None
    assert tei_rate(MODEL, "L4").tokens_per_second == 12_345.0
    # ... a later probe does, and a figure measured on another TEI image is not used.
    store_calibration({**load_calibrations()[key], "run": None, "tokens_per_second": 20_000.0,
                       "date": "2026-12-03T10:00:00+00:00"})
    assert rates.store_run_rate(_finished_run("succeeded", 12_345.0, "2026-12-02T10:00:00Z", image)) is None
    assert tei_rate(MODEL, "L4").tokens_per_second == 20_000.0
    store_calibration({**load_calibrations()[key], "image": "ghcr.io/huggingface/text-embeddings-inference:89-0.1"})
    assert tei_rate(MODEL, "L4").kind != "calibrated"
