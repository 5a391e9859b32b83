"""`compute.max_cost` held during a run (`budget.py`): cost so far from container-seconds, and when feeding stops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from volembed_runner.backends.modal import launch, render
from volembed_runner.budget import Budget, Meter, StagePrice
from volembed_runner.estimate.cost import POINT_RATE_FACTOR, budget_of
from volembed_runner.estimate.prices import load_prices
from volembed_runner.loading import load_spec
from volembed_runner.plan import make_plan
from volembed_runner.ui.console import print_status

SPEC = """\
version: 1
name: budget-job
backend: modal
volume: vol-budget
dataset: {files: [docs.jsonl]}
chunking: {size: 128, overlap: 8}
embedding: {model: sentence-transformers/all-MiniLM-L6-v2}
compute: {gpu: L4, concurrency_limit: 2, allow_concurrent_inputs: 2}
"""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _budget(max_cost: float, start_seconds: float = 0.0) -> Budget:
    # One GPU container at $1/s, one unit at a time; the plan says 100 tokens/s (a 100-token unit costs $1).
    return Budget(max_cost, {"embed": StagePrice(1.0, start_seconds, 1, 1)}, 100.0, "test prices")


def test_a_rate_below_the_estimate_stops_feeding_before_the_unit_that_would_pass_the_budget() -> None:
    clock = Clock()
    meter = Meter(_budget(10.0), clock)
    meter.start("embed")
    admitted = 0
    while meter.admit(f"u{admitted}", 100.0):
        clock.now += 2.0  # each unit takes 2 s: the GPU runs at 50 tokens/s, half the plan's rate
        meter.finished(f"u{admitted}")
        admitted += 1
    assert admitted == 5  # at the plan's rate the budget would have let 10 units in
    assert meter.stopped and meter.total == 10.0 and meter.rate() == 50.0
    record = meter.record(remaining_units=3, remaining_tokens=300.0)
    assert record["stopped_at_budget"] and record["spent_usd"] == 10.0 and record["would_reach_usd"] == 12.0
    assert record["projected_total_usd"] == 16.0 and record["measured_tokens_per_second"] == 50.0


def test_units_in_flight_and_a_new_containers_start_count_against_the_budget() -> None:
    clock = Clock()
    meter = Meter(_budget(5.0, start_seconds=2.0), clock, spent_before=1.0)  # $1 spent by an earlier pass
    meter.start("embed")
    assert meter.admit("a", 100.0)  # $1 before + $2 start + $1 of work = $4
    assert not meter.admit("b", 200.0)  # + $2 more while "a" still runs: $6 > $5
    assert meter.total == 3.0 and meter.in_flight == 1
    clock.now = 1.0
    meter.finished("a")
    assert meter.total == 4.0


def test_a_budget_survives_the_generated_apps_literal() -> None:
    budget = _budget(7.5)
    assert Budget.from_dict(budget.to_dict()) == budget


def test_status_shows_cost_so_far_the_projection_and_why_the_run_stopped() -> None:
    meter = Meter(_budget(10.0), Clock(), spent_before=10.0)
    meter.start("embed")
    assert not meter.admit("u0", 100.0)
    manifest = {"name": "job", "status": "stopped", "passes": 2, "cost": meter.record(4, 400.0)}
    console = Console(record=True, width=200)
    print_status(manifest, console)
    text = console.export_text()
    assert "cost: $10.00 so far of compute.max_cost $10.00" in text and "projected total $14.00" in text
    assert "stopped at the budget: raise compute.max_cost and rerun" in text


def test_the_generated_app_holds_max_cost_at_the_prices_of_the_run(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    plan = make_plan(load_spec(spec, ["compute.max_cost=25"]), spec)
    prices = tmp_path / "prices.yaml"
    prices.write_text("L4: 0.001\n")
    module = launch.import_app(render.write_app(plan, tmp_path / "app.py", prices))
    budget = Budget.from_dict(module.BUDGET)
    c = plan.compute
    assert budget.max_cost == 25.0 and budget.tokens_per_second == module.EMBED_TOKENS_PER_SECOND
    assert budget.stages["embed"].usd_per_second == load_prices(prices).container(1.0, c.embed.cpu,
                                                                                   c.embed.memory_gib, "L4")
    assert budget.stages["embed"].max_containers == 2 and budget.stages["embed"].inputs_per_container == 2
    assert f"prices from {prices}" in budget.source
    rate = render.embed_rate(plan)
    assert budget.low_tokens_per_second == min(rate.low, POINT_RATE_FACTOR * rate.tokens_per_second)
    assert budget.rate_of == {"model": plan.model.ref, "gpu": "L4", "image": f"{module.TEI_REGISTRY}:{module.TEI_TAG}"}
    # Without a max_cost the run is still metered (cost so far, the measured rate), and never stopped.
    unbudgeted = launch.import_app(render.write_app(make_plan(load_spec(spec), spec), tmp_path / "free.py"))
    assert unbudgeted.BUDGET["max_cost"] is None and unbudgeted.BUDGET["rate_of"] == budget.rate_of
    unlimited = Budget.from_dict(unbudgeted.BUDGET)  # no max_cost: counted at the same prices, never refused
    assert unlimited.max_cost is None
    assert unlimited.stages["embed"].usd_per_second == load_prices().container(1.0, c.embed.cpu, c.embed.memory_gib,
                                                                               "L4")
    meter = Meter(unlimited, Clock())
    meter.start("embed")
    assert all(meter.admit(f"u{i}", 1e12) for i in range(100))


def test_the_index_stage_counts_against_the_budget_at_its_containers_price(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    prices = load_prices(None)
    dense = make_plan(load_spec(spec, ["compute.max_cost=25"]), spec)
    assert "index" not in budget_of(dense, prices, render.embed_rate(dense)).stages
    indexed = make_plan(load_spec(spec, ["compute.max_cost=25", "output.index=lancedb"]), spec)
    price = budget_of(indexed, prices, render.embed_rate(indexed)).stages["index"]
    assert price.usd_per_second == prices.container(1.0, indexed.index.cpu, indexed.index.memory_mib / 1024)
    assert price.usd_per_second > 0 and price.max_containers == 1
    # An index that the budget cannot pay for is not started: the run stops there, its vectors kept.
    meter = Meter(Budget(1.0, {"index": StagePrice(1.0, 2.0, 1, 1)}, 100.0, "test prices"), Clock())
    meter.start("index")
    assert not meter.admit("index") and meter.stopped


def test_without_a_max_cost_the_meter_counts_and_measures_but_never_refuses() -> None:
    clock = Clock()
    meter = Meter(Budget(None, {"embed": StagePrice(1.0, 0.0, 1, 1)}, 100.0, "test prices"), clock)
    meter.start("embed")
    for i in range(20):
        assert meter.admit(f"u{i}", 100.0)
        clock.now += 4.0
        meter.finished(f"u{i}")
    assert meter.total == 80.0 and meter.rate() == 25.0 and not meter.record(0, 0.0)["stopped_at_budget"]


def _gpus_at(budget: Budget, sizes: list[float], rate: float) -> tuple[Meter, int]:
    """Feed units of `sizes` tokens through the budget's embed containers, whose GPUs each run at `rate` tokens/s
    shared by the units in them (2 containers × 2 inputs here), on a fake clock; the meter and the units done."""
    clock = Clock()
    meter = Meter(budget, clock)
    meter.start("embed")
    running: dict[str, float] = {}  # unit → tokens left
    queue = [(f"u{i}", t) for i, t in enumerate(sizes)]
    done = 0
    while queue or running:
        while queue and len(running) < 4:
            key, tokens = queue[0]
            if not meter.admit(key, tokens):
                queue = []
                break
            queue.pop(0)
            running[key] = tokens
        if not running:
            break
        per_unit = rate * math.ceil(len(running) / 2) / len(running)
        step = min(running.values()) / per_unit
        clock.now += step
        for key in list(running):
            running[key] -= per_unit * step
            if running[key] <= 1e-9:
                del running[key]
                meter.finished(key)
                done += 1
    return meter, done


@pytest.mark.parametrize("max_cost", [3.0, 10.0])
@pytest.mark.parametrize("sizes", [[200.0] * 12, [50.0, 400.0, 150.0, 300.0] * 4])
def test_with_the_true_rate_at_the_low_end_spend_never_passes_max_cost_even_before_a_unit_finishes(
    max_cost: float, sizes: list[float]
) -> None:
    # Two GPU containers at $1/s; the plan's rate, 1e9 tokens/s, makes a unit nearly free, and the low end of its
    # interval is 100: the GPUs really run at 100 tokens/s. The first window of four units costs $4 or more.
    stages = {"embed": StagePrice(1.0, 0.0, 2, 2)}
    meter, done = _gpus_at(Budget(max_cost, stages, 1e9, "test prices", low_tokens_per_second=100.0), sizes, 100.0)
    assert meter.stopped and 0 < done < len(sizes)
    assert meter.total <= max_cost + 1e-9
    assert meter.rate() == pytest.approx(100.0)  # measured: the finished units' tokens ÷ their GPU-seconds
    # Committed at the plan's rate until a unit finishes (no pessimistic rate), the first window passes a $3 budget.
    optimistic, _ = _gpus_at(Budget(max_cost, stages, 1e9, "test prices"), sizes, 100.0)
    assert (optimistic.total > max_cost) == (max_cost < 4.0)


def test_a_failed_unit_leaves_the_measured_rate_and_its_tokens_leave_the_commitment() -> None:
    clock = Clock()
    meter = Meter(_budget(100.0), clock)
    meter.start("embed")
    assert meter.admit("ok", 100.0)
    clock.now = 1.0
    meter.finished("ok")
    assert meter.admit("bad", 100.0)
    clock.now = 11.0
    meter.finished("bad", ok=False)
    assert meter.rate() == 100.0 and meter.measured_tokens == 100.0 and meter.fed_tokens == meter.done_tokens
    assert meter.record(0, 0.0)["measured"] is None  # no rate_of: nothing a dry run could use it for
