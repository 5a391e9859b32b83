"""The plan, a run's status and a finished run's summary, printed: rich tables on a terminal, plain when piped."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from volembed_runner.estimate.calibrate import ProbeSpend
    from volembed_runner.plan import Plan
    from volembed_runner.run import RunSummary

FAILURES_SHOWN = 10


def out_console() -> Console:
    """Standard output, as the tables are printed."""
    return Console(highlight=False, soft_wrap=True)


def err_console() -> Console:
    """Standard error: progress, questions and error lines."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_plan(plan: Plan, console: Console) -> None:
    """The resolved plan in a few lines: source, chunking, model, compute, fingerprints, outputs, warnings."""
    table = Table(title=f"plan: {plan.name} ({plan.backend})", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    d, c, e, k = plan.data, plan.chunk, plan.embed, plan.compute
    source = f"hf {d.hf} [{d.config or 'default'}/{d.split}]" if d.kind == "hf" else _files_line(d.files)
    table.add_row("dataset", f"{source}" + (f", limit {d.limit}" if d.limit else ""))
    table.add_row("chunks", f"{c.size} tokens, overlap {c.overlap}, tokenizer {plan.model.tokenizer_id}")
    table.add_row("embedding", f"{plan.model.ref} via {e.engine}" + (f", prefix {e.prefix!r}" if e.prefix else ""))
    if plan.model.revision:
        source = plan.model.revision_source
        table.add_row("revision", plan.model.revision + (f" ({source})" if source else ""))
    if plan.backend == "modal":
        table.add_row("compute", f"{k.gpu} × ≤{k.concurrency_limit} containers, "
                      f"{k.allow_concurrent_inputs} embed units in flight each")
    table.add_row("fingerprints", f"data {d.fingerprint}  chunks {c.fingerprint}  embeddings {e.fingerprint}")
    from volembed_runner.results import planned_outputs

    where = "" if plan.backend == "local" else f" (in modal volume {plan.volume})"
    table.add_row("outputs", f"{planned_outputs(plan)['embeddings']}{where}")
    console.print(table)
    for warning in plan.warnings:
        console.print(f"warning: {warning}", markup=False)


def _files_line(files: tuple[str, ...]) -> str:
    """Local sources as the plan names them: one file by name, a folder with the documents in it, else a count."""
    from pathlib import Path

    from volembed_runner.sources.files import folder_documents

    paths = [Path(f) for f in files]
    counts = [len(folder_documents(p)) if p.is_dir() else 1 for p in paths]
    if len(paths) == 1:
        return f"{paths[0].name}/ ({counts[0]:,} document file(s))" if paths[0].is_dir() else paths[0].name
    folders = sum(p.is_dir() for p in paths)
    return f"{sum(counts):,} files" + (f" (in {folders} folder(s) and {len(paths) - folders} file(s))" if folders
                                       else "")


def print_status(manifest: dict[str, Any], console: Console, now: float | None = None) -> None:
    """A manifest as a short table: the running stage's figures (tokens/s, ETA, cost so far, from its `progress`
    record, with its age at `now`), one row per stage, then the failed shards with their causes."""
    import time

    from volembed_runner.ui.progress import run_line

    console.print(f"{manifest.get('name')}: {manifest.get('status')} (pass {manifest.get('passes')}, "
                  f"updated {manifest.get('updated_at') or manifest.get('started_at')})", markup=False)
    line = run_line(manifest.get("progress") or {}, time.time() if now is None else now)
    if manifest.get("status") == "running" and line is not None:
        console.print(f"running: {line}", markup=False)
    stopped = manifest.get("interrupted")
    if stopped:
        console.print(f"interrupted: its writer stopped at {stopped.get('at')} during the {stopped.get('stage')} "
                      "stage without finishing; rerun the same command to resume", markup=False)
    stages = manifest.get("stages") or {}
    table = Table(box=None, show_header=True)
    for column in ("stage", "done", "total", "skipped", "failed", "seconds"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, entry in stages.items():
        table.add_row(name, *(str(entry.get(k) if entry.get(k) is not None else "–")
                              for k in ("done", "total", "skipped")),
                      str(len(entry.get("failed") or {})), str(entry.get("seconds") or "–"))
    if stages:
        console.print(table)
    totals = manifest.get("totals") or {}
    if totals:
        console.print("totals: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                             for k, v in totals.items()), markup=False)
    cost = manifest.get("cost")
    if cost:
        stopped = ("; stopped at the budget: raise compute.max_cost and rerun to continue"
                   if cost.get("stopped_at_budget") else "")
        cap = cost.get("max_cost_usd")
        of = "(no compute.max_cost)" if cap is None else f"of compute.max_cost ${cap:,.2f}"
        console.print(f"cost: ${cost['spent_usd']:,.2f} so far {of} "
                      f"(container-seconds × prices), projected total ${cost['projected_total_usd']:,.2f}{stopped}",
                      markup=False)
    for key, where in (manifest.get("outputs") or {}).items():
        console.print(f"{key + ':':11} {where}", markup=False)
    for name, entry in stages.items():
        failed = entry.get("failed") or {}
        for shard, cause in list(failed.items())[:FAILURES_SHOWN]:
            console.print(f"failed: {name} {shard}: {cause}", markup=False)
        if len(failed) > FAILURES_SHOWN:
            console.print(f"failed: {name}: {len(failed) - FAILURES_SHOWN} more (see --json)", markup=False)


def print_summary(summary: RunSummary, console: Console) -> None:
    """A finished local run: its counts, the embed rate, and where the files and the manifest are."""
    table = Table(title=f"{summary.name}: {summary.status} in {summary.seconds:.1f} s", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key in ("documents", "empty_documents", "tokens", "chunks", "chunk_tokens", "vectors", "truncated"):
        table.add_row(key.replace("_", " "), f"{getattr(summary, key):,}")
    failed = sum(len(shards) for shards in summary.failed.values())
    table.add_row("failed shards", f"{failed:,}" + (" (listed in the manifest; rerun to retry them)" if failed
                                                    else ""))
    if summary.tokens_per_second:
        table.add_row("embed rate", f"{summary.tokens_per_second:,.0f} chunk tokens/s (embed stage, this run)")
    elif failed:
        table.add_row("embed rate", f"nothing embedded this run: {failed} shard(s) failed")
    elif "embed" in summary.stages:
        table.add_row("embed rate", "nothing to embed: every shard was already done")
    last = summary.stages[-1] if summary.stages else None
    folder = {"download": "data", "chunk": "chunks", "embed": "embeddings"}.get(last or "", "embeddings")
    console.print(table)
    console.print(f"files:    {summary.outputs.get(folder, '')}", markup=False)
    console.print(f"manifest: {summary.manifest}", markup=False)


def print_calibration(entry: dict[str, Any], console: Console) -> None:
    """A stored calibration in one line: the rate, over what, and where it was stored."""
    starts = [f"{label} {entry[key]:.1f} s" for key, label in (
        ("model_load_seconds", "model load"), ("cold_start_seconds", "cold start"),
        ("router_start_seconds", "TEI start"), ("warmup_seconds", "warm-up")) if entry.get(key) is not None]
    image = f" on {entry['image']}" if entry.get("image") else ""
    console.print(
        f"calibrated {entry['model']} ({entry['backend']}, {entry['device']}, {entry['engine']} engine{image}): "
        f"{entry['tokens_per_second']:,.0f} tokens/s over {entry['chunks']} chunks "
        f"({entry['processed_tokens']:,} tokens in {entry['seconds']:.2f} s"
        + (f"; {', '.join(starts)}" if starts else "")
        + f"); stored in {entry['path']}",
        markup=False,
    )
    batch = entry.get("batch")
    if batch:
        tried = ", ".join(f"{int(tokens):,} {batch['tokens'] / seconds:,.0f}" for tokens, seconds in
                          sorted(batch["seconds"].items(), key=lambda kv: int(kv[0])))
        console.print(f"batch budget sweep (padded tokens per pass: tokens/s): {tried}; kept "
                      f"{batch['batch_tokens']:,} tokens x {batch['batch_texts']} texts, stored in {batch['path']}",
                      markup=False)


def print_probe_cost(spend: ProbeSpend, console: Console) -> None:
    """What the GPU probe will cost, one line per GPU type, before it starts."""
    for c in spend.costs:
        shown = "unknown" if c.cost_usd is None else f"≈ ${c.cost_usd:,.4f}"
        most = "" if c.max_cost_usd is None else f", at most ${c.max_cost_usd:,.2f}"
        console.print(f"GPU probe on {c.gpu}: {shown}{most} ({c.note})", markup=False)


def ask(console: Console, question: str) -> bool:
    """Ask a yes/no question on the terminal (the text is shown as written); only an answer starting with y is yes."""
    return console.input(question, markup=False).strip().lower().startswith("y")
