"""What `volembed-run SPEC` does: estimate, refuse or confirm when money is at stake, run on the backend, and return
what happened; the CLI hands the result to the presentation module (`ui`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from volembed_runner import store
from volembed_runner.errors import BackendError, Declined, SourceError, StageError, unfixable
from volembed_runner.orchestrate import Event, ShardFinished
from volembed_runner.plan import Plan

if TYPE_CHECKING:
    from volembed_runner.backends.modal.launch import Launched


@dataclass(frozen=True)
class RunSummary:
    """A finished local run, from the manifest it closed."""

    name: str
    status: str
    stages: list[str]
    seconds: float
    documents: int
    empty_documents: int
    chunks: int
    tokens: int  # the documents' tokens, as the dry run counts them
    chunk_tokens: int  # the chunks' tokens (overlap counted twice): what the embed stage runs, less special tokens
    vectors: int
    truncated: int  # chunks the engine cut to the model's limit (embedding.truncate: true)
    embedded_this_run: int
    tokens_per_second: float | None
    failed: dict[str, dict[str, str]]
    outputs: dict[str, str]
    manifest: str
    error: str | None = None  # why the run failed outside any shard (e.g. vectors of mixed widths)
    unretryable: dict[str, dict[str, int]] | None = None  # failed shards another attempt cannot fix: exit status

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form."""
        return dict(self.__dict__)


class Spend(Protocol):
    """What `check_spend` weighs: a run's estimate, or the GPU probe's price."""

    @property
    def cost_usd(self) -> float | None: ...


S = TypeVar("S", bound=Spend)


def check_spend(plan: Plan, est: S, *, yes: bool, confirm: Callable[[S], bool] | None) -> None:
    """Refuse a run over `compute.max_cost` (or of unknown cost) unless `yes`; else ask `confirm` when given."""
    if yes:
        return
    cost, limit = est.cost_usd, plan.compute.max_cost
    if limit is not None and (cost is None or cost > limit):
        shown = "unknown" if cost is None else f"${cost:,.2f}"
        raise BackendError(f"estimated cost {shown} exceeds compute.max_cost ${limit:,.2f}; "
                           "lower the job or pass --yes to run anyway")
    if confirm is not None and not confirm(est):
        raise Declined(f"{plan.name} not started (answered no)")


def check_quality(plan: Plan, *, yes: bool) -> None:
    """Refuse (unless `yes`) a Modal run whose GPU probe found TEI's vectors off the reference library's."""
    from volembed_runner import catalog
    from volembed_runner.estimate.rates import calibration_key, load_calibrations, quality_line, quality_threshold

    model, gpu = plan.model.ref, plan.compute.gpu
    entry = load_calibrations().get(calibration_key("modal", model, gpu, "tei"))
    _, low = quality_line(model, gpu, entry)
    if low and not yes:
        q = (entry or {})["quality"]
        known = catalog.find_model(model)
        issues = f" (known issues: {', '.join(known.known_issues)})" if known and known.known_issues else ""
        threshold, source = quality_threshold(model)
        raise BackendError(f"the GPU probe found TEI's vectors for {model} on {gpu} at min cosine "
                           f"{q['min_cosine']:.4f} (mean {q['mean_cosine']:.4f}) to {q['reference']}'s, under "
                           f"{threshold} ({source}){issues}; check the model and TEI version, or pass --yes to run "
                           "anyway")


def run_modal(plan: Plan, *, until: str | None, detach: bool,
              on_upload: Callable[[int, str], None] | None = None, prices: Path | None = None,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> Launched:
    """Run `plan` on Modal (after `check_spend`); raises StageError when shards failed, BudgetExhausted when it
    stopped at `compute.max_cost` (counted at `prices`). `on_progress` gets the progress record polled from the
    Volume while an attached run goes, in place of Modal's streamed output (`launch.run`)."""
    from volembed_runner.backends.modal import launch

    return launch.run(plan, until=until, detach=detach, on_upload=on_upload, prices=prices, on_progress=on_progress)


class _EmbedTokens:
    """Counts the tokens embedded by this run, as shard events arrive (forwarding every event)."""

    def __init__(self, forward: Callable[[Event], None] | None) -> None:
        self.tokens = 0
        self.forward = forward

    def __call__(self, event: Event) -> None:
        if isinstance(event, ShardFinished) and event.stage == "embed" and event.stats:
            self.tokens += int(event.stats.get("tokens", 0))
        if self.forward is not None:
            self.forward(event)


def run_local(plan: Plan, *, until: str | None, on_event: Callable[[Event], None] | None = None) -> RunSummary:
    """Run `plan` on this machine; raises StageError (after the summary is built) when shards failed."""
    from volembed_runner.backends import local

    counter = _EmbedTokens(on_event)
    started = time.monotonic()
    outcome = local.run(plan, until=until, on_event=counter)
    seconds = time.monotonic() - started
    manifest_file = store.manifest_path(plan.local_root(), plan.name)
    manifest = store.read_json(manifest_file)
    counts = manifest["totals"]  # refreshed from the done-markers when the run closed
    failed = {stage: entry.get("failed", {}) for stage, entry in manifest.get("stages", {}).items()
              if entry.get("failed")}
    embed_seconds = (manifest.get("stages", {}).get("embed") or {}).get("seconds")
    rate = counter.tokens / embed_seconds if counter.tokens and embed_seconds else None
    return RunSummary(
        name=plan.name,
        status=str(manifest.get("status")),
        stages=outcome.stages_run,
        seconds=round(seconds, 2),
        documents=counts["documents"],
        empty_documents=counts["empty_documents"],
        chunks=counts["chunks"],
        tokens=counts.get("doc_tokens", 0),
        chunk_tokens=counts["tokens"],
        vectors=counts["vectors"],
        truncated=counts.get("truncated", 0),
        embedded_this_run=counter.tokens,
        tokens_per_second=round(rate, 1) if rate else None,
        failed=failed,
        outputs=manifest["outputs"],
        manifest=str(manifest_file),
        error=manifest.get("error") if manifest.get("status") == "failed" else None,
        unretryable={stage: entry["unretryable"] for stage, entry in manifest.get("stages", {}).items()
                     if entry.get("unretryable")},
    )


def failures(summary: RunSummary) -> StageError | SourceError | None:
    """The error a run with failed shards (or a failed close) ends in (exit status 1), or None."""
    if not summary.failed:
        return StageError(f"{summary.name} failed: {summary.error}") if summary.error else None
    count = sum(len(v) for v in summary.failed.values())
    if unfixable(count, summary.unretryable):  # unreadable input: a rerun fails the same way
        first = next(cause for stage in summary.failed.values() for cause in stage.values())
        return SourceError(f"{count} shard(s) failed on input a rerun cannot fix (listed in {summary.manifest}); "
                           f"fix it, then rerun. First: {first}")
    return StageError(f"{count} shard(s) failed (listed in {summary.manifest}); rerun the same command to retry them")


def manifest_of(plan: Plan) -> dict[str, Any] | None:
    """The run's manifest on the local volume, or None before its first run."""
    return store.read_json(store.manifest_path(plan.local_root(), plan.name))
