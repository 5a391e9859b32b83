"""`compute.max_cost` held while a Modal run goes: cost so far from container-seconds, and whether to feed more.

The orchestrator cannot see Modal's bill, so it counts cost the way the dry run does (`estimate/cost.py`): each
stage runs `ceil(inputs in flight / inputs per container)` containers (at most its `max_containers`), each billed
per second at its price (GPU + cores + memory), plus, once per container it brings up, its start (for a GPU: start,
model load and the scale-down idle after its last input). A `Meter` integrates that over the orchestrator's clock
as inputs are fed and finish. Before an embed unit is fed, the cost so far plus the GPU time of every unit fed and
not finished (counted whole: the progress of a unit in flight is not known), and of this one, at the rate measured
so far (the plan's rate until a unit has finished), must stay within the budget; otherwise the feed stops, what is
in flight drains, and the run ends saying so. A CPU input is fed while the cost so far is under the budget. The cost
of earlier passes of the same run is carried in. A run without `compute.max_cost` is counted the same way (a Budget
whose `max_cost` is None refuses nothing): the Meter is the one count of cost so far that progress, `status` and the
manifest's `cost` record show.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StagePrice:
    """One stage's containers as the budget counts them."""

    usd_per_second: float  # one container: GPU + cores × $/core-s + GiB × $/GiB-s
    start_seconds: float  # billed once per container brought up
    max_containers: int
    inputs_per_container: int = 1


@dataclass(frozen=True)
class Budget:
    """The run's `compute.max_cost` (None: unlimited, counted only), the prices it is counted at, and the embed rate
    it starts from."""

    max_cost: float | None
    stages: dict[str, StagePrice]
    tokens_per_second: float  # one GPU's processed tokens/s before any unit has finished (the plan's rate)
    source: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (a literal of the generated app)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """The inverse of `to_dict`."""
        stages = {name: StagePrice(**value) for name, value in data["stages"].items()}
        limit = data["max_cost"]
        return cls(None if limit is None else float(limit), stages, float(data["tokens_per_second"]),
                   str(data["source"]))


@dataclass
class Meter:
    """Cost so far of a run under a `Budget`, integrated over `clock` as inputs are fed and finish."""

    budget: Budget
    clock: Callable[[], float]
    spent_before: float = 0.0  # earlier passes of this run
    spent: float = 0.0  # this pass
    stage: str | None = None
    in_flight: int = 0
    peak: int = 0  # containers brought up in this stage
    fed_tokens: float = 0.0
    done_tokens: float = 0.0
    gpu_seconds: float = 0.0  # embed containers' busy seconds (what the measured rate divides by)
    stopped: bool = False
    would_reach: float | None = None  # when stopped: the cost the refused input, with those in flight, projected
    _tokens: dict[str, float] = field(default_factory=dict)
    _last: float = 0.0

    @property
    def total(self) -> float:
        """Cost so far of the run, earlier passes included."""
        return self.spent_before + self.spent

    def start(self, stage: str) -> None:
        """A stage begins: no input in flight, no container up."""
        self._accrue()
        self.stage, self.in_flight, self.peak = stage, 0, 0
        self._last = self.clock()

    def _price(self) -> StagePrice | None:
        return self.budget.stages.get(self.stage or "")

    def _containers(self, in_flight: int) -> int:
        price = self._price()
        if price is None or in_flight <= 0:
            return 0
        return min(price.max_containers, math.ceil(in_flight / max(1, price.inputs_per_container)))

    def _accrue(self) -> None:
        """Add the seconds since the last event at the containers then running."""
        now = self.clock()
        price = self._price()
        if price is not None:
            busy = self._containers(self.in_flight) * max(0.0, now - self._last)
            self.spent += busy * price.usd_per_second
            if self.stage == "embed":
                self.gpu_seconds += busy
        self._last = now

    def rate(self) -> float:
        """One GPU's processed tokens/s: measured once a unit has finished, else the plan's."""
        if self.done_tokens > 0 and self.gpu_seconds > 0:
            return self.done_tokens / self.gpu_seconds
        return self.budget.tokens_per_second

    def admit(self, key: str, tokens: float = 0.0) -> bool:
        """Whether input `key` (of `tokens` processed tokens, for an embed unit) may be fed; counts it as fed."""
        self._accrue()
        price = self._price()
        if price is not None:
            more = self._containers(self.in_flight + 1) - self.peak
            start = max(0, more) * price.start_seconds * price.usd_per_second
            if self.stage == "embed":
                committed = (self.fed_tokens - self.done_tokens + tokens) / self.rate() * price.usd_per_second
            else:
                committed = 0.0
            limit = self.budget.max_cost
            if limit is not None and self.total + start + committed > limit:
                self.stopped, self.would_reach = True, self.total + start + committed
                return False
            self.spent += start
            self.peak = max(self.peak, self._containers(self.in_flight + 1))
        self.in_flight += 1
        self.fed_tokens += tokens
        self._tokens[key] = tokens
        return True

    def finished(self, key: str) -> None:
        """Input `key` ended (done or failed)."""
        self._accrue()
        self.in_flight = max(0, self.in_flight - 1)
        self.done_tokens += self._tokens.pop(key, 0.0)

    def projected_total(self, remaining_tokens: float) -> float:
        """The run's cost if the embed work left (`remaining_tokens`) ran at the rate measured so far."""
        price = self.budget.stages.get("embed")
        per_second = price.usd_per_second if price is not None else 0.0
        return self.total + remaining_tokens / self.rate() * per_second

    def record(self, remaining_units: int, remaining_tokens: float) -> dict[str, Any]:
        """What the manifest keeps under `cost`: spent, the budget, the projection, and why the run stopped."""
        self._accrue()
        return {
            "spent_usd": round(self.total, 6),
            "max_cost_usd": self.budget.max_cost,
            "projected_total_usd": round(self.projected_total(remaining_tokens), 6),
            "measured_tokens_per_second": round(self.rate(), 1) if self.done_tokens else None,
            "stopped_at_budget": self.stopped,
            "would_reach_usd": None if self.would_reach is None else round(self.would_reach, 6),
            "remaining_embed_units": remaining_units,
            "prices": self.budget.source,
        }
