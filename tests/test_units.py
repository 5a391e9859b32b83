"""Embed work units sized to the fleet (`volembed_runner.units`): coverage, resume across fleets, size bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volembed_runner.errors import SpecError
from volembed_runner.loading import load_spec
from volembed_runner.plan import make_plan
from volembed_runner.units import (
    UNIT_TIMEOUT_SHARE,
    Fleet,
    ShardSize,
    check_fleet,
    fleet_of,
    parse_key,
    plan_units,
    unit_of,
)

A10_BGE_BASE = 45_900.0


def rows_of(units, shard: str) -> list[int]:
    return [row for u in units if u.shard == shard for row in range(u.start, u.end)]


def tutorial_fleet(inputs: int = 40, timeout: float = 3600.0) -> Fleet:
    return Fleet(containers=50, inputs=inputs, tokens_per_second=A10_BGE_BASE, timeout_s=timeout)


def wikipedia_shards(n: int = 146) -> list[ShardSize]:
    """146 chunk shards of English Wikipedia's ~4.97e9 processed tokens (the default shard_rows)."""
    return [ShardSize(f"{i:05d}-0000", 80_800, 4.97e9 / n) for i in range(n)]


shards_strategy = st.lists(st.tuples(st.integers(0, 5_000), st.floats(0, 5e6)), min_size=1, max_size=12)
fleet_strategy = st.builds(Fleet, st.integers(1, 12), st.integers(1, 12), st.sampled_from([None, 20_000.0, 2e5]),
                           st.sampled_from([None, 60.0, 3600.0]))


@settings(max_examples=80, deadline=None)
@given(shards_strategy, fleet_strategy, st.data())
def test_units_cover_every_row_exactly_once_whatever_was_done_before(sizes, fleet, data) -> None:
    shards = [ShardSize(f"{i:05d}-0000", rows, tokens) for i, (rows, tokens) in enumerate(sizes)]
    before = plan_units(shards, data.draw(fleet_strategy))  # an earlier run, on another fleet ...
    done = [u.key for u in before if data.draw(st.booleans())]  # ... that finished some of its units
    todo = plan_units(shards, fleet, done)
    finished = [unit_of(key, next(s.rows for s in shards if s.shard == parse_key(key)[0])) for key in done]
    for shard in shards:
        rows = sorted(rows_of(finished, shard.shard) + rows_of(todo, shard.shard))
        assert rows == list(range(shard.rows)), "every row in exactly one unit, finished or to do"
    assert not {u.key for u in todo} & set(done)


def test_a_rerun_on_another_fleet_keeps_the_finished_units() -> None:
    shards = wikipedia_shards(4)
    first = plan_units(shards, tutorial_fleet(inputs=4))
    done = [u.key for u in first[: len(first) // 2]]
    second = plan_units(shards, tutorial_fleet(inputs=40), done)
    assert set(done).isdisjoint(u.key for u in second)
    assert sum(u.end - u.start for u in second) == sum(s.rows for s in shards) - sum(
        u.end - u.start for u in first[: len(first) // 2])
    assert plan_units(shards, tutorial_fleet(inputs=40), [u.key for u in first]) == []  # all done: nothing to do


@pytest.mark.parametrize("inputs", [40, 4])
def test_the_tutorials_fleet_gets_whole_waves_of_units_each_well_inside_its_timeout(inputs: int) -> None:
    fleet = tutorial_fleet(inputs)
    units = plan_units(wikipedia_shards(), fleet)
    assert len(units) >= 2 * fleet.slots  # every slot busy until the tail ...
    assert len(units) % fleet.slots == 0  # ... and no last wave that fills only some of the GPUs
    per_row = 4.97e9 / 146 / 80_800
    longest = max(u.end - u.start for u in units) * per_row
    assert fleet.unit_seconds(longest) <= UNIT_TIMEOUT_SHARE * fleet.timeout_s * 1.01


def test_a_shard_that_needs_no_cutting_keeps_its_own_file_name() -> None:
    local = Fleet(containers=1, inputs=1, tokens_per_second=None, timeout_s=None)
    units = plan_units([ShardSize("00000-0000", 100, 5e4), ShardSize("00001-0000", 7, 3e3)], local)
    assert [u.key for u in units] == ["00000-0000", "00001-0000"]
    assert parse_key("00000-0000") == ("00000-0000", None, None)
    cut = plan_units([ShardSize("00000-0000", 100, 5e6)], tutorial_fleet())
    assert cut[0].key == "00000-0000.000000000-000000001" and parse_key(cut[1].key)[1:] == (1, 2)


def test_a_unit_key_outside_its_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="has 10 rows"):
        unit_of("00000-0000.000000005-000000020", 10)


SPEC = """\
version: 1
name: t4
backend: modal
volume: v
dataset: {hf: acme/corpus}
embedding: {model: nomic-ai/nomic-embed-text-v1.5}
compute: {gpu: T4, allow_concurrent_inputs: 4}
"""


def test_a_timeout_too_short_for_the_units_in_flight_is_refused_naming_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    ok = make_plan(load_spec(spec), spec)
    check_fleet(ok, fleet_of(ok, 45_000.0), "catalog rate")  # fineweb's model on a T4 with the default timeout
    short = make_plan(load_spec(spec, sets=["compute.timeout=60"]), spec)
    with pytest.raises(SpecError) as refused:
        check_fleet(short, fleet_of(short, 45_000.0), "catalog rate")
    message = str(refused.value)
    assert "compute.timeout" in message and "allow_concurrent_inputs" in message and "\n" not in message
