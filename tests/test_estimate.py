"""The dry run: counts from metadata and samples, time and cost, the seeds' published figures, calibration."""

from __future__ import annotations

import io
import json
import math
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from volembed_runner import catalog, chunking, estimate, models
from volembed_runner.cli import _load, app
from volembed_runner.errors import BackendError, SpecError
from volembed_runner.estimate.calibrate import calibrate
from volembed_runner.ui.estimate import render

from .conftest import REPO

runner = CliRunner()

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = ["river", "mountain", "Zürich", "café", "naïve", "data", "embedding", "token", "window", "chunk", "model",
         "vector", "search", "index", "archive", "library", "museum", "theory", "quantum", "garden", "harbour", "1987",
         "well-known", "re-entry"]

# English Wikipedia as Modal's "Embedding Wikipedia" example counted it (the 20220301.en dump: 19,560,538,957
# characters, https://github.com/modal-labs/modal-examples/tree/main/06_gpu_and_ml/embeddings/wikipedia), bge-base
# on 50 A10G. Not in the datasets catalog, so the Hub paths below are the ones taken when the hints are removed.
WIKIPEDIA = {
    "version": 1, "name": "wikipedia", "backend": "modal", "volume": "v",
    "dataset": {"hf": "legacy-datasets/wikipedia", "config": "20220301.en", "num_rows": 6_458_670,
                "num_bytes": 19_560_538_957},
    "chunking": {"size": 510, "overlap": 0},  # "512-token chunks": 510 + [CLS]/[SEP] is bge-base's limit
    "embedding": {"model": "BAAI/bge-base-en-v1.5"},
    "compute": {"gpu": "A10G", "concurrency_limit": 50, "allow_concurrent_inputs": 4},
}
# FineWeb-edu sample-10BT as fineweb-modal ran it (https://github.com/enjalot/fineweb-modal): 9.6M documents, nomic
# on A10G. Its source bytes
# are not published: 10.5e9 chunk tokens - 50 x (25e6 - 9.6e6) overlap tokens - 2 x 9.6e6 specials = 9.71e9 text
# tokens, x 4.836 bytes/token (catalog ratio) = 46.96e9 bytes.
FINEWEB = {
    "version": 1, "name": "fineweb", "backend": "modal", "volume": "v",
    "dataset": {"hf": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "num_rows": 9_600_000,
                "num_bytes": 46_963_000_000},
    "chunking": {"size": 500, "overlap": 0.1},
    "embedding": {"model": "nomic-ai/nomic-embed-text-v1.5", "prefix": "search_document: "},
    "compute": {"gpu": "A10G", "concurrency_limit": 10, "allow_concurrent_inputs": 4},
}


def merged(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """`base` with some sections' keys replaced (None removes a key)."""
    out = json.loads(json.dumps(base))
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(out.get(name), dict):
            out[name].update(values)
            out[name] = {k: v for k, v in out[name].items() if v is not None}
        else:
            out[name] = values
    return out


@pytest.fixture
def plan_of(tmp_path: Path):
    """Write a spec dict as YAML and load it the way the CLI does."""

    def make(spec: dict[str, Any], name: str = "spec.yaml") -> Any:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return _load(path, None)

    return make


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail (and record) any attempt to open a network connection."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def stage(est: estimate.Estimate, name: str) -> estimate.Stage:
    return next(s for s in est.stages if s.name == name)


def within(value: float, target: float, tolerance: float = 0.30) -> bool:
    return abs(value - target) <= tolerance * target


def rendered(est: estimate.Estimate) -> str:
    buffer = io.StringIO()
    render(est, Console(file=buffer, width=200, highlight=False))
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- the seeds' figures


def test_wikipedia_on_50_a10g_takes_about_the_tutorials_30_minutes(plan_of, no_network) -> None:
    est = estimate.estimate(plan_of(WIKIPEDIA))
    embed = stage(est, "embed")
    assert est.effective_gpus == 50
    assert 25 * 60 <= embed.seconds <= 40 * 60
    assert within(embed.seconds, 30 * 60)
    assert est.documents == 6_458_670
    assert within(est.tokens, 19_560_538_957 / 4.836, 0.001)
    assert est.cost_usd is not None and est.cost_usd > 0
    assert not no_network, "a spec with size hints must not touch the network"


def test_fineweb_on_a10g_takes_about_45_gpu_hours_and_50_dollars(plan_of, no_network) -> None:
    est = estimate.estimate(plan_of(FINEWEB))
    embed = stage(est, "embed")
    assert within(est.chunks, 25e6)
    assert within(est.embedded_tokens, 10.5e9)
    assert within(est.gpu_hours, 45)
    assert within(embed.gpu_cost_usd, 50)
    assert est.cost_usd >= embed.cost_usd >= embed.gpu_cost_usd  # host CPU/memory, other stages and storage on top
    assert not no_network


# ------------------------------------------------------------------------------------------------- unknowns


def test_no_sizes_and_no_hub_means_unknown_cost_never_zero(plan_of) -> None:
    spec = merged(WIKIPEDIA, dataset={"num_rows": None, "num_bytes": None})
    est = estimate.estimate(plan_of(spec))
    assert est.cost_usd is None and est.wall_seconds is None and est.tokens is None
    assert any("could not read Hub metadata" in a for a in est.assumptions)
    assert est.unknown
    text = rendered(est)
    assert "unknown" in text and "$0.00" not in text
    assert all(a["cost_usd"] is None for a in est.alternatives)


def test_unreachable_hub_is_bounded_and_reported(plan_of, no_network, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    spec = merged(WIKIPEDIA, dataset={"num_bytes": None})
    started = time.monotonic()
    est = estimate.estimate(plan_of(spec), hub_timeout=5)
    assert time.monotonic() - started < 8
    assert any(a.startswith("could not read Hub metadata:") for a in est.assumptions)
    assert est.documents == 6_458_670 and est.tokens is None and est.cost_usd is None


def test_a_hanging_hub_call_times_out(plan_of, monkeypatch: pytest.MonkeyPatch) -> None:
    from volembed_runner import sources

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(sources, "list_tasks", lambda data: time.sleep(30))
    started = time.monotonic()
    est = estimate.estimate(plan_of(merged(WIKIPEDIA, dataset={"num_rows": None})), hub_timeout=0.5)
    assert time.monotonic() - started < 3
    assert any("timed out" in a for a in est.assumptions)
    assert est.cost_usd is not None  # the byte hint still gives tokens; the missing row count gives a warning
    assert any("document count unknown" in w for w in est.warnings)


# ----------------------------------------------------------------------------------------- output and prices


def test_alternatives_are_every_other_gpu_sorted_by_cost(plan_of) -> None:
    est = estimate.estimate(plan_of(WIKIPEDIA))
    gpus = [a["gpu"] for a in est.alternatives]
    assert sorted(gpus) == sorted(set(catalog.gpus()) - {"A10"})
    costs = [a["cost_usd"] for a in est.alternatives]
    assert costs == sorted(costs)
    scaled = [a for a in est.alternatives if a["rate_kind"] == "scaled"]
    assert scaled and all(a["tokens_per_second"] <= 200_000 for a in scaled)


def test_dry_run_json_has_the_documented_keys(tmp_path: Path) -> None:
    spec = tmp_path / "wiki.yaml"
    spec.write_text(yaml.safe_dump(WIKIPEDIA), encoding="utf-8")
    result = runner.invoke(app, ["run", str(spec), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("documents", "tokens", "chunks", "embedded_tokens", "stages", "gpu_seconds", "wall_seconds",
                "cost_usd", "alternatives", "assumptions", "warnings", "sample", "interval"):
        assert key in data
    for row in data["stages"]:
        assert {"name", "containers", "cpu_hours", "gpu_hours", "seconds", "cost_usd"} <= set(row)
    for row in data["alternatives"]:
        assert {"gpu", "wall_seconds", "gpu_hours", "cost_usd"} <= set(row)


def test_price_override_scales_cost_proportionally(plan_of, tmp_path: Path) -> None:
    plan = plan_of(FINEWEB)
    base = estimate.estimate(plan)
    raw = catalog.gpu_table()
    doubled = {name: 2 * g.usd_per_second for name, g in catalog.gpus().items()}
    doubled.update({key: 2 * raw[key] for key in ("cpu_usd_per_core_second", "memory_usd_per_gib_second",
                                                   "volume_usd_per_gib_month")})
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(doubled), encoding="utf-8")
    est = estimate.estimate(plan, prices=prices)
    assert est.cost_usd == pytest.approx(2 * base.cost_usd, rel=1e-9)
    assert est.wall_seconds == pytest.approx(base.wall_seconds)
    assert "prices from" in est.prices


def test_price_override_of_one_gpu_changes_only_its_gpu_cost(plan_of, tmp_path: Path) -> None:
    plan = plan_of(FINEWEB)
    base = estimate.estimate(plan)
    prices = tmp_path / "prices.yaml"
    prices.write_text("A10G: 0.000612\n", encoding="utf-8")  # an alias, twice the catalog's A10 price
    est = estimate.estimate(plan, prices=prices)
    assert stage(est, "embed").gpu_cost_usd == pytest.approx(2 * stage(base, "embed").gpu_cost_usd)
    assert stage(est, "chunk").cost_usd == pytest.approx(stage(base, "chunk").cost_usd)


def test_bad_price_file_names_the_key(plan_of, tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("B9000: 0.1\n", encoding="utf-8")
    with pytest.raises(SpecError, match="B9000"):
        estimate.estimate(plan_of(FINEWEB), prices=prices)
    prices.write_text("A10: -1\n", encoding="utf-8")
    with pytest.raises(SpecError, match="A10"):
        estimate.estimate(plan_of(FINEWEB), prices=prices)


def test_unknown_gpu_price_makes_cost_unknown(plan_of, tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("A10: null\n", encoding="utf-8")
    est = estimate.estimate(plan_of(FINEWEB), prices=prices)
    assert est.cost_usd is None and est.wall_seconds is not None
    assert "unknown" in rendered(est)


def test_concurrency_above_a_modal_plan_cap_warns(plan_of) -> None:
    est = estimate.estimate(plan_of(merged(FINEWEB, compute={"concurrency_limit": 20})))
    assert any("Starter 10" in w for w in est.warnings)
    assert not any("Team 50" in w for w in est.warnings)


@pytest.mark.parametrize("inputs", [40, 4])
def test_the_tutorials_fleet_fills_every_gpu_with_default_sharding(plan_of, inputs: int) -> None:
    # Modal's tutorial: 50 A10G with 40 inputs each; the default shard_rows makes 146 chunk shards.
    est = estimate.estimate(plan_of(merged(WIKIPEDIA, compute={"allow_concurrent_inputs": inputs})))
    assert est.effective_gpus == 50
    assert not any("GPU containers get work" in w for w in est.warnings)
    assert within(est.wall_seconds, 30 * 60)
    units = next(a for a in est.assumptions if a.startswith("embed units:"))
    assert int(units.split()[2].replace(",", "")) >= 50 * inputs  # every input slot has a unit


def test_a_small_job_still_spreads_over_every_gpu(plan_of) -> None:
    est = estimate.estimate(plan_of(merged(WIKIPEDIA, dataset={"limit": 2_000})))
    assert est.effective_gpus == 50  # every input slot gets a unit, however small, rather than idle GPUs


def test_limit_scales_hinted_sizes(plan_of) -> None:
    full = estimate.estimate(plan_of(FINEWEB))
    tenth = estimate.estimate(plan_of(merged(FINEWEB, dataset={"limit": 0.1})))
    assert tenth.documents == 960_000
    assert tenth.tokens == pytest.approx(full.tokens / 10, rel=1e-6)
    assert tenth.embedded_tokens == pytest.approx(full.embedded_tokens / 10, rel=1e-3)


# ------------------------------------------------------------------------------------------------ local files


def make_texts(n: int, seed: int = 0, lo: int = 0, hi: int = 180) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def exact_counts(texts: list[str], size: int, overlap: int) -> tuple[int, int, int, int]:
    tok = chunking.load_tokenizer(models.tokenizer_file(MINILM))
    cols = chunking.chunk_texts(tok, texts, size, overlap)
    return cols.documents, cols.doc_tokens, len(cols), sum(cols.n_tokens)


def local_spec(files: list[str], **dataset: Any) -> dict[str, Any]:
    return {"version": 1, "name": "local", "backend": "local", "volume": "v",
            "dataset": {"files": files, **dataset}, "chunking": {"size": 64, "overlap": 8, "workers": 2},
            "embedding": {"model": MINILM, "precision": "fp32"}}


def test_parquet_rows_come_exactly_from_the_footers(plan_of, tmp_path: Path) -> None:
    for i, n in enumerate((400, 734, 100)):
        texts = make_texts(n, seed=i)
        pq.write_table(pa.table({"text": texts}), tmp_path / f"part-{i}.parquet", row_group_size=128)
    est = estimate.estimate(plan_of(local_spec(["part-*.parquet"])), sample_cap=300)
    assert est.documents == 1234
    assert not est.sample["complete"]
    assert any("parquet footers" in a for a in est.assumptions)


def test_whole_small_dataset_is_counted_exactly_like_the_chunker(plan_of, tmp_path: Path) -> None:
    texts = make_texts(300, seed=1) + ["", "   "]
    with (tmp_path / "docs.jsonl").open("w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"text": t, "title": f"doc {i}"}) + "\n")
            if i % 50 == 0:
                fh.write("\n")  # blank lines are skipped, as in the download stage
    est = estimate.estimate(plan_of(local_spec(["docs.jsonl"])))
    assert (est.documents, est.tokens, est.chunks, est.embedded_tokens) == exact_counts(texts, 64, 8)
    assert est.sample["complete"] and est.interval["tokens"][0] == est.interval["tokens"][1]


def test_template_and_limit_select_the_same_rows_as_the_download(plan_of, tmp_path: Path) -> None:
    titles, bodies = make_texts(200, seed=2, hi=5), make_texts(200, seed=3)
    records = {f"k{i}": {"title": t, "body": b} for i, (t, b) in enumerate(zip(titles, bodies, strict=True))}
    (tmp_path / "records.json").write_text(json.dumps(records), encoding="utf-8")
    spec = local_spec(["records.json"], text_template="{title}\n\n{body}", limit=0.25)
    est = estimate.estimate(plan_of(spec))
    rendered_texts = [f"{t}\n\n{b}" for t, b in zip(titles, bodies, strict=True)][:50]
    assert (est.documents, est.tokens, est.chunks, est.embedded_tokens) == exact_counts(rendered_texts, 64, 8)


def test_sampled_tokens_are_within_two_percent_of_the_exact_count(plan_of, tmp_path: Path) -> None:
    texts = make_texts(12_000, seed=4, lo=5, hi=120)
    with (tmp_path / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    est = estimate.estimate(plan_of(local_spec(["corpus.jsonl"])))
    docs, tokens, chunks, embedded = exact_counts(texts, 64, 8)
    assert est.documents == docs and est.sample["documents"] < docs
    assert within(est.tokens, tokens, 0.02) and within(est.chunks, chunks, 0.02)
    assert within(est.embedded_tokens, embedded, 0.02)
    low, high = est.interval["tokens"]
    assert low <= tokens <= high


def test_empty_dataset_is_zero_documents_with_a_warning(plan_of, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    est = estimate.estimate(plan_of(local_spec(["empty.jsonl"])))
    assert (est.documents, est.tokens, est.chunks) == (0, 0, 0)
    assert any("no rows" in w for w in est.warnings)


def test_local_backend_spends_nothing_and_prices_the_job_on_modal(plan_of, tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(50)), "utf-8")
    est = estimate.estimate(plan_of(local_spec(["docs.jsonl"])))
    assert est.cost_usd == 0.0 and est.wall_seconds and est.wall_seconds > 0
    assert "local: no spend" in rendered(est)
    assert est.to_dict()["cost_note"] == "local: no spend"
    assert {a["gpu"] for a in est.alternatives} == set(catalog.gpus())
    costs = [a["cost_usd"] for a in est.alternatives]
    assert all(c is not None and c > 0 for c in costs) and costs == sorted(costs)
    assert est.throughput["kind"] == "default"


def test_without_any_tokenizer_tokens_come_from_text_bytes(plan_of, tmp_path: Path) -> None:
    texts = make_texts(40)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
    spec = merged(local_spec(["docs.jsonl"]), embedding={"model": "someone/unknown-model", "precision": None},
                  backend="modal")
    est = estimate.estimate(plan_of(spec))
    ratio = catalog.throughput()["bytes_per_token"]["default"]["value"]
    assert est.documents == 40 and est.sample["documents"] == 0
    assert est.tokens == round(sum(len(t.encode()) for t in texts) / ratio)
    assert est.cost_usd is not None and any("no tokenizer" in w for w in est.warnings)


def test_model_without_local_tokenizer_uses_a_same_family_stand_in(plan_of, tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(30)), "utf-8")
    spec = merged(local_spec(["docs.jsonl"]), embedding={"model": "BAAI/bge-base-en-v1.5", "precision": None},
                  backend="modal")
    est = estimate.estimate(plan_of(spec))
    assert any("standing in offline" in a for a in est.assumptions)
    assert (est.documents, est.tokens) == exact_counts(make_texts(30), 64, 8)[:2]


# ---------------------------------------------------------------------------------------------------- calibrate


def test_calibrate_on_modal_needs_credentials(plan_of) -> None:
    with pytest.raises(BackendError, match="calibrate on modal needs Modal credentials"):
        calibrate(plan_of(FINEWEB))


def test_calibrate_cli_on_modal_is_a_one_line_error(tmp_path: Path) -> None:
    spec = tmp_path / "fw.yaml"
    spec.write_text(yaml.safe_dump(FINEWEB), encoding="utf-8")
    result = runner.invoke(app, ["calibrate", str(spec)])
    assert result.exit_code == 4
    assert "no Modal credentials: run `modal setup`" in result.output and "Traceback" not in result.output


def test_injected_modal_measurement_is_stored_and_used(plan_of, tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(80)), "utf-8")
    plan = plan_of(merged(local_spec(["docs.jsonl"]), backend="modal",
                          embedding={"model": MINILM, "precision": None}))
    entry = calibrate(plan, sample_chunks=32, runner=lambda texts, n_tokens: len(texts) / 1000)
    assert entry["key"] == f"modal|{MINILM}|A10|tei" and entry["chunks"] == 32
    assert entry["tokens_per_second"] == pytest.approx(entry["processed_tokens"] / 0.032)
    stored = json.loads(Path(entry["path"]).read_text(encoding="utf-8"))
    assert entry["key"] in stored["entries"]
    est = estimate.estimate(plan)
    assert est.throughput["kind"] == "calibrated"
    assert est.throughput["tokens_per_second"] == pytest.approx(entry["tokens_per_second"])
    assert any("calibrated on Modal" in a for a in est.assumptions)
    l4 = next(a for a in est.alternatives if a["gpu"] == "L4")
    assert l4["rate_kind"] == "scaled"  # other GPUs scale from the calibrated one (same model)


def test_local_calibration_measures_the_engine_and_later_estimates_use_it(
    plan_of, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from volembed_runner.embedders import local as local_engine

    clock = [0.0]

    class Engine:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            self.path = models.resolve_model_dir(MINILM, download=False)
            self.precision, self.runtime, self.device = kwargs["precision"], kwargs["runtime"], kwargs["device"]
            self.threads, self.batch_tokens, self.max_batch_size = kwargs["threads"], None, None

        def embed(self, texts: list[str], n_tokens: list[int]) -> np.ndarray:
            clock[0] += 0.002 * len(texts)  # model time: a fake clock, no sleep
            return np.zeros((len(texts), 384), dtype=np.float32)

    monkeypatch.setattr(local_engine, "LocalEmbedder", Engine)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(60)), "utf-8")
    plan = plan_of(local_spec(["docs.jsonl"]))
    before = estimate.estimate(plan)
    entry = calibrate(plan, sample_chunks=40, clock=lambda: clock[0])
    assert entry["key"] == f"local|{MINILM}|fp32|local" and entry["chunks"] == 40
    after = estimate.estimate(plan)
    assert after.throughput["kind"] == "calibrated" and before.throughput["kind"] == "default"
    assert after.throughput["tokens_per_second"] == pytest.approx(entry["tokens_per_second"])
    embed = stage(after, "embed")
    expected = entry["model_load_seconds"] + after.processed_tokens / entry["tokens_per_second"]
    assert embed.seconds == pytest.approx(expected)


@pytest.mark.slow
def test_calibrate_cli_with_the_real_local_engine(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(40)), "utf-8")
    spec = tmp_path / "local.yaml"
    spec.write_text(yaml.safe_dump(local_spec(["docs.jsonl"])), encoding="utf-8")
    result = runner.invoke(app, ["calibrate", str(spec), "--chunks", "16", "--json"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)  # --json: standard output holds the JSON alone
    assert entry["tokens_per_second"] > 0 and entry["model_load_seconds"] > 0
    kept = entry["batch"]["batch_tokens"]
    assert str(kept) in entry["batch"]["seconds"] and len(entry["batch"]["seconds"]) == 4
    plan = json.loads(runner.invoke(app, ["plan", str(spec)]).stdout)
    assert (plan["embed"]["batch_tokens"], plan["embed"]["batch_measured"]) == (kept, True)


# ---------------------------------------------------------------------------------------------- throughput table


def test_table_entries_show_their_arithmetic() -> None:
    for row in catalog.throughput()["tei"]:
        assert row["source"] and row["derivation"]
        assert row["low"] <= row["tokens_per_second"] <= row["high"]
    rate = estimate.tei_rate("nomic-ai/nomic-embed-text-v1.5", "A10", {})
    assert rate.kind == "table" and rate.tokens_per_second == pytest.approx(10.6e9 / (50 / 1.10 * 3600), rel=0.01)


def test_a_model_a_third_the_size_is_rated_faster_on_the_same_gpu_within_the_capped_speed_up() -> None:
    small = estimate.tei_rate("BAAI/bge-small-en-v1.5", "A10", {})  # 33M parameters
    base = estimate.tei_rate("BAAI/bge-base-en-v1.5", "A10", {})  # 109M, the same tokenizer and architecture
    cap = catalog.throughput()["scaling"]["small_model_max_speedup"]
    assert base.tokens_per_second < small.tokens_per_second <= cap * base.tokens_per_second
    assert small.low <= small.tokens_per_second <= small.high


def test_scaling_rule_for_pairs_not_in_the_table() -> None:
    speed = catalog.throughput()["gpu_speed"]["factors"]
    same_model = estimate.tei_rate("nomic-ai/nomic-embed-text-v1.5", "L4", {})
    assert same_model.kind == "scaled"
    assert same_model.tokens_per_second == pytest.approx(64_800 * speed["L4"] / speed["A10"])
    bigger = estimate.tei_rate("BAAI/bge-large-en-v1.5", "A10", {})
    assert bigger.tokens_per_second == pytest.approx(62_200 * speed["A10"] / speed["L4"])
    tiny = estimate.tei_rate(MINILM, "A10", {})
    small = estimate.tei_rate("BAAI/bge-small-en-v1.5", "A10", {})  # the nearest table entry by parameters
    assert tiny.tokens_per_second <= 2 * small.tokens_per_second + 1  # small models: speed-up capped
    assert estimate.tei_rate(MINILM, "H100", {}).tokens_per_second == 200_000
    unknown = estimate.tei_rate("someone/unknown-model", "A10", {})
    assert unknown.kind == "scaled" and "BERT-base size" in unknown.source


def test_lognormal_length_model_reproduces_finewebs_published_chunking() -> None:
    # fineweb-modal's rule (anchors.md §1.4): windows start every 450 tokens while start < n, tails kept.
    q, sigma, mean = 800, catalog.throughput()["doc_length"]["sigma"], 1013
    normal = __import__("statistics").NormalDist()
    m = math.log(mean) - sigma**2 / 2
    lengths = [max(1, round(math.exp(m + sigma * normal.inv_cdf((i + 0.5) / q)))) for i in range(q)]
    chunks = sum(1 if n <= 500 else math.ceil(n / 450) for n in lengths) / q
    tokens = sum(n + 50 * ((1 if n <= 500 else math.ceil(n / 450)) - 1) for n in lengths) / q
    assert within(chunks * 9.6e6, 25e6, 0.05) and within(tokens * 9.6e6, 10.5e9, 0.02)


# ------------------------------------------------------------------------------------- sources a user can read

INTERNAL = re.compile(r"anchors|tei\.md|modal-sdk|offline-embedding|issue \d|§|third-party|reference/|\.md\b")


@pytest.mark.parametrize("spec", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_specs_dry_run_cites_only_sources_a_user_can_open(spec: Path, no_network) -> None:
    result = runner.invoke(app, [str(spec), "--dry-run"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert not INTERNAL.findall(result.output), INTERNAL.findall(result.output)
    assumptions = result.output[result.output.index("assumptions:"):]
    assert "https://" in assumptions
    assert not no_network, "a shipped spec's dry run needs no network"


def test_a_known_hub_dataset_is_sized_from_the_catalog_offline(no_network) -> None:
    est = estimate.estimate(_load(REPO / "pipelines" / "wikipedia.yaml", None))
    assert est.documents == 6_407_814  # the 20231101.en dump's rows, not the 20220301.en figures
    notes = "\n".join(est.assumptions)
    assert "catalog's size of wikimedia/wikipedia 20231101.en/train" in notes
    assert "https://huggingface.co/datasets/wikimedia/wikipedia" in notes
    assert est.cost_usd is not None and not no_network


def test_an_unknown_hub_dataset_offline_says_what_to_copy_from_its_card(plan_of) -> None:
    spec = merged(WIKIPEDIA, dataset={"hf": "someone/corpus", "config": "v2", "num_rows": None, "num_bytes": None})
    est = estimate.estimate(plan_of(spec))
    assert est.cost_usd is None
    (tokens,) = [u for u in est.unknown if u.startswith("tokens:")]
    assert "https://huggingface.co/datasets/someone/corpus" in tokens and "v2/train" in tokens
    assert "num_examples" in tokens and "dataset.num_rows" in tokens and "HF_HUB_OFFLINE" in tokens


def test_the_plan_names_a_folder_and_counts_its_documents(tmp_path: Path) -> None:
    docs = tmp_path / "notes"
    docs.mkdir()
    for i in range(50):
        (docs / f"n{i:02d}.md").write_text(f"note {i}", encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(
        "version: 1\nname: notes\nvolume: v\ndataset: {files: [notes]}\nchunking: {size: 64, overlap: 8}\n"
        "embedding: {model: sentence-transformers/all-MiniLM-L6-v2}\n", encoding="utf-8")
    result = runner.invoke(app, [str(tmp_path / "spec.yaml"), "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "notes/ (50 document file(s))" in result.output and "1 file(s)" not in result.output


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, available: bool, bf16: bool = True) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize(("bf16", "precision"), [(True, "bf16"), (False, "fp16")])
def test_a_visible_gpu_puts_the_local_engine_on_cuda_in_half_precision(
    plan_of, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bf16: bool, precision: str
) -> None:
    _fake_cuda(monkeypatch, True, bf16)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(20)), "utf-8")
    plan = plan_of(merged(local_spec(["docs.jsonl"]), embedding={"model": MINILM, "precision": "auto"}))
    assert plan.machine.device == "cuda" and plan.embed.precision == precision
    est = estimate.estimate(plan)
    assert est.throughput["kind"] == "default" and f"on cuda ({precision})" in est.throughput["source"]
    assert est.throughput["tokens_per_second"] == catalog.throughput()["local"]["rates"]["cuda"][precision][
        "tokens_per_second"]


def test_without_a_gpu_the_local_rate_is_the_measured_cpu_figure(plan_of, tmp_path: Path, monkeypatch) -> None:
    _fake_cuda(monkeypatch, False)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(20)), "utf-8")
    plan = plan_of(local_spec(["docs.jsonl"]))
    assert plan.machine.device == "cpu" and plan.embed.precision == "fp32"
    row = catalog.throughput()["local"]["rates"]["cpu"]["fp32"]
    est = estimate.estimate(plan)
    assert "on cpu (fp32)" in est.throughput["source"] and row["measured"] in est.throughput["source"]
    cores = plan.machine.cores
    assert est.throughput["tokens_per_second"] == pytest.approx(row["tokens_per_second"] * cores / 2)
