"""Embed work units: row ranges of chunk shards, sized to the fleet that embeds them.

One rule (`plan_units`) serves the orchestrator (what to map), the embed stage (which rows a unit key names) and
the dry run (how many GPUs get work, how long the tail is). A unit is a range of a chunk shard's rows; its key is
the shard id when it covers the whole shard (`00003-0001`, the file the shard always had), else the shard id and
the range (`00003-0001.000004096-000008192`). The unit is the unit of resume: one embedding file per unit, written
to a temporary name, renamed, then marked done. Ranges are cut from what is *not yet covered* by finished units, so
a rerun with other fleet settings keeps every finished unit and cuts only the rest, at its own size.

Sizes, from the fleet (`Fleet`: containers × inputs per container, the GPU's rate, one attempt's timeout):
* enough units that every input slot gets work at least twice and every GPU at least UNITS_PER_GPU units, in
  whole waves of the fleet's slots, so every GPU stays full until a short tail;
* none longer than UNIT_TIMEOUT_SHARE of its timeout, counting the GPU it shares with the container's other inputs;
* none shorter than MIN_UNIT_GPU_SECONDS of its GPU's work, unless that would leave an input slot without any,
  so the per-unit Volume reload, commit and file I/O stay small beside it.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from volembed_runner.errors import SpecError, SpecIssue
from volembed_runner.plan import Plan

UNIT_TIMEOUT_SHARE = 0.25  # a unit is cut to take at most this share of one attempt's timeout ...
UNIT_TIMEOUT_LIMIT = 0.5  # ... and a fleet whose smallest unit would take more than this share is refused
MIN_UNIT_GPU_SECONDS = 10.0  # (assumption) a unit keeps its GPU busy at least this long on its own
UNITS_PER_SLOT = 2
UNITS_PER_GPU = 16

_RANGE = re.compile(r"^(?P<shard>[^.]+)\.(?P<start>\d+)-(?P<end>\d+)$")


@dataclass(frozen=True)
class Fleet:
    """What embeds the units: `containers` GPU containers (or engines) with `inputs` units in flight each."""

    containers: int
    inputs: int
    tokens_per_second: float | None  # one GPU's (engine's) rate in processed tokens/s, when known
    timeout_s: float | None  # one attempt of one unit; None where nothing times a unit out (the local backend)

    @property
    def slots(self) -> int:
        """Units in flight across the fleet."""
        return self.containers * self.inputs

    def unit_seconds(self, tokens: float) -> float | None:
        """How long a unit of `tokens` takes in its container, sharing the GPU with `inputs - 1` others."""
        if not self.tokens_per_second:
            return None
        return tokens * self.inputs / self.tokens_per_second

    @property
    def min_tokens(self) -> float:
        """The smallest unit worth its overhead: MIN_UNIT_GPU_SECONDS of one GPU's work (0 when the rate is unknown)."""
        return MIN_UNIT_GPU_SECONDS * self.tokens_per_second if self.tokens_per_second else 0.0

    @property
    def max_tokens(self) -> float | None:
        """The largest unit that takes at most UNIT_TIMEOUT_SHARE of its timeout (None: no bound)."""
        if self.timeout_s is None or not self.tokens_per_second:
            return None
        return UNIT_TIMEOUT_SHARE * self.timeout_s * self.tokens_per_second / self.inputs


def fleet_of(plan: Plan, tokens_per_second: float | None) -> Fleet:
    """The plan's embed fleet: on Modal `concurrency_limit` GPU containers × `allow_concurrent_inputs`, each input
    timed out after `compute.timeout`; locally one engine (TEI endpoint: `allow_concurrent_inputs` in flight)."""
    compute = plan.compute
    if plan.backend == "modal":
        return Fleet(compute.concurrency_limit, compute.allow_concurrent_inputs, tokens_per_second,
                     float(compute.timeout))
    inputs = compute.allow_concurrent_inputs if plan.embed.engine == "tei" else 1
    return Fleet(1, inputs, tokens_per_second, None)


def check_fleet(plan: Plan, fleet: Fleet, rate_note: str) -> None:
    """Refuse a fleet whose smallest worthwhile unit cannot finish in UNIT_TIMEOUT_LIMIT of its timeout (SpecError
    naming compute.timeout; `rate_note` says where the rate came from)."""
    seconds = fleet.unit_seconds(fleet.min_tokens)
    if fleet.timeout_s is None or seconds is None or seconds <= UNIT_TIMEOUT_LIMIT * fleet.timeout_s:
        return
    gpu = plan.compute.gpu
    raise SpecError([SpecIssue(plan.spec_path, "compute.timeout",
                               f"{fleet.timeout_s:.0f} s is too short for {fleet.inputs} embed units in flight per "
                               f"{gpu}: the smallest unit ({MIN_UNIT_GPU_SECONDS:g} s of GPU work at "
                               f"{fleet.tokens_per_second:,.0f} tokens/s, {rate_note}) takes {seconds:,.0f} s in its "
                               f"container, over half the timeout; raise compute.timeout to at least "
                               f"{math.ceil(seconds / UNIT_TIMEOUT_LIMIT)} or lower compute.allow_concurrent_inputs")])


@dataclass(frozen=True)
class ShardSize:
    """A finished chunk shard as the rule sees it: its rows (chunks) and the tokens its GPU will process."""

    shard: str
    rows: int
    tokens: float


@dataclass(frozen=True, order=True)
class Unit:
    """Rows [start, end) of chunk shard `shard` (which has `rows` rows)."""

    shard: str
    start: int
    end: int
    rows: int

    @property
    def key(self) -> str:
        """The unit's id and file stem: the shard id for the whole shard, else `<shard>.<start>-<end>`."""
        if (self.start, self.end) == (0, self.rows):
            return self.shard
        return f"{self.shard}.{self.start:09d}-{self.end:09d}"


def parse_key(key: str) -> tuple[str, int | None, int | None]:
    """(shard, start, end) of a unit key; (shard, None, None) for a whole shard."""
    found = _RANGE.match(key)
    if found is None:
        return key, None, None
    return found["shard"], int(found["start"]), int(found["end"])


def unit_of(key: str, rows: int) -> Unit:
    """The unit a key names in a chunk shard of `rows` rows; ValueError when the range does not fit the shard."""
    shard, start, end = parse_key(key)
    start, end = (0, rows) if start is None or end is None else (start, end)
    if not 0 <= start < end <= rows and not (start == end == rows == 0):
        raise ValueError(f"unit {key} names rows {start}-{end}, but chunk shard {shard} has {rows} rows")
    return Unit(shard, start, end, rows)


def target_tokens(total: float, fleet: Fleet) -> float:
    """Tokens per unit for `total` tokens of work on `fleet` (see the module docstring)."""
    if total <= 0:
        return 1.0
    want = fleet.slots if fleet.containers == 1 else fleet.containers * max(fleet.inputs * UNITS_PER_SLOT,
                                                                            UNITS_PER_GPU)
    target = total / want
    target = max(target, min(fleet.min_tokens, total / fleet.slots))
    cap = fleet.max_tokens
    return target if cap is None else min(target, cap)


def _fill_waves(pieces: list[int], work: list[float], rows: list[int], slots: int) -> None:
    """Add pieces, to the gaps whose pieces are largest, until their count is a multiple of `slots` (rows allowing)."""
    extra = -sum(pieces) % slots
    heap = [(-w / n, i) for i, (w, n) in enumerate(zip(work, pieces, strict=True)) if n < rows[i]]
    heapq.heapify(heap)
    while extra and heap:
        _, i = heapq.heappop(heap)
        pieces[i] += 1
        extra -= 1
        if pieces[i] < rows[i]:
            heapq.heappush(heap, (-work[i] / pieces[i], i))


def _uncovered(rows: int, covered: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The row ranges of [0, rows) outside the `covered` ranges."""
    gaps, at = [], 0
    for start, end in sorted(covered):
        if start > at:
            gaps.append((at, min(start, rows)))
        at = max(at, end)
    if at < rows:
        gaps.append((at, rows))
    return [(a, b) for a, b in gaps if a < b]


def _covered_by(done: Iterable[str], sizes: dict[str, ShardSize]) -> dict[str, list[tuple[int, int]]]:
    """Finished units' row ranges per chunk shard (keys of shards not in `sizes` are ignored)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for key in done:
        shard, start, end = parse_key(key)
        if shard not in sizes:
            continue
        rows = sizes[shard].rows
        out.setdefault(shard, []).append((0, rows) if start is None or end is None else (start, min(end, rows)))
    return out


def plan_units(shards: Sequence[ShardSize], fleet: Fleet, done: Iterable[str] = ()) -> list[Unit]:
    """The units still to embed: the rows no finished unit (`done` keys) covers, cut to the fleet's unit size.

    On a fleet of several GPUs the count is rounded up to whole waves (a multiple of its input slots), the extra
    pieces going to the largest units: a container's inputs share its GPU and so end together, and a last wave that
    filled only some containers would leave the others idle for a whole wave."""
    sizes = {s.shard: s for s in shards}
    covered = _covered_by(done, sizes)
    gaps = [(s, a, b) for s in shards for a, b in _uncovered(s.rows, covered.get(s.shard, []))]
    per_row = {s.shard: s.tokens / s.rows if s.rows else 0.0 for s in shards}
    work = [per_row[s.shard] * (b - a) for s, a, b in gaps]
    target = target_tokens(sum(work), fleet)
    pieces = [min(b - a, max(1, math.ceil(w / target))) for (_, a, b), w in zip(gaps, work, strict=True)]
    if fleet.containers > 1 and pieces:
        _fill_waves(pieces, work, [b - a for _, a, b in gaps], fleet.slots)
    units = []
    for (shard, start, end), n in zip(gaps, pieces, strict=True):
        bounds = [start + (end - start) * i // n for i in range(n + 1)]
        units.extend(Unit(shard.shard, a, b, shard.rows) for a, b in pairwise(bounds))
    empty = [s for s in shards if s.rows == 0 and s.shard not in covered]  # an empty chunk shard: one empty unit
    units.extend(Unit(s.shard, 0, 0, 0) for s in empty)
    return sorted(units)
