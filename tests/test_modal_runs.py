"""The generated app run against the fake control plane (`fake_modal.py`): maps, retries, hand-overs and leases.

The app runs ephemerally (`app.run()`) against the fake; its orchestrator body runs here (`.local()`) and maps its
stages through the real SDK, whose inputs the fake runs with the rendered module's own function bodies (`.local()`,
as `test_modal_stages_local.py` does), each attempt in a thread of its own, like a container. The Volume and the
lease Dict are the SDK's, served by the fake; the Volume's files live in a temporary folder; the TEI router is the
TEI-protocol test server. What this checks is what Modal enforces and the runner relies on: retries per input by the
function's policy, inputs that keep running when the map that submitted them closes, Volume versions, and the order
of commits and reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import modal
import pyarrow.parquet as pq
import pytest
from modal._utils.async_utils import synchronizer
from typer.testing import CliRunner

from tests.fake_modal import Recorder, fake_modal_server
from volembed_runner import lease, store
from volembed_runner.backends.modal import launch, render
from volembed_runner.budget import Budget, StagePrice
from volembed_runner.cli import app
from volembed_runner.errors import BackendError, BudgetExhausted, RunHeld, SourceError, StageError
from volembed_runner.estimate import estimate
from volembed_runner.estimate.rates import calibration_key, load_calibrations
from volembed_runner.lease import Holder, LeaseRecord
from volembed_runner.loading import load_spec
from volembed_runner.models import resolve_model_dir
from volembed_runner.orchestrate import chunk_sizes
from volembed_runner.plan import MODAL_ROOT, Plan, make_plan
from volembed_runner.units import parse_key

from .tei_server import FakeRouter, TEIServer

SPEC = """\
version: 1
name: modal-runs
backend: modal
volume: vol-runs
dataset:
  files: [docs.jsonl]
  shard_rows: 7
chunking: {size: 32, overlap: 4, workers: 3}
embedding: {model: sentence-transformers/all-MiniLM-L6-v2}
compute: {gpu: L4, concurrency_limit: 2, allow_concurrent_inputs: 2, retries: 1, timeout: 600}
"""


class Container:
    """One GPU container: an entered Embedder whose inputs share one event loop, as in Modal."""

    def __init__(self, module: ModuleType) -> None:
        self.embedder = module.Embedder()
        # modal 1.6.4's `.local()` skips @modal.enter for async methods, so enter as a container would.
        synchronizer._translate_in(self.embedder)._enter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.module = module
        self.delay = 0.0  # how long each unit takes on the "GPU" (so a deadline can pass while units are in flight)
        self.first_delay: float | None = None  # the first unit's, when it differs
        self.rate: float | None = None  # else: the "GPU" runs at this many processed tokens/s (a unit's tokens ÷ it)
        self._started = 0
        self._lock = threading.Lock()

    def tokens(self, unit: str) -> float:
        """A unit's processed tokens, as the orchestrator counts them (`orchestrate.chunk_sizes`)."""
        plan = Plan.from_dict(self.module.PLAN)
        shard, start, end = parse_key(unit)
        folder = store.chunks_dir(Path(self.module.ROOT), plan.name, plan.chunk.fingerprint)
        size = next(s for s in chunk_sizes(plan, folder) if s.shard == shard)
        rows = size.rows if start is None or end is None else end - start
        return size.tokens * rows / max(1, size.rows)

    def embed(self, unit: str) -> Any:
        with self._lock:
            first, self._started = self._started == 0, self._started + 1
        time.sleep(self.first_delay if first and self.first_delay is not None else self.delay)
        if self.rate is not None:
            time.sleep(self.tokens(unit) / self.rate)
        return asyncio.run_coroutine_threadsafe(self.embedder.embed.local(unit), self.loop).result(timeout=120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class LiveApp:
    module: ModuleType
    plan: Plan
    root: Path
    rec: Recorder
    server: TEIServer
    container: Container

    def orchestrate(self, until: str = "", passes: int = 1) -> dict[str, Any]:
        """The orchestrator's body, run here; its maps go through the fake."""
        result: dict[str, Any] = self.module.orchestrate.local(until, passes)
        return result

    def follow(self, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """Every summary in the chain of hand-overs, from `summary` on."""
        chain = [summary]
        while chain[-1]["next_call"] and len(chain) < 20:
            chain.append(modal.FunctionCall.from_id(chain[-1]["next_call"]).get(timeout=120))
        return chain

    def embed_attempts(self) -> list[Any]:
        return self.rec.attempts_of("Embedder.embed")

    def units_done(self) -> list[str]:
        return store.done_shards(store.embeddings_dir(self.root, self.plan.name, self.plan.embed.fingerprint))


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveApp]:
    with (tmp_path / "docs.jsonl").open("w") as fh:
        for i in range(30):
            fh.write(json.dumps({"text": f"Document {i}. " + "Words of Zürich café. " * i}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    monkeypatch.setattr(render, "RETRY_INITIAL_DELAY_S", 0.0)  # Modal waits at least 1 s between attempts anyway
    monkeypatch.setattr(render, "RETRY_BACKOFF", 1.0)
    plan = make_plan(load_spec(spec), spec)
    module = launch.import_app(_write(tmp_path / "app.py", render.render_app(plan)))

    root = tmp_path / "vol"
    for local, remote in zip(plan.data.files, module.PLAN["data"]["files"], strict=True):
        target = root / remote[len(MODAL_ROOT) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(local).read_bytes())  # what `volembed-run` uploads before the run
    remote = json.loads(json.dumps(module.PLAN).replace(f'"{MODAL_ROOT}/', f'"{root}/'))
    remote["model"]["files_dir"] = str(resolve_model_dir(plan.model.ref, download=False))  # the images' copy
    monkeypatch.setattr(module, "PLAN", remote)
    monkeypatch.setattr(module, "ROOT", str(root))
    monkeypatch.setattr(module, "TEIRouter", FakeRouter)
    monkeypatch.setattr(module, "TEI_CLIENT", {**module.TEI_CLIENT, "max_retries": 1, "backoff_base": 0.01,
                                               "backoff_max": 0.05})
    with TEIServer(max_client_batch_size=4) as server, fake_modal_server() as rec, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "executing locally, no access to the mounted Volume": it's a folder here
        monkeypatch.setattr(module, "TEI_URL", server.url)
        container = Container(module)
        rec.workers.update({
            "download": lambda key, task: module.download.local(key, task),
            "chunk": lambda shard, cap: module.chunk.local(shard, cap),
            "Embedder.embed": container.embed,
            "orchestrate": lambda until="", passes=1: module.orchestrate.local(until, passes),
        })
        with module.app.run():
            yield LiveApp(module, Plan.from_dict(remote), root, rec, server, container)
        wait_for_attempts(rec)
        container.close()


def wait_for_attempts(rec: Recorder, timeout: float = 60.0) -> None:
    """Until every input the fake started has ended (they run on when their map is gone, as on Modal)."""
    deadline = time.time() + timeout
    while any(a.finished is None for a in rec.attempts) and time.time() < deadline:
        time.sleep(0.05)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _stamps(rec: Recorder, method: str) -> list[float]:
    return [t for (m, _), t in zip(rec.calls, rec.stamps, strict=True) if m == method]


def test_a_run_embeds_every_chunk_once_and_reloads_the_volume_after_each_stage(live: LiveApp) -> None:
    summary = live.orchestrate()
    assert summary["ok"] and summary["stages"] == ["download", "chunk", "embed"] and summary["next_call"] is None
    chunk_folder = store.chunks_dir(live.root, live.plan.name, live.plan.chunk.fingerprint)
    units = live.units_done()
    rows = Counter()
    for unit in units:
        rows[parse_key(unit)[0]] += pq.ParquetFile(store.shard_path(
            store.embeddings_dir(live.root, live.plan.name, live.plan.embed.fingerprint), unit)).metadata.num_rows
    assert rows == {s: pq.ParquetFile(store.shard_path(chunk_folder, s)).metadata.num_rows
                    for s in store.done_shards(chunk_folder)}
    assert Counter(a.args for a in live.embed_attempts()) == Counter((u,) for u in units)  # each unit once
    totals = json.loads(store.manifest_path(live.root, live.plan.name).read_text())["totals"]
    assert len(units) > len(rows) == totals["embed_shards_done"] == totals["chunk_shards_done"]  # several per shard
    assert totals["embed_units_done"] == len(units) and totals["vectors"] == totals["chunks"] == sum(rows.values())
    # commit() is told to skip its reload (the fake, like Modal for function mounts), so the orchestrator reloads
    # after every stage before it looks for the next stage's work.
    reloads = _stamps(live.rec, "VolumeReload")
    for stage, following in (("download", "chunk"), ("chunk", "Embedder.embed")):
        last = max(a.finished for a in live.rec.attempts_of(stage))
        first_next = min(a.started for a in live.rec.attempts_of(following))
        assert any(last <= t <= first_next for t in reloads), f"no reload between {stage} and {following}"


def test_a_deterministic_failure_fails_once_and_a_transient_one_is_retried(live: LiveApp,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = live.module.run_shard
    flaked: set[str] = set()

    def run_shard(root: Path, plan: Plan, shard: str, max_rows: int | None) -> dict[str, Any]:
        if shard == "00000-0001":
            raise StageError(f"source shard {shard} holds a row the chunker rejects")
        if shard == "00000-0002" and shard not in flaked:
            flaked.add(shard)
            raise OSError("Volume I/O error: stale file handle")
        return real(root, plan, shard, max_rows)

    monkeypatch.setattr(live.module, "run_shard", run_shard)
    summary = live.orchestrate("chunk")
    attempts = Counter(a.args[0] for a in live.rec.attempts_of("chunk"))
    assert attempts["00000-0001"] == 1  # invalid data: returned, not raised, so Modal does not retry it
    assert attempts["00000-0002"] == 2  # transient: raised, retried by the function's policy, then it succeeded
    assert summary["failed"] == {"chunk": ["00000-0001"]}
    manifest = json.loads(store.manifest_path(live.root, live.plan.name).read_text())
    assert "rejects" in manifest["stages"]["chunk"]["failed"]["00000-0001"]


def test_an_unreadable_row_fails_its_shard_once_and_the_run_exits_3_as_it_does_locally(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = live.module.run_shard

    def run_shard(root: Path, plan: Plan, shard: str, max_rows: int | None) -> dict[str, Any]:
        if shard == "00000-0001":
            raise SourceError(f"docs.jsonl line 9: invalid UTF-8 (shard {shard})")
        return real(root, plan, shard, max_rows)

    monkeypatch.setattr(live.module, "run_shard", run_shard)
    summary = live.orchestrate()
    assert Counter(a.args[0] for a in live.rec.attempts_of("chunk"))["00000-0001"] == 1
    assert summary["failed"] == {"chunk": ["00000-0001"]} and summary["unretryable"] == {"chunk": {"00000-0001": 3}}
    manifest = json.loads(store.manifest_path(live.root, live.plan.name).read_text())
    assert manifest["stages"]["chunk"]["unretryable"] == {"00000-0001": 3}
    with pytest.raises(SourceError, match="00000-0001.*a rerun cannot fix") as caught:
        launch._check(live.plan, summary)
    assert caught.value.exit_code == 3


def test_an_input_the_tei_server_rejects_fails_once_with_its_cause(live: LiveApp) -> None:
    live.orchestrate("chunk")
    live.server.max_input_length = 12  # every long chunk is now over the server's limit: HTTP 422, for good
    summary = live.orchestrate("", 2)
    failed = summary["failed"]["embed"]
    assert failed and all(Counter(a.args[0] for a in live.embed_attempts())[u] == 1 for u in failed)
    manifest = json.loads(store.manifest_path(live.root, live.plan.name).read_text())
    assert all("HTTP 422" in manifest["stages"]["embed"]["failed"][u] for u in failed)


def test_at_the_deadline_the_orchestrator_drains_what_it_fed_and_its_successor_never_resubmits_it(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert live.orchestrate("chunk")["ok"]
    # Each pass feeds one window of units (2 containers × 2 inputs) at once; the deadline falls while they run.
    live.container.delay = 2.0
    monkeypatch.setattr(live.module, "HANDOVER_AFTER_S", 1.5)
    chain = live.follow(live.orchestrate())
    assert len(chain) >= 2 and chain[0]["handover"] and chain[-1]["ok"]
    attempts = live.embed_attempts()
    assert Counter(a.args for a in attempts).most_common(1)[0][1] == 1  # no unit was submitted twice
    calls = sorted({a.call_id for a in attempts}, key=lambda c: min(a.started for a in attempts if a.call_id == c))
    for earlier, later in zip(calls, calls[1:], strict=False):
        drained = max(a.finished for a in attempts if a.call_id == earlier)
        assert drained <= min(a.started for a in attempts if a.call_id == later)  # drained before handing over
    assert sorted(a.args[0] for a in attempts) == live.units_done()


def test_inputs_of_a_dead_orchestrator_run_on_and_its_successor_waits_for_them(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert live.orchestrate("chunk")["ok"]
    live.container.delay, live.container.first_delay = 2.0, 0.1  # the others still run when the first is done
    monkeypatch.setattr(lease, "GRACE_S", 1.0)
    monkeypatch.setattr(live.module, "INPUT_WORK_S", 3)

    def die(event: Any) -> None:
        if getattr(event, "stage", None) == "embed" and getattr(event, "shard", None):
            raise KeyboardInterrupt("the orchestrator's container was lost")

    monkeypatch.setattr(live.module, "progress_log", lambda plan: contextlib.nullcontext(die))
    with pytest.raises(KeyboardInterrupt):
        live.orchestrate()
    died = time.time()
    orphans = [a for a in live.embed_attempts() if a.finished is None]
    assert orphans, "some of its inputs were still running when it died"
    with pytest.raises(RunHeld, match="heartbeat"):  # at once: its lease is still fresh
        live.module.orchestrate.local("", 1)
    monkeypatch.setattr(live.module, "progress_log", lambda plan: contextlib.nullcontext(lambda event: None))
    time.sleep(max(0.0, died + 1.2 - time.time()))  # its heartbeat has stopped (as Modal's retry waits 30 s)
    assert live.orchestrate()["ok"]  # it waited for what the dead one left running, then finished the rest
    assert all(a.status == 1 and a.finished > died for a in orphans)  # they ran to their end, their map closed
    later = [a for a in live.embed_attempts() if a.call_id != orphans[0].call_id]
    assert min(a.started for a in later) >= max(a.finished for a in orphans)
    assert Counter(a.args for a in live.embed_attempts()).most_common(1)[0][1] == 1  # none of them redone


def test_status_of_a_detached_run_in_flight_shows_tokens_per_second_eta_and_cost_so_far(
    live: LiveApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from volembed_runner import cli
    from volembed_runner.orchestrate import ShardFinished
    from volembed_runner.stages import finish

    assert live.orchestrate("chunk")["ok"]
    monkeypatch.setattr(finish, "WRITE_EVERY_S", 0.0)  # the first unit's record is on the Volume when we look
    seen: list[tuple[str, dict[str, Any]]] = []

    class VolumeFiles:
        """What `status` reads through `modal.Volume.read_file`: the fake's Volume is the folder `live.root`."""

        def read_file(self, path: str) -> Iterator[bytes]:
            yield (live.root / path.lstrip("/")).read_bytes()

    def look(event: Any) -> None:
        if isinstance(event, ShardFinished) and event.stage == "embed" and not seen:
            with monkeypatch.context() as patch:  # `volembed-run status SPEC` while the orchestrator runs
                patch.setattr(modal.Volume, "from_name", lambda *args, **kwargs: VolumeFiles())
                result = CliRunner().invoke(cli.app, ["status", str(tmp_path / "spec.yaml")])
            assert result.exit_code == 0, result.output
            seen.append((result.output, json.loads(store.manifest_path(live.root, live.plan.name).read_text())))

    monkeypatch.setattr(live.module, "progress_log", lambda plan: contextlib.nullcontext(look))
    assert live.orchestrate()["ok"]
    ((output, manifest),) = seen
    record, cost = manifest["progress"], manifest["cost"]
    assert record["stage"] == "embed" and record["cost_usd"] == cost["spent_usd"] > 0  # one count: the Meter's
    assert "modal-runs: running" in output
    (line,) = [line for line in output.splitlines() if line.startswith("running: embed: ")]
    rate = record["stages"]["embed"]["tokens_per_second"]
    assert f"{rate:,.0f} tokens/s" in line and "ETA " in line and " ago)" in line
    assert f"${cost['spent_usd']:,.2f} so far, projected total ${cost['projected_total_usd']:,.2f}" in line


# ── Launching: checks before anything is created ────────────────────────────────────────────────────────────────


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    return make_plan(load_spec(spec), spec)


def _nothing_created(rec: Recorder) -> bool:
    return not any(rec.requests(m) for m in ("AppCreate", "AppGetOrCreate", "MountGetOrCreate", "VolumePutFiles2"))


@pytest.mark.parametrize("detach", [True, False])
def test_a_second_launch_of_a_live_run_is_refused_naming_its_holder(plan: Plan, detach: bool) -> None:
    holder = Holder("a1b2c3d4e5f6", "modal-container-7", 1, "modal", "2026-01-01T00:00:00+00:00")
    now = time.time()
    record = LeaseRecord(0, holder, now, now + 3600, stage="embed")
    with fake_modal_server() as rec:
        rec.put_dict(render.LEASE_DICT, f"{render.lease_run(plan)}/00000000", record.to_dict())
        rec.put_dict(render.LEASE_DICT, f"{render.lease_run(plan)}/latest", 0)
        with pytest.raises(RunHeld) as refused:
            launch.run(plan, until=None, detach=detach)
    message = str(refused.value)
    assert "a1b2c3d4e5f6" in message and "stage embed" in message and "\n" not in message
    assert _nothing_created(rec)


def test_a_v1_volume_of_that_name_is_reported_before_anything_is_created(plan: Plan) -> None:
    with fake_modal_server() as rec:
        rec.add_volume(plan.volume, 1)  # e.g. what Modal's own tutorial created
        with pytest.raises(BackendError) as refused:
            launch.run(plan, until=None, detach=True)
    message = str(refused.value)
    assert plan.volume in message and "v1" in message and "volume:" in message and "\n" not in message
    assert _nothing_created(rec)


def test_an_attached_run_spawns_its_orchestrator_so_modal_retries_it(plan: Plan) -> None:
    done = {"ok": True, "failed": {}, "stages": ["download", "chunk", "embed"], "passes": 1, "handover": False,
            "next_call": None}
    with fake_modal_server() as rec:
        rec.workers["orchestrate"] = lambda until="", passes=1: done
        launched = launch.run(plan, until=None, detach=False)
    assert launched.summary == done and not launched.detached
    (call,) = [r for r in rec.requests("FunctionMap") if rec.function_names[r.function_id] == "orchestrate"]
    assert call.function_call_invocation_type == modal_proto_async()


def modal_proto_async() -> int:
    from modal_proto import api_pb2

    return api_pb2.FUNCTION_CALL_INVOCATION_TYPE_ASYNC


def test_the_fake_refuses_a_timeout_outside_modals_limits() -> None:
    app = modal.App("too-long")

    @app.function(serialized=True, timeout=100_000)
    def slow() -> None:  # pragma: no cover - never runs
        pass

    with fake_modal_server(), pytest.raises(modal.exception.Error, match="timeout"):
        app.deploy()


@pytest.mark.slow
def test_a_run_slower_than_its_estimate_stops_at_the_budget_keeps_its_units_and_resumes_when_raised(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert live.orchestrate("chunk")["ok"]
    # The estimate's rate makes a unit nearly free, and the low end of its interval is 50 tokens/s; the "GPU" (a
    # container at $1/s) really runs at 200: the first window of units alone would cost more than the $4 budget
    # (committed at the estimate's rate until a unit finished, this run spent $5.49-5.62).
    live.container.rate = 200.0
    embed = StagePrice(usd_per_second=1.0, start_seconds=0.0, max_containers=2, inputs_per_container=2)
    budget = Budget(max_cost=4.0, stages={"embed": embed}, tokens_per_second=1e9, source="test prices",
                    low_tokens_per_second=50.0)
    monkeypatch.setattr(live.module, "BUDGET", budget.to_dict())
    summary = live.orchestrate()
    assert not summary["ok"] and not summary["handover"] and summary["next_call"] is None  # stopped, not handed over
    done = live.units_done()
    manifest = json.loads(store.manifest_path(live.root, live.plan.name).read_text())
    total = manifest["stages"]["embed"]["total"]
    assert 0 < len(done) < total and manifest["status"] == "stopped"
    assert sorted(a.args[0] for a in live.embed_attempts()) == done  # what was fed drained and was written
    cost = manifest["cost"]
    assert cost["stopped_at_budget"] and cost["remaining_embed_units"] == total - len(done)
    assert 0 < cost["spent_usd"] <= cost["max_cost_usd"] == 4.0  # the true rate is above the low end: never over
    assert cost["would_reach_usd"] > cost["max_cost_usd"]
    assert summary["budget"] == cost
    with pytest.raises(BudgetExhausted) as stopped:
        launch._check(live.plan, summary)
    message = str(stopped.value)
    assert stopped.value.exit_code == 7 and "\n" not in message
    assert "compute.max_cost $4.00" in message and f"{total - len(done)} embed unit(s) left" in message

    raised = Budget(max_cost=1000.0, stages={"embed": embed}, tokens_per_second=1e9, source="test prices",
                    low_tokens_per_second=50.0)
    monkeypatch.setattr(live.module, "BUDGET", raised.to_dict())
    assert live.orchestrate()["ok"]
    assert set(done) <= set(live.units_done())  # the rest of the rows, cut into units around the finished ones
    assert Counter(a.args for a in live.embed_attempts()).most_common(1)[0][1] == 1  # none redone
    after = json.loads(store.manifest_path(live.root, live.plan.name).read_text())
    assert after["status"] == "succeeded" and after["totals"]["vectors"] == after["totals"]["chunks"]
    assert after["cost"]["spent_usd"] > cost["spent_usd"]  # the first pass's spend is carried into the second
    assert not after["cost"]["stopped_at_budget"]


# ── The measured rate fed back into the estimator ─────────────────────────────────────────────────────────────────
def _spec_plan(live: LiveApp) -> Plan:
    """The job as the CLI plans it from its spec file (what a dry run estimates)."""
    spec = Path(live.plan.spec_path)
    return make_plan(load_spec(spec), spec)


def test_a_finished_runs_measured_rate_lands_in_the_calibrations_and_changes_the_next_dry_run(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _spec_plan(live)
    before = estimate(plan)
    assert before.throughput["kind"] != "calibrated"
    live.container.rate = 2_000.0  # a "GPU" far slower than the catalog's rate for this model
    assert live.orchestrate()["ok"]
    manifest = json.loads(store.manifest_path(live.root, live.plan.name).read_text())
    measured = manifest["cost"]["measured"]
    image = f"{live.module.TEI_REGISTRY}:{live.module.TEI_TAG}"
    assert measured["model"] == plan.model.ref and measured["gpu"] == "L4" and measured["image"] == image
    assert measured["units"] == len(live.units_done()) and 0 < measured["tokens_per_second"] < 2 * 2_000.0
    assert manifest["cost"]["max_cost_usd"] is None  # no max_cost: metered all the same

    # `volembed-run status` of the finished run (the manifest as read from the Volume) keeps the rate.
    monkeypatch.setattr(launch, "status", lambda p: manifest)
    monkeypatch.setattr(launch, "require_credentials", lambda: None)
    shown = CliRunner().invoke(app, ["status", plan.spec_path])
    assert shown.exit_code == 0, shown.output
    stored = load_calibrations()[calibration_key("modal", plan.model.ref, "L4", "tei")]
    assert stored["run"] == "modal-runs" and stored["image"] == image and stored["date"] == manifest["finished_at"]

    after = estimate(plan)
    assert after.throughput["tokens_per_second"] == pytest.approx(measured["tokens_per_second"])
    assert after.throughput["source"].startswith(f"measured on run modal-runs {manifest['finished_at']}: ")
    assert after.cost_usd > before.cost_usd and after.uncalibrated["kind"] == before.throughput["kind"]
    dry = CliRunner().invoke(app, [plan.spec_path, "--dry-run"])
    assert "measured on run modal-runs" in dry.output and "(calibrated rate)" in dry.output


def test_a_run_stopped_at_the_budget_before_any_unit_finished_records_no_rate(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert live.orchestrate("chunk")["ok"]
    embed = StagePrice(usd_per_second=1.0, start_seconds=0.0, max_containers=2, inputs_per_container=2)
    budget = Budget(max_cost=0.001, stages={"embed": embed}, tokens_per_second=1e9, source="test prices",
                    low_tokens_per_second=50.0, rate_of={"model": live.plan.model.ref, "gpu": "L4", "image": "x"})
    monkeypatch.setattr(live.module, "BUDGET", budget.to_dict())
    summary = live.orchestrate()
    manifest = json.loads(store.manifest_path(live.root, live.plan.name).read_text())
    assert manifest["status"] == "stopped" and summary["budget"]["stopped_at_budget"] and not live.units_done()
    assert manifest["cost"]["measured"] is None and launch.keep_measured_rate(live.plan, manifest) is None
    assert not load_calibrations()
