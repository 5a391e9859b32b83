"""Figures of a run in flight: per stage, shards and processed tokens done of this pass's, tokens/s, ETA and cost.

The orchestrator keeps one `Tracker` per pass and writes its `record()` into the manifest as `progress` (throttled
with the manifest), so every reader sees the same figures: `status` of a detached run, an attached Modal run
polling the Volume, and the local run's bars (the record also reaches `on_event` as it changes). Cost comes from the
run's `budget.Meter` (the manifest's `cost` record), never counted here. `ui/progress.py` draws a record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from volembed_runner import store


@dataclass
class StageFigures:
    """One stage of this pass: its shards (done before, to run, run, failed) and processed tokens, and its times."""

    total: int
    todo: int
    started: float
    tokens_todo: float | None  # processed tokens of this pass's inputs, where the plan knows them (embed units)
    spent_at_start: float | None
    done: int = 0  # finished this pass, failed ones included
    failed: int = 0
    tokens: float = 0.0  # processed tokens of the inputs finished this pass
    tokens_failed: float = 0.0
    ended: float | None = None
    spent_at_end: float | None = None

    def seconds(self, now: float) -> float:
        """How long the stage has run this pass (to its end, once ended)."""
        return max(0.0, (self.ended if self.ended is not None else now) - self.started)

    def eta(self, now: float) -> float | None:
        """Seconds left at this pass's pace: by tokens where their total is known, else by shards; None before the
        first input finished and once the stage ended."""
        if self.ended is not None or not self.done:
            return None
        seconds = self.seconds(now)
        if self.tokens_todo is not None and self.tokens > 0:
            return seconds / self.tokens * max(0.0, self.tokens_todo - self.tokens - self.tokens_failed)
        return seconds / self.done * max(0, self.todo - self.done)

    def to_dict(self, now: float, spent: float | None) -> dict[str, Any]:
        """The stage's entry in the record (`cost_usd`: what the run's count rose by while the stage ran)."""
        seconds = self.seconds(now)
        end = self.spent_at_end if self.ended is not None else spent
        eta = self.eta(now)
        return {
            "total": self.total, "before": self.total - self.todo, "todo": self.todo, "done": self.done,
            "failed": self.failed, "tokens_done": round(self.tokens),
            "tokens_todo": None if self.tokens_todo is None else round(self.tokens_todo),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(self.tokens / seconds, 1) if self.tokens and seconds > 0 else None,
            "eta_seconds": None if eta is None else round(eta, 1),
            "finished": self.ended is not None,
            "cost_usd": None if end is None or self.spent_at_start is None else round(end - self.spent_at_start, 6),
        }


class Tracker:
    """This pass's stages as their inputs start and finish, on the orchestrator's `clock` (seconds since the epoch)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.stages: dict[str, StageFigures] = {}
        self.running: str | None = None

    def start(self, stage: str, total: int, todo: int, tokens_todo: float | None, spent: float | None) -> None:
        """A stage begins: `todo` of its `total` inputs run this pass (`spent`: the run's cost so far, if counted)."""
        self.stages[stage] = StageFigures(total, todo, self.clock(), tokens_todo, spent)
        self.running = stage

    def shard(self, stage: str, *, failed: bool, tokens: float) -> None:
        """An input of `stage` ended, with `tokens` processed tokens (done, or failed)."""
        figures = self.stages[stage]
        figures.done += 1
        if failed:
            figures.failed += 1
            figures.tokens_failed += tokens
        else:
            figures.tokens += tokens

    def finish(self, stage: str, spent: float | None) -> None:
        """A stage's map ended."""
        figures = self.stages[stage]
        figures.ended, figures.spent_at_end = self.clock(), spent
        if self.running == stage:
            self.running = None

    def remaining_tokens(self, stage: str) -> float:
        """Processed tokens of the stage's inputs not finished yet (what the cost projection still has to pay)."""
        figures = self.stages.get(stage)
        if figures is None or figures.tokens_todo is None:
            return 0.0
        return max(0.0, figures.tokens_todo - figures.tokens - figures.tokens_failed)

    def record(self, cost: dict[str, Any] | None) -> dict[str, Any]:
        """The manifest's `progress`: the running stage, every stage of this pass, and the run's cost so far and
        projected total from `cost` (the Meter's record; None where the run's cost is not counted: local)."""
        now = self.clock()
        spent = None if cost is None else cost.get("spent_usd")
        projected = None if cost is None or "embed" not in self.stages else cost.get("projected_total_usd")
        return {
            "stage": self.running,
            "at": round(now, 3),
            "updated_at": store.utc_stamp(now),
            "stages": {name: figures.to_dict(now, spent) for name, figures in self.stages.items()},
            "cost_usd": spent,
            "projected_total_usd": projected,
        }
