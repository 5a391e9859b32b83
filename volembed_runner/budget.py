"""`compute.max_cost` held while a Modal run goes: cost so far from container-seconds, and whether to feed more.

The orchestrator cannot see Modal's bill, so it counts cost the way the dry run does (`estimate/cost.py`): each
stage runs `ceil(inputs in flight / inputs per container)` containers (at most its `max_containers`), each billed
per second at its price (GPU + cores + memory), plus, once per container it brings up, its start (for a GPU: start,
model load and the scale-down idle after its last input). A `Meter` integrates that over the orchestrator's clock
as inputs are fed and finish, and shares each second of the embed containers among the units then in flight: a
unit's share is its GPU-seconds, and the measured rate is the finished units' tokens over their shares.

Before an embed unit is fed, the cost so far plus the GPU time of every unit fed and not finished (counted whole:
the progress of a unit in flight is not known), and of this one, must stay within the budget; otherwise the feed
stops, what is in flight drains, and the run ends saying so. That GPU time is counted at the *committing rate*:
the budget's pessimistic rate (`Budget.low_tokens_per_second`: the low end of the estimate's rate interval, or a
stated factor below a measured point figure), or the rate measured so far where that is lower.

Guarantee: where no unit's GPU-seconds exceed its processed tokens ÷ the pessimistic rate (the true rate is no lower
than the low end of the estimate's interval), the embed stage's spend as counted here never passes max_cost, from
the first unit on: at the last admission, spent + the in-flight units at the committing rate ≤ max_cost, and what
they go on to cost is at most that. Where the true rate is lower, the overshoot is at most the in-flight units'
shortfall before a unit finishes, and after it the measured rate takes over. A CPU input (download, chunk) is fed
while the cost so far plus its container's start is under the budget: its run time is not projected. The cost of
earlier passes of the same run is carried in. Without a max_cost (None) the Meter counts and measures, and never
refuses: every Modal run has one, the one count of cost so far that progress, `status` and the manifest's `cost`
record show.
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
    """The run's `compute.max_cost` (None: count, never refuse), the prices it is counted at, the embed rate it
    starts from and the pessimistic rate it commits at, and what that rate is of (model, GPU, TEI image)."""

    max_cost: float | None
    stages: dict[str, StagePrice]
    tokens_per_second: float  # one GPU's processed tokens/s before any unit has finished (the plan's rate)
    source: str
    low_tokens_per_second: float | None = None  # the committing rate's ceiling (None: the plan's rate)
    rate_of: dict[str, str] | None = None  # {"model", "gpu", "image"} the measured rate is recorded for

    @property
    def low(self) -> float:
        """The pessimistic rate units are committed at (the plan's rate where none is given)."""
        return self.low_tokens_per_second or self.tokens_per_second

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (a literal of the generated app)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """The inverse of `to_dict`."""
        stages = {name: StagePrice(**value) for name, value in data["stages"].items()}
        cap, low = data["max_cost"], data.get("low_tokens_per_second")
        return cls(None if cap is None else float(cap), stages, float(data["tokens_per_second"]), str(data["source"]),
                   None if low is None else float(low), data.get("rate_of"))


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
    done_tokens: float = 0.0  # of inputs that ended, done or failed (no longer in flight)
    measured_tokens: float = 0.0  # of embed units done ...
    done_gpu_seconds: float = 0.0  # ... and their shares of the embed containers' busy seconds
    done_units: int = 0
    stopped: bool = False
    would_reach: float | None = None  # when stopped: the cost the refused input, with those in flight, projected
    _tokens: dict[str, float] = field(default_factory=dict)
    _shares: dict[str, float] = field(default_factory=dict)  # GPU-seconds of each embed unit in flight so far
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
                for key in self._shares:
                    self._shares[key] += busy / len(self._shares)
        self._last = now

    def measured(self) -> float | None:
        """One GPU's processed tokens/s over the finished embed units (their tokens ÷ their GPU-seconds), or None
        before one has finished."""
        if self.measured_tokens > 0 and self.done_gpu_seconds > 0:
            return self.measured_tokens / self.done_gpu_seconds
        return None

    def rate(self) -> float:
        """One GPU's processed tokens/s: measured once a unit has finished, else the plan's."""
        measured = self.measured()
        return self.budget.tokens_per_second if measured is None else measured

    def committing_rate(self) -> float:
        """The rate units in flight are committed at: the budget's pessimistic rate, or the measured one where
        lower (see the module docstring for what this guarantees)."""
        measured = self.measured()
        return self.budget.low if measured is None else min(self.budget.low, measured)

    def admit(self, key: str, tokens: float = 0.0) -> bool:
        """Whether input `key` (of `tokens` processed tokens, for an embed unit) may be fed; counts it as fed."""
        self._accrue()
        price = self._price()
        if price is not None:
            more = self._containers(self.in_flight + 1) - self.peak
            start = max(0, more) * price.start_seconds * price.usd_per_second
            if self.stage == "embed":
                committed = ((self.fed_tokens - self.done_tokens + tokens) / self.committing_rate()
                             * price.usd_per_second)
            else:
                committed = 0.0
            cap = self.budget.max_cost
            if cap is not None and self.total + start + committed > cap:
                self.stopped, self.would_reach = True, self.total + start + committed
                return False
            self.spent += start
            self.peak = max(self.peak, self._containers(self.in_flight + 1))
        self.in_flight += 1
        self.fed_tokens += tokens
        self._tokens[key] = tokens
        if self.stage == "embed":
            self._shares[key] = 0.0
        return True

    def finished(self, key: str, ok: bool = True) -> None:
        """Input `key` ended: done, or failed (`ok` False: its tokens and GPU-seconds leave the measured rate)."""
        self._accrue()
        self.in_flight = max(0, self.in_flight - 1)
        tokens, share = self._tokens.pop(key, 0.0), self._shares.pop(key, None)
        self.done_tokens += tokens  # no longer in flight, for the commitment
        if share is not None and ok and tokens > 0:
            self.measured_tokens += tokens
            self.done_gpu_seconds += share
            self.done_units += 1

    def projected_total(self, remaining_tokens: float) -> float:
        """The run's cost if the embed work left (`remaining_tokens`) ran at the rate measured so far."""
        price = self.budget.stages.get("embed")
        per_second = price.usd_per_second if price is not None else 0.0
        return self.total + remaining_tokens / self.rate() * per_second

    def record(self, remaining_units: int, remaining_tokens: float) -> dict[str, Any]:
        """What the manifest keeps under `cost`: spent, the budget, the projection, why the run stopped, and the
        embed rate measured on this pass with what it is of (`Budget.rate_of`), which a later dry run can use."""
        self._accrue()
        measured = self.measured()
        return {
            "spent_usd": round(self.total, 6),
            "max_cost_usd": self.budget.max_cost,
            "projected_total_usd": round(self.projected_total(remaining_tokens), 6),
            "measured_tokens_per_second": None if measured is None else round(measured, 1),
            "committing_tokens_per_second": round(self.committing_rate(), 1),
            "stopped_at_budget": self.stopped,
            "would_reach_usd": None if self.would_reach is None else round(self.would_reach, 6),
            "remaining_embed_units": remaining_units,
            "prices": self.budget.source,
            "measured": None if measured is None or self.budget.rate_of is None else {
                **self.budget.rate_of, "tokens_per_second": round(measured, 1), "units": self.done_units,
                "processed_tokens": round(self.measured_tokens), "gpu_seconds": round(self.done_gpu_seconds, 3)},
        }
