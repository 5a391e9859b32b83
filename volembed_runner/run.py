"""What `volembed-run SPEC` does: estimate, confirm when money is at stake, run on the backend, report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from volembed_runner import store
from volembed_runner.errors import BackendError, StageError
from volembed_runner.plan import Plan


def run(
    plan: Plan,
    *,
    dry_run: bool,
    until: str | None,
    yes: bool,
    detach: bool,
    prices: Path | None,
    as_json: bool,
    out: Console,
    err: Console,
) -> int:
    """Dry-run or run `plan`; returns the exit status (0 only on full success)."""
    from volembed_runner import estimate as estimating

    if dry_run or plan.backend == "modal":
        est = estimating.estimate(plan, prices=prices)
        if dry_run:
            if as_json:
                out.print_json(json.dumps({"plan": _plan_summary(plan), **est.to_dict()}))
            else:
                from volembed_runner.cli import _print_plan

                _print_plan(plan, out)
                estimating.render(est, out)
            return 0
        _confirm_spend(plan, est, yes=yes, err=err)
    if plan.backend == "modal":
        from volembed_runner.backends.modal import launch

        return launch.run(plan, until=until, detach=detach, console=err)
    return _run_local(plan, until=until, as_json=as_json, out=out, err=err)


def _plan_summary(plan: Plan) -> dict[str, Any]:
    return {"name": plan.name, "backend": plan.backend, "fingerprints": {
        "data": plan.data.fingerprint, "chunks": plan.chunk.fingerprint, "embeddings": plan.embed.fingerprint}}


def _confirm_spend(plan: Plan, est: Any, *, yes: bool, err: Console) -> None:
    """Refuse a run over `compute.max_cost` (or of unknown cost) and ask on a terminal, unless --yes."""
    from volembed_runner import estimate as estimating

    cost = est.cost_usd
    if yes:
        return
    limit = plan.compute.max_cost
    if limit is not None and (cost is None or cost > limit):
        shown = "unknown" if cost is None else f"${cost:,.2f}"
        raise BackendError(f"estimated cost {shown} exceeds compute.max_cost ${limit:,.2f}; "
                           "lower the job or pass --yes to run anyway")
    if not sys.stdin.isatty():
        return
    estimating.render(est, err)
    shown = "unknown" if cost is None else f"${cost:,.2f}"
    if not err.input(f"Start {plan.name} on Modal (estimated {shown})? [y/N] ").strip().lower().startswith("y"):
        raise BackendError("not started (answered no)")


class _Progress:
    """Progress of a local run: a rich bar per stage on a terminal, a plain line per stage when piped."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.console, self.quiet = console, quiet
        self.live = console.is_terminal and not quiet
        self.progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, disable=not self.live)
        self.tasks: dict[str, Any] = {}
        self.embedded_tokens = 0

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        stage = info["stage"]
        if kind == "stage":
            total = info["total"]
            self.tasks[stage] = self.progress.add_task(stage, total=total, completed=total - info.get("todo", total))
            if not self.live and not self.quiet:
                self.console.print(f"{stage}: {info.get('todo', total)} of {total} shard(s) to run", markup=False)
        elif kind == "shard":
            self.progress.advance(self.tasks[stage])
            if stage == "embed" and info.get("stats"):
                self.embedded_tokens += int(info["stats"].get("tokens", 0))
            if info.get("error"):
                self.console.print(f"{stage} shard {info['id']} failed: {info['error']}", markup=False)


def _run_local(plan: Plan, *, until: str | None, as_json: bool, out: Console, err: Console) -> int:
    from volembed_runner.backends import local

    progress = _Progress(err, quiet=as_json)
    started = time.monotonic()
    with progress.progress:
        outcome = local.run(plan, until=until, on_event=progress)
    seconds = time.monotonic() - started
    manifest_file = store.manifest_path(plan.local_root(), plan.name)
    manifest = store.read_json(manifest_file)
    counts = manifest["totals"]  # refreshed from the done-markers when the run closed
    failed = {stage: entry.get("failed", {}) for stage, entry in manifest.get("stages", {}).items()
              if entry.get("failed")}
    embed_seconds = (manifest.get("stages", {}).get("embed") or {}).get("seconds")
    rate = progress.embedded_tokens / embed_seconds if progress.embedded_tokens and embed_seconds else None
    summary = {
        "name": plan.name,
        "status": manifest.get("status"),
        "stages": outcome.stages_run,
        "seconds": round(seconds, 2),
        **{k: counts[k] for k in ("documents", "empty_documents", "chunks", "tokens", "vectors")},
        "embedded_this_run": progress.embedded_tokens,
        "tokens_per_second": round(rate, 1) if rate else None,
        "failed": failed,
        "outputs": manifest["outputs"],
        "manifest": str(manifest_file),
    }
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        _print_summary(summary, out)
    if failed:
        raise StageError(f"{sum(len(v) for v in failed.values())} shard(s) failed (listed in {summary['manifest']}); "
                         "rerun the same command to retry them")
    return 0


def _print_summary(summary: dict[str, Any], out: Console) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['name']}: {summary['status']} in {summary['seconds']:.1f} s", show_header=False,
                  box=None)
    table.add_column(style="bold")
    table.add_column()
    for key in ("documents", "empty_documents", "chunks", "tokens", "vectors"):
        table.add_row(key.replace("_", " "), f"{summary[key]:,}")
    if summary["tokens_per_second"]:
        table.add_row("embed rate", f"{summary['tokens_per_second']:,.0f} tokens/s (embed stage, this run)")
    elif "embed" in summary["stages"]:
        table.add_row("embed rate", "nothing to embed: every shard was already done")
    last = summary["stages"][-1] if summary["stages"] else None
    folder = {"download": "data", "chunk": "chunks", "embed": "embeddings"}.get(last or "", "embeddings")
    out.print(table)
    out.print(f"files:    {summary['outputs'].get(folder, '')}", markup=False)
    out.print(f"manifest: {summary['manifest']}", markup=False)
