"""The local engine's batch budget: padded tokens per forward pass, measured on this machine or the stated default.

`volembed-run calibrate` on a local spec times the engine on the job's own chunks at a few candidate budgets
(`sweep`) and keeps the fastest; the choice is stored in `$VOLEMBED_HOME/batch_budgets.json`, beside the
calibrations, per (weights fingerprint, runtime, precision, device, threads), and the plan of a later run on the same
machine reads it back (`cached_budget`). Without one a run uses the catalog's measured default
(`throughput.yaml` `local.batch`), never an implicit sweep. The text cap of a batch scales with its token budget
(`tokens_per_text`), so short chunks still fill it up to that many rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from volembed_runner import catalog, store

BUDGETS_FILE = "batch_budgets.json"
SWEEP_ROUNDS = 2  # each candidate runs this many times, interleaved; its best pass counts (shared machines vary)


@dataclass(frozen=True)
class BatchBudget:
    """Padded tokens and texts per forward pass, whether this machine measured them, and where they come from."""

    tokens: int
    texts: int
    measured: bool
    source: str


@dataclass(frozen=True)
class Sweep:
    """One sweep: the best seconds per candidate budget over the same chunks, and the fastest."""

    seconds: dict[int, float]

    @property
    def best(self) -> int:
        """The fastest candidate (the smaller budget on a tie: less memory for the same speed)."""
        return min(self.seconds, key=lambda tokens: (self.seconds[tokens], tokens))


def _table(device: str) -> dict[str, Any]:
    return catalog.throughput()["local"]["batch"]["cuda" if device == "cuda" else "cpu"]


def texts_for(tokens: int, device: str) -> int:
    """The text cap that goes with a token budget on `device` (`tokens_per_text` in the catalog)."""
    return max(1, tokens // int(_table(device)["tokens_per_text"]))


def candidates(device: str) -> tuple[int, ...]:
    """The budgets a sweep on `device` tries (catalog)."""
    return tuple(int(t) for t in _table(device)["candidates"])


def default_budget(device: str) -> BatchBudget:
    """The catalog's measured default for `device`, with its source, for a machine that ran no sweep."""
    row = _table(device)
    tokens = int(row["tokens"])
    return BatchBudget(tokens, texts_for(tokens, device), False,
                       f"default {tokens:,} tokens x {texts_for(tokens, device)} texts ({row['source']}); "
                       f"`volembed-run calibrate` measures this machine's")


def budget_key(weights: str, runtime: str, precision: str, device: str, threads: int) -> str:
    """One sweep per (model weights' fingerprint, runtime, precision, device, threads): any other runs differently."""
    return "|".join((weights, runtime, precision, device, str(threads)))


def sweep(run: Callable[[int], object], budgets: Sequence[int], *, rounds: int = SWEEP_ROUNDS,
          clock: Callable[[], float] = time.perf_counter) -> Sweep:
    """Time `run(budget)` for each candidate, `rounds` times interleaved, keeping each one's best pass."""
    if not budgets:
        raise ValueError("a sweep needs at least one candidate budget")
    best: dict[int, float] = {}
    for _ in range(max(1, rounds)):
        for tokens in budgets:
            start = clock()
            run(tokens)
            seconds = clock() - start
            best[tokens] = min(best.get(tokens, float("inf")), seconds)
    return Sweep(best)


def budgets_path(home: Path) -> Path:
    """The stored sweeps of this machine: `batch_budgets.json` beside `calibration.json`."""
    return home / BUDGETS_FILE


def store_sweep(home: Path, key: str, result: Sweep, *, device: str, chunks: int, tokens: int) -> dict[str, Any]:
    """Keep a sweep's choice under its key (replacing an older one) and return the stored entry."""
    entry = {
        "key": key,
        "batch_tokens": result.best,
        "batch_texts": texts_for(result.best, device),
        "seconds": {str(k): v for k, v in result.seconds.items()},
        "chunks": chunks,
        "tokens": tokens,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.put_entry(budgets_path(home), key, entry)
    return {**entry, "path": str(budgets_path(home))}


def has_sweeps(home: Path) -> bool:
    """Whether this machine stored any sweep (a plan skips fingerprinting the model's files when none was)."""
    return bool(store.read_entries(budgets_path(home)))


def cached_budget(home: Path, key: str) -> BatchBudget | None:
    """The budget a sweep under exactly this key chose, or None."""
    entry = store.read_entries(budgets_path(home)).get(key)
    if not entry:
        return None
    try:
        tokens, texts = int(entry["batch_tokens"]), int(entry["batch_texts"])
    except (KeyError, TypeError, ValueError):
        return None
    tried = ", ".join(f"{k:,}" for k in sorted(int(k) for k in entry.get("seconds", {})))
    return BatchBudget(tokens, texts, True,
                       f"measured {entry.get('date')} by `volembed-run calibrate` over {entry.get('chunks')} chunks "
                       f"of the job: fastest of {tried} tokens ({budgets_path(home)})")
